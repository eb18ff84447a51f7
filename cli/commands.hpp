// The qnbd subcommands. Each add_*_command registers one subcommand on the
// top-level CLI11 app; its callback runs the command and stores the process
// exit status in `status`.
#pragma once

#include <CLI/CLI.hpp>

namespace qnbd::cli {

// What -V/--version prints (the version is CMake's project version).
inline constexpr const char* kVersionText = "qnbd " QNBD_VERSION;
// Run as `qemu-nbd` (a link of that name to qnbd), qnbd is `qnbd serve`
// and says which qemu-nbd command line it takes in the form qemu-nbd
// prints: tools such as oVirt imageio read the version to decide which
// flags they may pass (--allocation-depth needs 5.2).
inline constexpr const char* kQemuNbdVersionText = "qemu-nbd 7.2.0 (qnbd " QNBD_VERSION ")";

void add_serve_command(CLI::App& app, int& status);    // cli/cmd_serve.cpp
void add_info_command(CLI::App& app, int& status);     // cli/cmd_info.cpp
void add_map_command(CLI::App& app, int& status);      // cli/cmd_map.cpp
void add_convert_command(CLI::App& app, int& status);  // cli/cmd_convert.cpp
void add_create_command(CLI::App& app, int& status);   // cli/cmd_create.cpp
void add_check_command(CLI::App& app, int& status);    // cli/cmd_check.cpp
void add_bitmap_command(CLI::App& app, int& status);   // cli/cmd_bitmap.cpp
void add_bench_command(CLI::App& app, int& status);    // cli/cmd_bench.cpp
void add_ctl_command(CLI::App& app, int& status);      // cli/cmd_ctl.cpp

}  // namespace qnbd::cli
