// qnbd: an NBD server for qcow2 and raw images, and the tools around it.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/commands.hpp"

namespace {

// Started with stdin, stdout or stderr closed (`2>&-`, a supervisor that
// closes them), the first file opened would take that number: the image,
// so every log line would be written into the disk. Hold each closed one
// on /dev/null first (open returns the lowest free number).
void hold_standard_fds() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    const int held = ::open("/dev/null", O_RDWR);
    if (held != fd) {
      // Cannot happen (fd is the lowest free number); never go on with
      // the slot free.
      std::_Exit(1);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  hold_standard_fds();
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
  std::vector<std::string> args(argv, argv + argc);
  // Called as qemu-nbd: the arguments are serve's (see kQemuNbdVersionText).
  const std::string self = argc > 0 ? argv[0] : "";
  if (self.substr(self.rfind('/') + 1) == "qemu-nbd") {
    for (std::size_t i = 1; i < args.size() && args[i] != "--"; ++i) {
      if (args[i] == "-V" || args[i] == "--version") {
        std::printf("%s\n", qnbd::cli::kQemuNbdVersionText);
        return 0;
      }
    }
    args.insert(args.begin() + 1, "serve");
  }
  // `--export-name=` (an empty value, as oVirt imageio passes it to
  // qemu-nbd): CLI11 2.1 would take the next argument as the value, so
  // `--export-name= --persistent` named the export "--persistent". Split
  // such an argument into the option and an empty value, up to "--".
  for (std::size_t i = 1; i < args.size() && args[i] != "--"; ++i) {
    const std::string& a = args[i];
    if (a.size() > 3 && a.compare(0, 2, "--") == 0 && a.find('=') == a.size() - 1) {
      args[i].pop_back();
      args.insert(args.begin() + static_cast<std::ptrdiff_t>(i) + 1, std::string());
      ++i;
    }
  }
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  try {
    app.parse(static_cast<int>(cargs.size()), cargs.data());
  } catch (const CLI::ParseError& e) {
    // CLI11 prints the message (or the help or version text); a usage
    // error then exits 1, as qemu-nbd and qemu-img do, not with CLI11's
    // own codes (105-115), which a tool spawning qemu-nbd does not expect.
    return app.exit(e) == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    // Errors are Results; an exception reaching here is a defect, but it
    // still ends with one line and status 1, not an abort.
    std::fprintf(stderr, "qnbd: %s\n", e.what());
    return 1;
  }
  return status;
}
