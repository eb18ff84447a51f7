// qnbd convert: read a whole disk through the engine into a raw file, sparse
// where the engine reports zeroes (and for all-zero 4 KiB blocks of data, as
// qemu-img convert's default -S 4k).
#include <algorithm>
#include <array>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"
#include "common/zero.hpp"

namespace qnbd::cli {
namespace {

constexpr std::size_t kChunk = 2 << 20;
constexpr std::size_t kSparseBlock = 4096;

Result<void> convert_to_raw(image::BlockDevice& src, image::File& out) {
  const std::uint64_t size = src.size();
  QNBD_TRY(out.truncate(0));
  QNBD_TRY(out.truncate(size));
  std::vector<std::byte> buf(kChunk);
  std::array<image::Extent, 64> extents;
  std::uint64_t offset = 0;
  while (offset < size) {
    std::size_t n = QNBD_TRY(src.block_status(offset, size - offset, extents));
    if (n == 0) return make_error(EIO, "block status returned no extent at {:#x}", offset);
    for (std::size_t k = 0; k < n; ++k) {
      const image::Extent& e = extents[k];
      std::uint64_t end = offset + e.length;
      if (e.zero) {
        offset = end;  // the truncated output already reads as zeroes
        continue;
      }
      while (offset < end) {
        std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, end - offset));
        std::span<std::byte> part(buf.data(), len);
        QNBD_TRY(src.read(part, offset));
        for (std::size_t pos = 0; pos < len;) {
          std::size_t blk = std::min(kSparseBlock - static_cast<std::size_t>((offset + pos) % kSparseBlock), len - pos);
          if (!is_zero({part.data() + pos, blk})) {
            // Write the run of non-zero blocks in one go.
            std::size_t run = blk;
            while (pos + run < len) {
              std::size_t b2 = std::min(kSparseBlock, len - pos - run);
              if (is_zero({part.data() + pos + run, b2})) break;
              run += b2;
            }
            QNBD_TRY(out.pwrite(part.subspan(pos, run), offset + pos));
            pos += run;
          } else {
            pos += blk;
          }
        }
        offset += len;
      }
    }
  }
  return out.flush();
}

}  // namespace

void add_convert_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("convert", "Convert an image to a raw file (like qemu-img convert -O raw)");
  static std::string format, out_format, path, output;
  static LockArgs lock;
  cmd->add_option("-f", format, "Source image format (raw or qcow2); detected if omitted");
  cmd->add_option("-O", out_format, "Output format (only raw)")->required();
  cmd->add_option("IMAGE", path, "Source image")->required();
  cmd->add_option("OUTPUT", output, "Output file")->required();
  add_lock_options(cmd, lock, true);
  cmd->callback([&status] {
    status = 1;
    log::init(0);
    if (out_format != "raw") {
      std::fprintf(stderr, "qnbd: %s: output format '%s' is not supported (only raw)\n", output.c_str(),
                   out_format.c_str());
      return;
    }
    auto dev = open_for_reading(path, format, lock_options(lock, image::LockUse::tool));
    if (!dev) return;
    auto out = image::create_posix_file(output);
    if (!out) {
      print_image_error(output, out.error());
      return;
    }
    auto r = convert_to_raw(*dev, **out);
    if (!r) {
      print_image_error(path, r.error());
      return;
    }
    status = 0;
  });
}

}  // namespace qnbd::cli
