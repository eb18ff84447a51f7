// qnbd serve: not yet built.
#include <cstdio>

#include "server/commands.hpp"

namespace qnbd::cli {

void add_serve_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("serve", "(not yet implemented)");
  cmd->allow_extras();
  cmd->callback([&status] {
    std::fprintf(stderr, "qnbd serve: not implemented yet\n");
    status = 1;
  });
}

}  // namespace qnbd::cli
