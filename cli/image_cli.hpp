// Helpers shared by the image commands (info, map, convert): option parsing
// for -f and the image-lock options, and the one-line error format
// "qnbd: IMAGE: <defect>".
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "common/log.hpp"
#include "common/result.hpp"
#include "common/size.hpp"
#include "config/config.hpp"
#include "config/image_spec.hpp"
#include "image/block_device.hpp"

namespace qnbd::cli {

// parse_qemu_size, printing QEMU's warning for a suffix on a hex number as
// QEMU does: while parsing, before the value is judged.
inline ParsedSize parse_qemu_size_warning(const std::string& value) {
  const ParsedSize p = parse_qemu_size(value);
  if (p.hex_with_suffix) {
    std::fprintf(stderr, "qnbd: warning: Using a multiplier suffix on hex numbers is deprecated: %s\n", value.c_str());
  }
  return p;
}

// qemu-img's cvtnum_full: a size or count in QEMU's syntax (common/size.hpp)
// between min and max; on failure, qemu-img's two messages and nothing.
inline std::optional<std::uint64_t> cvtnum(const char* name, const std::string& value, std::uint64_t min,
                                           std::uint64_t max) {
  const ParsedSize p = parse_qemu_size_warning(value);
  if (p.status == ParsedSize::Status::invalid) {
    std::fprintf(stderr,
                 "qnbd: Invalid %s specified. You may use k, M, G, T, P or E suffixes for\n"
                 "qnbd: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n",
                 name);
    return std::nullopt;
  }
  if (!p.ok() || p.bytes < min || p.bytes > max) {
    std::fprintf(stderr, "qnbd: Invalid %s specified. Must be between %llu and %llu.\n", name,
                 static_cast<unsigned long long>(min), static_cast<unsigned long long>(max));
    return std::nullopt;
  }
  return p.bytes;
}

// Parse a -f value; false if unknown.
inline bool parse_image_format(const std::string& name, image::ImageFormat& out) {
  if (name.empty()) {
    out = image::ImageFormat::detect;
  } else if (name == "raw") {
    out = image::ImageFormat::raw;
  } else if (name == "qcow2") {
    out = image::ImageFormat::qcow2;
  } else {
    return false;
  }
  return true;
}

// An IMAGE argument as QEMU reads it: a `json:{...}` pseudo-filename, or
// with --image-opts block options (config/image_spec.hpp). Fills the
// format (-f's value: "" = probe) and the range and backing choice of `oo`,
// and returns the file to open; a plain file name comes back unchanged.
inline Result<std::string> resolve_image_argument(const std::string& image, bool image_opts, std::string& format,
                                                  image::OpenOptions& oo) {
  if (!image_opts && !config::is_json_filename(image)) return image;
  if (image_opts && !format.empty()) return make_error(EINVAL, "--image-opts and -f are mutually exclusive");
  auto spec = image_opts ? config::parse_image_opts(image) : config::parse_image_json(image);
  if (!spec) return make_error(spec.error().code, "{}: {}", config::one_line(image), spec.error().message);
  if (!format.empty() && !spec->format.empty() && format != spec->format)
    return make_error(EINVAL, "{}: -f {} contradicts the driver '{}'", config::one_line(image), format, spec->format);
  for (const auto& w : spec->warnings) log::warn("{}", w);
  if (!spec->format.empty()) format = spec->format;
  if (spec->offset || spec->size) oo.file_range = image::OpenOptions::FileRange{spec->offset.value_or(0), spec->size};
  oo.no_backing = spec->no_backing;
  return spec->filename;
}

// Image locking options in qemu-img's spelling: -U/--force-share (read-only
// commands), and --locking for QEMU's file.locking=on|off|auto (which
// qemu-img only takes through --image-opts).
struct LockArgs {
  std::string locking = "auto";
  bool force_share = false;
};

inline void add_lock_options(CLI::App* cmd, LockArgs& a, bool with_force_share) {
  cmd->add_option("--locking", a.locking,
                  "Image locking, as QEMU's file.locking: auto (default: lock, warn if the file system cannot), "
                  "on, off")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  if (with_force_share) {
    cmd->add_flag("-U,--force-share", a.force_share,
                  "Open even if another process has the image open for writing (read-only; no lock refuses others)");
  }
}

inline image::LockOptions lock_options(const LockArgs& a, image::LockUse use) {
  image::LockOptions o;
  (void)image::parse_locking(a.locking, o.locking);  // validated by the CLI check
  o.force_share = a.force_share;
  o.use = use;
  return o;
}

// After a successful open with -U: what was read may be changing under us.
inline void warn_force_share(const std::string& path) {
  log::warn("{}: opened with --force-share: another process may be writing it, what is read may be inconsistent", path);
}

// Print an error as one line on stderr. Messages from open_image already
// start with the path; others get it prepended.
inline void print_image_error(const std::string& path, const Error& e) {
  if (e.message.rfind(path + ":", 0) == 0) {
    std::fprintf(stderr, "qnbd: %s\n", e.message.c_str());
  } else {
    std::fprintf(stderr, "qnbd: %s: %s\n", path.c_str(), e.message.c_str());
  }
}

// Open read-only with an optional -f format, locking as qemu-img does for
// `use`; prints the error itself.
inline std::unique_ptr<image::BlockDevice> open_for_reading(const std::string& path, const std::string& format,
                                                            const image::LockOptions& lock = {}) {
  image::OpenOptions options;
  if (!parse_image_format(format, options.format)) {
    std::fprintf(stderr, "qnbd: %s: unknown image format '%s' (expected raw or qcow2)\n", path.c_str(), format.c_str());
    return nullptr;
  }
  options.read_only = true;
  options.lock = lock;
  auto dev = image::open_image(path, options);
  if (!dev) {
    print_image_error(path, dev.error());
    return nullptr;
  }
  if (lock.force_share) warn_force_share(path);
  return std::move(*dev);
}

}  // namespace qnbd::cli
