// qnbd map: print the allocation map of an image like
// `qemu-img map [--output=json]`: same entries, same merging, same text.
#include <cinttypes>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"

namespace qnbd::cli {
namespace {

// qemu-img's entry_mergeable().
bool mergeable(const image::MapEntry& cur, const image::MapEntry& next) {
  if (cur.length == 0) return false;
  if (cur.zero != next.zero || cur.data != next.data || cur.depth != next.depth || cur.present != next.present ||
      cur.has_offset != next.has_offset) {
    return false;
  }
  const image::File* cf = cur.has_offset ? cur.file : nullptr;
  const image::File* nf = next.has_offset ? next.file : nullptr;
  if (cf != nf) return false;
  if (cur.has_offset && cur.offset + cur.length != next.offset) return false;
  return true;
}

// Returns false on the human format's refusal (data without an offset).
bool dump_entry(bool json, const image::MapEntry& e, bool more) {
  if (json) {
    std::printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, \"present\": %s, \"zero\": %s,"
                " \"data\": %s",
                e.start, e.length, e.depth, e.present ? "true" : "false", e.zero ? "true" : "false",
                e.data ? "true" : "false");
    if (e.has_offset) std::printf(", \"offset\": %" PRIu64, e.offset);
    std::printf("}");
    if (more) std::printf(",\n");
    return true;
  }
  if (e.data && !e.has_offset) {
    std::fprintf(stderr, "qnbd: File contains external, encrypted or compressed clusters.\n");
    return false;
  }
  if (e.data) {
    std::printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e.start, e.length, e.offset,
                e.file ? e.file->name().c_str() : "");
  }
  return true;
}

// --bitmap NAME: the runs of a persistent dirty bitmap as the NBD context
// qemu:dirty-bitmap:NAME reports them (merged, at the bitmap granularity).
bool dump_bitmap(image::BlockDevice& dev, const std::string& path, const std::string& name, bool json) {
  auto handle = dev.export_bitmap(name);
  if (!handle) {
    print_image_error(path, handle.error());
    return false;
  }
  std::vector<image::BitmapExtent> runs(1024);
  const std::uint64_t size = dev.size();
  std::uint64_t offset = 0;
  bool have = false;
  image::BitmapExtent cur;
  std::uint64_t cur_start = 0;
  if (json) std::printf("[");
  auto emit = [&](bool more) {
    if (json) {
      std::printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"dirty\": %s}%s", cur_start, cur.length,
                  cur.dirty ? "true" : "false", more ? ",\n" : "");
    } else {
      std::printf("%#-16" PRIx64 "%#-16" PRIx64 "%s\n", cur_start, cur.length, cur.dirty ? "dirty" : "clean");
    }
  };
  while (offset < size) {
    auto n = dev.bitmap_status(*handle, offset, size - offset, runs);
    if (!n) {
      std::fflush(stdout);
      print_image_error(path, n.error());
      return false;
    }
    if (*n == 0) break;
    for (std::size_t i = 0; i < *n; ++i) {
      // Calls are independent: merge across their boundaries.
      if (have && cur.dirty == runs[i].dirty) {
        cur.length += runs[i].length;
      } else {
        if (have) emit(true);
        cur = runs[i];
        cur_start = offset;
        have = true;
      }
      offset += runs[i].length;
    }
  }
  if (have) emit(false);
  if (json) std::printf("]\n");
  return true;
}

}  // namespace

void add_map_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("map", "Print the allocation map of an image (like qemu-img map)");
  static std::string output = "human", format, path, bitmap;
  static LockArgs lock;
  cmd->add_option("--output", output, "Output format: human or json")->check(CLI::IsMember({"human", "json"}));
  cmd->add_option("-f", format, "Image format (raw or qcow2); detected if omitted");
  cmd->add_option("--bitmap", bitmap, "Print the dirty runs of persistent bitmap NAME instead");
  add_lock_options(cmd, lock, true);
  cmd->add_option("IMAGE", path, "Image file")->required();
  cmd->callback([&status] {
    status = 1;
    log::init(0);
    auto dev = open_for_reading(path, format, lock_options(lock, image::LockUse::tool));
    if (!dev) return;
    const bool json = output == "json";
    if (!bitmap.empty()) {
      if (dump_bitmap(*dev, path, bitmap, json)) status = 0;
      return;
    }
    const std::uint64_t length = dev->size();
    if (json) {
      std::printf("[");
    } else {
      std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    }
    image::MapEntry cur;
    while (cur.start + cur.length < length) {
      std::uint64_t offset = cur.start + cur.length;
      // qemu-img probes at most 1 GiB at a time; merging hides the difference.
      auto next = image::map_block_status(*dev, offset, std::min<std::uint64_t>(length - offset, 1ull << 30));
      if (!next) {
        std::fflush(stdout);
        print_image_error(path, next.error());
        return;
      }
      if (mergeable(cur, *next)) {
        cur.length += next->length;
        continue;
      }
      if (cur.length > 0 && !dump_entry(json, cur, true)) return;
      cur = *next;
    }
    // Unconditional, as qemu-img: an empty image prints one zero-length entry.
    if (!dump_entry(json, cur, false)) return;
    if (json) std::printf("]\n");
    status = 0;
  });
}

}  // namespace qnbd::cli
