// qnbd check: qemu-img check for qcow2 images: same options, messages,
// JSON keys and exit codes (0 clean, 1 check failed, 2 corruptions, 3 only
// leaks; 63 for formats without checks).
#include <cstdio>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"
#include "common/endian.hpp"
#include "image/block_device.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/check.hpp"
#include "image/qcow2/format.hpp"
#include "image/qcow2/header.hpp"

namespace qnbd::cli {
namespace {

namespace qc = qnbd::image::qcow2;

void print_human(const qc::CheckResult& r) {
  if (r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (r.corruptions) {
      std::printf("\n%llu errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.\n",
                  static_cast<unsigned long long>(r.corruptions));
    }
    if (r.leaks) {
      std::printf("\n%llu leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.\n",
                  static_cast<unsigned long long>(r.leaks));
    }
    if (r.check_errors) {
      std::printf("\n%llu internal errors have occurred during the check.\n",
                  static_cast<unsigned long long>(r.check_errors));
    }
  }
  if (r.total_clusters != 0 && r.allocated_clusters != 0) {
    const double alloc = static_cast<double>(r.allocated_clusters);
    std::printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
                static_cast<unsigned long long>(r.allocated_clusters),
                static_cast<unsigned long long>(r.total_clusters),
                alloc * 100.0 / static_cast<double>(r.total_clusters),
                static_cast<double>(r.fragmented_clusters) * 100.0 / alloc,
                static_cast<double>(r.compressed_clusters) * 100.0 / alloc);
  }
  if (r.image_end_offset) {
    std::printf("Image end offset: %llu\n", static_cast<unsigned long long>(r.image_end_offset));
  }
}

void print_json(const qc::CheckResult& r, const std::string& filename) {
  // Key order and optional keys as qemu-img 7.2 prints them.
  nlohmann::ordered_json j;
  if (r.image_end_offset) j["image-end-offset"] = r.image_end_offset;
  if (r.compressed_clusters) j["compressed-clusters"] = r.compressed_clusters;
  if (r.total_clusters) j["total-clusters"] = r.total_clusters;
  if (r.corruptions) j["corruptions"] = r.corruptions;
  if (r.corruptions_fixed) j["corruptions-fixed"] = r.corruptions_fixed;
  j["check-errors"] = r.check_errors;
  if (r.leaks) j["leaks"] = r.leaks;
  if (r.leaks_fixed) j["leaks-fixed"] = r.leaks_fixed;
  if (r.allocated_clusters) j["allocated-clusters"] = r.allocated_clusters;
  j["filename"] = filename;
  j["format"] = "qcow2";
  if (r.fragmented_clusters) j["fragmented-clusters"] = r.fragmented_clusters;
  std::printf("%s\n", j.dump(4).c_str());
}

// A crashed writer's write-intent record (docs/crash-safe-bitmaps.md):
// say what it holds (on stderr, so the report stays qemu-img's). A repair of
// corruptions (-r all) may change guest-visible metadata the record does
// not cover, so it retires the record as any other writer would (the
// bitmaps then stay inconsistent). Freeing leaked clusters changes no guest
// data, so a repair that fixed nothing else (-r leaks, or -r all on an image
// whose only defects were leaks, what a crash leaves) keeps it.
void report_intent_record(const std::string& filename, image::File& file, bool repaired_corruptions, bool quiet) {
  auto pending = qc::intent_bit_set(file);
  if (!pending || !*pending) return;
  image::OpenOptions oo;
  oo.lock.locking = image::Locking::off;
  auto dev = image::open_image(filename, oo);
  const std::string state = dev ? (*dev)->info().intent_record : "unreadable";
  const std::string detail = dev ? (*dev)->info().intent_record_detail : dev.error().message;
  if (repaired_corruptions) {
    if (qc::clear_intent_bit(file)) {
      if (!quiet)
        std::fprintf(stderr, "write-intent record: %s (%s); retired by the repair of corruptions\n", state.c_str(),
                     detail.c_str());
      return;
    }
  }
  if (!quiet) std::fprintf(stderr, "write-intent record: %s (%s)\n", state.c_str(), detail.c_str());
}

int run_check(const std::string& filename, const std::string& repair_text, const std::string& output,
              const std::string& format, bool quiet, const LockArgs& lock) {
  qc::RepairMode repair = qc::RepairMode::none;
  if (repair_text == "leaks") {
    repair = qc::RepairMode::leaks;
  } else if (repair_text == "all") {
    repair = qc::RepairMode::all;
  } else if (!repair_text.empty()) {
    std::fprintf(stderr, "qnbd: Unknown option for -r (expecting 'leaks' or 'all'): %s\n", repair_text.c_str());
    return 1;
  }
  if (output != "human" && output != "json") {
    std::fprintf(stderr, "qnbd: --output must be used with human or json as argument.\n");
    return 1;
  }
  if (lock.force_share && repair != qc::RepairMode::none) {
    std::fprintf(stderr, "qnbd: Could not open '%s': force-share=on can only be used with read-only images\n",
                 filename.c_str());
    return 1;
  }
  auto file = image::open_posix_file(filename, repair == qc::RepairMode::none ? image::OpenMode::read_only
                                                                              : image::OpenMode::read_write);
  if (!file) {
    std::fprintf(stderr, "qnbd: Could not open '%s': %s\n", filename.c_str(), file.error().message.c_str());
    return 1;
  }
  std::string fmt_name = format;
  if (fmt_name.empty()) {
    std::byte magic[4] = {};
    auto n = (*file)->pread(magic, 0);
    fmt_name = (n && *n == 4 && load_be32(magic) == qc::QCOW2_MAGIC) ? "qcow2" : "raw";
  }
  if (fmt_name != "qcow2") {
    if (fmt_name != "raw") {
      std::fprintf(stderr, "qnbd: Unknown file format '%s'\n", fmt_name.c_str());
      return 1;
    }
    // qemu-img's exit status for "this format has no consistency checks".
    std::fprintf(stderr, "qnbd: This image format does not support checks\n");
    return 63;
  }
  // A header the engine refuses is an image that does not open, as
  // qemu-img reports it (check itself never starts).
  auto size = (*file)->size();
  auto header = size ? qc::read_header(**file, *size) : Result<qc::Header>(size.error());
  if (!header) {
    std::fprintf(stderr, "qnbd: Could not open '%s': %s\n", filename.c_str(), header.error().message.c_str());
    return 1;
  }
  // qemu-img check holds what qemu-io would: reads, or writes with -r.
  if (auto locked =
          (*file)->set_lock(image::lock_request(lock_options(lock, image::LockUse::tool), image::LockRole::image, true,
                                                repair != qc::RepairMode::none));
      !locked) {
    print_image_error(filename, locked.error());
    return 1;
  }
  if (lock.force_share) warn_force_share(filename);
  const qc::CheckMessageSink sink = [quiet](const std::string& line) {
    if (!quiet) std::fprintf(stderr, "%s\n", line.c_str());
  };
  auto result = qc::check_qcow2(**file, repair, sink);
  if (!result) {
    std::fprintf(stderr, "qnbd: Check failed: %s\n", result.error().message.c_str());
    return 1;
  }
  qc::CheckResult r = *result;
  if (repair != qc::RepairMode::none && r.check_errors == 0 && (r.leaks_fixed || r.corruptions_fixed)) {
    if (output == "human" && !quiet) {
      std::printf("The following inconsistencies were found and repaired:\n\n"
                  "    %llu leaked clusters\n    %llu corruptions\n\n"
                  "Double checking the fixed image now...\n",
                  static_cast<unsigned long long>(r.leaks_fixed), static_cast<unsigned long long>(r.corruptions_fixed));
    }
    auto again = qc::check_qcow2(**file, qc::RepairMode::none, sink);
    if (!again) {
      std::fprintf(stderr, "qnbd: Check failed: %s\n", again.error().message.c_str());
      return 1;
    }
    const auto leaks_fixed = r.leaks_fixed, corruptions_fixed = r.corruptions_fixed;
    r = *again;
    r.leaks_fixed = leaks_fixed;
    r.corruptions_fixed = corruptions_fixed;
  } else if (repair != qc::RepairMode::none && r.check_errors) {
    std::fprintf(stderr, "qnbd: Check failed: Input/output error\n");
    return 1;
  }
  if (r.check_errors && output == "human") {
    // qemu-img reports an incomplete check this way before the summary.
    std::fprintf(stderr, "qnbd: Check failed\n");
  }
  if (output == "json") {
    print_json(r, filename);
  } else if (!quiet) {
    print_human(r);
  }
  report_intent_record(filename, **file, repair == qc::RepairMode::all && r.corruptions_fixed > 0, quiet);
  if (r.check_errors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

}  // namespace

void add_check_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("check", "Check (and repair) a qcow2 image, like qemu-img check");
  struct Args {
    std::string filename, repair, output = "human", format;
    bool quiet = false;
    LockArgs lock;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("-r", args->repair, "repair: leaks or all");
  cmd->add_option("--output", args->output, "human or json");
  cmd->add_option("-f", args->format, "image format (qcow2; detected if omitted)");
  cmd->add_flag("-q", args->quiet, "quiet");
  add_lock_options(cmd, args->lock, true);
  cmd->add_option("IMAGE", args->filename, "image to check")->required();
  cmd->callback([args, &status] {
    log::init(0);
    status = run_check(args->filename, args->repair, args->output, args->format, args->quiet, args->lock);
  });
}

}  // namespace qnbd::cli
