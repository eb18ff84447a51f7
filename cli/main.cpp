// qnbd: an NBD server for qcow2 and raw images, and the tools around it.
#include <cstdio>

#include <CLI/CLI.hpp>

#include "cli/commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"qnbd: serve qcow2 and raw disk images over NBD, with persistent dirty bitmaps", "qnbd"};
  app.require_subcommand(1);
  app.set_version_flag("-V,--version", qnbd::cli::kVersionText);
  int status = 0;
  qnbd::cli::add_serve_command(app, status);
  qnbd::cli::add_info_command(app, status);
  qnbd::cli::add_map_command(app, status);
  qnbd::cli::add_convert_command(app, status);
  qnbd::cli::add_create_command(app, status);
  qnbd::cli::add_check_command(app, status);
  qnbd::cli::add_bitmap_command(app, status);
  qnbd::cli::add_bench_command(app, status);
  qnbd::cli::add_ctl_command(app, status);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return status;
}
