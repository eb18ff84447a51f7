// qnbd map: not yet built.
#include <cstdio>

#include "server/commands.hpp"

namespace qnbd::cli {

void add_map_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("map", "(not yet implemented)");
  cmd->allow_extras();
  cmd->callback([&status] {
    std::fprintf(stderr, "qnbd map: not implemented yet\n");
    status = 1;
  });
}

}  // namespace qnbd::cli
