// qnbd info: describe an image like `qemu-img info` (same JSON keys, same
// order for the common cases, same human layout).
#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"

namespace qnbd::cli {
namespace {

using ordered_json = nlohmann::ordered_json;

ordered_json snapshot_json(const image::SnapshotInfo& s) {
  ordered_json j;
  if (s.icount) j["icount"] = *s.icount;
  j["vm-clock-nsec"] = s.vm_clock_nsec % 1000000000ull;
  j["name"] = s.name;
  j["date-sec"] = s.date_sec;
  j["date-nsec"] = s.date_nsec;
  j["vm-clock-sec"] = s.vm_clock_nsec / 1000000000ull;
  j["id"] = s.id;
  j["vm-state-size"] = s.vm_state_size;
  return j;
}

ordered_json info_json(const image::ImageInfo& i) {
  ordered_json j;
  const bool qcow2 = i.format == "qcow2";
  if (!i.backing_filename.empty() && !i.backing_format.empty()) j["backing-filename-format"] = i.backing_format;
  if (!i.snapshots.empty()) {
    ordered_json snaps = ordered_json::array();
    for (const auto& s : i.snapshots) snaps.push_back(snapshot_json(s));
    j["snapshots"] = std::move(snaps);
  }
  j["virtual-size"] = i.virtual_size;
  j["filename"] = i.filename;
  if (qcow2) j["cluster-size"] = i.cluster_size;
  j["format"] = i.format;
  if (i.actual_size) j["actual-size"] = *i.actual_size;
  if (qcow2) {
    ordered_json d;
    d["compat"] = i.compat;
    d["compression-type"] = i.compression_type;
    const bool v3 = i.compat != "0.10";
    if (v3) d["lazy-refcounts"] = i.lazy_refcounts;
    if (i.has_bitmaps_extension) {
      ordered_json list = ordered_json::array();
      for (const auto& b : i.bitmaps) {
        ordered_json flags = ordered_json::array();
        if (b.in_use) flags.push_back("in-use");
        if (b.auto_enabled) flags.push_back("auto");
        ordered_json bj;
        bj["flags"] = std::move(flags);
        bj["name"] = b.name;
        bj["granularity"] = b.granularity;
        list.push_back(std::move(bj));
      }
      d["bitmaps"] = std::move(list);
    }
    // qnbd only (docs/crash-safe-bitmaps.md): shown when a crashed
    // writer's record is found, so qemu-img's fields stay as they are.
    if (!i.intent_record.empty() && i.intent_record != "none") {
      d["qnbd-intent-record"] = {{"state", i.intent_record}, {"detail", i.intent_record_detail}};
    }
    d["refcount-bits"] = i.refcount_bits;
    if (!i.data_file.empty()) d["data-file"] = i.data_file;
    if (!i.data_file.empty() || i.data_file_raw) d["data-file-raw"] = i.data_file_raw;
    if (v3) {
      d["corrupt"] = i.corrupt;
      d["extended-l2"] = i.extended_l2;
    }
    j["format-specific"] = ordered_json{{"type", "qcow2"}, {"data", std::move(d)}};
  }
  if (!i.backing_filename.empty()) {
    j["full-backing-filename"] = i.full_backing_filename;
    j["backing-filename"] = i.backing_filename;
  }
  j["dirty-flag"] = i.dirty;
  return j;
}

// QEMU's JSON pretty printer writes an empty array over two lines.
std::string qemu_style(const ordered_json& j) {
  std::string in = j.dump(4), out;
  out.reserve(in.size());
  std::size_t line_start = 0;
  for (std::size_t k = 0; k < in.size(); ++k) {
    if (in[k] == '\n') line_start = k + 1;
    if (in[k] == '[' && k + 1 < in.size() && in[k + 1] == ']') {
      std::size_t indent = 0;
      while (line_start + indent < in.size() && in[line_start + indent] == ' ') ++indent;
      out += "[\n" + std::string(indent, ' ') + "]";
      ++k;
      continue;
    }
    out += in[k];
  }
  return out;
}

// qemu's size_to_str: "64 KiB", "1.5 MiB", "3 MiB".
std::string human_size(std::uint64_t v) {
  static const char* const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  double d = static_cast<double>(v);
  while (d >= 1024 && u < 6) {
    d /= 1024;
    ++u;
  }
  // Three significant digits, trailing zeros dropped (%0.3g).
  return fmt::format("{:.3g} {}", d, units[u]);
}

void print_human(const image::ImageInfo& i) {
  std::printf("image: %s\n", i.filename.c_str());
  std::printf("file format: %s\n", i.format.c_str());
  std::printf("virtual size: %s (%" PRIu64 " bytes)\n", human_size(i.virtual_size).c_str(), i.virtual_size);
  if (i.actual_size) std::printf("disk size: %s\n", human_size(*i.actual_size).c_str());
  if (i.format == "qcow2") std::printf("cluster_size: %" PRIu64 "\n", i.cluster_size);
  if (i.dirty) std::printf("cleanly shut down: no\n");
  if (!i.backing_filename.empty()) {
    std::printf("backing file: %s", i.backing_filename.c_str());
    if (i.full_backing_filename != i.backing_filename) {
      std::printf(" (actual path: %s)", i.full_backing_filename.c_str());
    }
    std::printf("\n");
    if (!i.backing_format.empty()) std::printf("backing file format: %s\n", i.backing_format.c_str());
  }
  if (!i.snapshots.empty()) {
    std::printf("Snapshot list:\n");
    std::printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    for (const auto& s : i.snapshots) {
      std::time_t t = s.date_sec;
      struct tm tm;
      localtime_r(&t, &tm);
      char date[32];
      std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
      std::uint64_t secs = s.vm_clock_nsec / 1000000000ull;
      std::string clock = fmt::format("{:02}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60, secs % 60,
                                      (s.vm_clock_nsec / 1000000) % 1000);
      std::string icount = s.icount ? std::to_string(*s.icount) : "";
      std::printf("%-9s %-16s %8s%20s%13s%11s\n", s.id.c_str(), s.name.c_str(), human_size(s.vm_state_size).c_str(),
                  date, clock.c_str(), icount.c_str());
    }
  }
  if (i.format == "qcow2") {
    std::printf("Format specific information:\n");
    std::printf("    compat: %s\n", i.compat.c_str());
    std::printf("    compression type: %s\n", i.compression_type.c_str());
    const bool v3 = i.compat != "0.10";
    if (v3) std::printf("    lazy refcounts: %s\n", i.lazy_refcounts ? "true" : "false");
    if (i.has_bitmaps_extension) {
      std::printf("    bitmaps:\n");
      for (std::size_t k = 0; k < i.bitmaps.size(); ++k) {
        const auto& b = i.bitmaps[k];
        std::printf("        [%zu]:\n            flags:\n", k);
        int f = 0;
        if (b.in_use) std::printf("                [%d]: in-use\n", f++);
        if (b.auto_enabled) std::printf("                [%d]: auto\n", f++);
        std::printf("            name: %s\n            granularity: %" PRIu64 "\n", b.name.c_str(), b.granularity);
      }
    }
    if (!i.intent_record.empty() && i.intent_record != "none") {
      std::printf("    write-intent record: %s (%s)\n", i.intent_record.c_str(), i.intent_record_detail.c_str());
    }
    std::printf("    refcount bits: %u\n", i.refcount_bits);
    if (!i.data_file.empty()) std::printf("    data file: %s\n", i.data_file.c_str());
    if (!i.data_file.empty() || i.data_file_raw) {
      std::printf("    data file raw: %s\n", i.data_file_raw ? "true" : "false");
    }
    if (v3) {
      std::printf("    corrupt: %s\n", i.corrupt ? "true" : "false");
      std::printf("    extended l2: %s\n", i.extended_l2 ? "true" : "false");
    }
  }
}

}  // namespace

void add_info_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("info", "Show information about an image (like qemu-img info)");
  static std::string output = "human", format, path;
  static bool backing_chain = false;
  static LockArgs lock;
  cmd->add_option("--output", output, "Output format: human or json")->check(CLI::IsMember({"human", "json"}));
  cmd->add_option("-f", format, "Image format (raw or qcow2); detected if omitted");
  cmd->add_flag("--backing-chain", backing_chain, "Describe every image of the backing chain");
  add_lock_options(cmd, lock, true);
  cmd->add_option("IMAGE", path, "Image file")->required();
  cmd->callback([&status] {
    log::init(0);
    // qemu-img info holds no permission, it only keeps writers out.
    auto dev = open_for_reading(path, format, lock_options(lock, image::LockUse::info));
    if (!dev) {
      status = 1;
      return;
    }
    std::vector<image::ImageInfo> chain;
    for (image::BlockDevice* d = dev.get(); d; d = backing_chain ? d->backing() : nullptr) {
      chain.push_back(d->info());
      // A backing device's own name is the resolved path it was opened with.
    }
    if (output == "json") {
      if (backing_chain) {
        ordered_json list = ordered_json::array();
        for (const auto& i : chain) list.push_back(info_json(i));
        std::printf("%s\n", qemu_style(list).c_str());
      } else {
        std::printf("%s\n", qemu_style(info_json(chain[0])).c_str());
      }
    } else {
      for (std::size_t k = 0; k < chain.size(); ++k) {
        if (k) std::printf("\n");
        print_human(chain[k]);
      }
    }
    status = 0;
  });
}

}  // namespace qnbd::cli
