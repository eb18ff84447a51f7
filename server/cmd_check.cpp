// qnbd check: not yet built.
#include <cstdio>

#include "server/commands.hpp"

namespace qnbd::cli {

void add_check_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("check", "(not yet implemented)");
  cmd->allow_extras();
  cmd->callback([&status] {
    std::fprintf(stderr, "qnbd check: not implemented yet\n");
    status = 1;
  });
}

}  // namespace qnbd::cli
