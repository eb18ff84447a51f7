// qnbd create: not yet built.
#include <cstdio>

#include "server/commands.hpp"

namespace qnbd::cli {

void add_create_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("create", "(not yet implemented)");
  cmd->allow_extras();
  cmd->callback([&status] {
    std::fprintf(stderr, "qnbd create: not implemented yet\n");
    status = 1;
  });
}

}  // namespace qnbd::cli
