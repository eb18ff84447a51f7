// qnbd create: make a new qcow2 or raw image, with qemu-img create's
// command line (-f, -o key=value,..., -b/-F, FILE [SIZE]) and messages.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"
#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/size.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/create.hpp"

namespace qnbd::cli {
namespace {

namespace qc = qnbd::image::qcow2;

// A size option in -o (QemuOpts' parse_option_size): QEMU's syntax
// (common/size.hpp), with QEMU's messages.
Result<std::uint64_t> option_size(const std::string& key, const std::string& value) {
  const ParsedSize p = parse_qemu_size_warning(value);
  if (p.status == ParsedSize::Status::out_of_range) {
    return make_error(ERANGE, "Value '{}' is out of range for parameter '{}'", value, key);
  }
  if (!p.ok()) return make_error(EINVAL, "Parameter '{}' expects a non-negative number below 2^64", key);
  return p.bytes;
}

// Split "-o a=b,c=d" (",," escapes a comma, as in qemu's option syntax).
bool parse_options(const std::string& text, std::vector<std::pair<std::string, std::string>>& out, std::string& error) {
  std::string item;
  auto finish = [&]() {
    if (item.empty()) return true;
    auto eq = item.find('=');
    if (eq == std::string::npos) {
      error = fmt::format("Invalid parameter '{}'", item);
      return false;
    }
    out.emplace_back(item.substr(0, eq), item.substr(eq + 1));
    item.clear();
    return true;
  };
  for (std::size_t i = 0; i < text.size(); i++) {
    if (text[i] == ',') {
      if (i + 1 < text.size() && text[i + 1] == ',') {
        item += ',';
        i++;
        continue;
      }
      if (!finish()) return false;
      continue;
    }
    item += text[i];
  }
  return finish();
}

std::optional<bool> parse_on_off(const std::string& v) {
  if (v == "on") return true;
  if (v == "off") return false;
  return std::nullopt;
}

// Virtual size of a backing file, read from its qcow2 header or its length.
Result<std::uint64_t> backing_size(const std::string& path, const std::string& format) {
  auto file = QNBD_TRY(image::open_posix_file(path, image::OpenMode::read_only));
  if (format == "qcow2") {
    std::byte hdr[32];
    QNBD_TRY(file->read_exact(hdr, 0, "qcow2 header"));
    if (load_be32(hdr) != qc::QCOW2_MAGIC) {
      return make_error(EINVAL, "Image is not in qcow2 format");
    }
    return load_be64(hdr + 24);
  }
  if (format == "raw") return file->size();
  return make_error(ENOTSUP, "Unknown driver '{}'", format);
}

int run_create(const std::string& format, const std::vector<std::string>& option_strings, std::string backing,
               std::string backing_format, const std::string& filename, const std::optional<std::string>& size_text,
               bool quiet) {
  auto fail = [&](const std::string& msg) {
    std::fprintf(stderr, "qnbd: %s: %s\n", filename.c_str(), msg.c_str());
    return 1;
  };
  // A size option that is not a size gets QemuOpts' hint after the error.
  auto fail_size_option = [&](const Error& e) {
    fail(e.message);
    if (e.code == EINVAL) {
      std::fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                           "and exabytes, respectively.\n");
    }
    return 1;
  };
  if (format != "qcow2" && format != "raw") {
    std::fprintf(stderr, "qnbd: Unknown file format '%s'\n", format.c_str());
    return 1;
  }
  std::vector<std::pair<std::string, std::string>> opts;
  for (const auto& s : option_strings) {
    std::string error;
    if (!parse_options(s, opts, error)) return fail(error);
  }

  qc::CreateOptions o;
  std::optional<std::uint64_t> size;
  std::string size_display;
  bool compat_given = false, prealloc_given = false;
  std::string prealloc_text = "off", compat_text;
  // Given, even empty, the size is parsed (qemu-img: "" is an invalid size).
  if (size_text) {
    size = cvtnum("image size", *size_text, 0, INT64_MAX);
    if (!size) return 1;
  }
  for (const auto& [key, value] : opts) {
    if (key == "size") {
      auto v = option_size(key, value);
      if (!v) return fail_size_option(v.error());
      size = *v;
    } else if (key == "preallocation") {
      if (value == "off")
        o.preallocation = qc::Preallocation::off;
      else if (value == "metadata" && format == "qcow2")
        o.preallocation = qc::Preallocation::metadata;
      else if (value == "falloc")
        o.preallocation = qc::Preallocation::falloc;
      else if (value == "full")
        o.preallocation = qc::Preallocation::full;
      else
        return fail(fmt::format("Parameter 'preallocation' does not accept value '{}'", value));
      prealloc_given = true;
      prealloc_text = value;
    } else if (format == "raw") {
      return fail(fmt::format("Invalid parameter '{}'", key));
    } else if (key == "compat") {
      if (value == "0.10" || value == "v2")
        o.version = 2;
      else if (value == "1.1" || value == "v3")
        o.version = 3;
      else
        return fail(fmt::format("Parameter 'version' does not accept value '{}'", value));
      compat_given = true;
      compat_text = value;
    } else if (key == "backing_file") {
      backing = value;
    } else if (key == "backing_fmt") {
      backing_format = value;
    } else if (key == "cluster_size") {
      auto v = option_size(key, value);
      if (!v) return fail_size_option(v.error());
      o.cluster_size = *v;
    } else if (key == "refcount_bits") {
      char* end = nullptr;
      errno = 0;
      unsigned long v = std::strtoul(value.c_str(), &end, 10);
      if (value.empty() || *end || errno) {
        return fail("Parameter 'refcount_bits' expects a non-negative number below 2^64");
      }
      o.refcount_bits = v > 128 ? 128 : static_cast<std::uint32_t>(v);
    } else if (key == "lazy_refcounts" || key == "extended_l2" || key == "data_file_raw") {
      auto b = parse_on_off(value);
      if (!b) return fail(fmt::format("Parameter '{}' expects 'on' or 'off'", key));
      if (key == "lazy_refcounts")
        o.lazy_refcounts = *b;
      else if (key == "extended_l2")
        o.extended_l2 = *b;
      else
        o.data_file_raw = *b;
    } else if (key == "compression_type") {
      if (value == "zlib")
        o.compression_type = qc::COMPRESSION_DEFLATE;
      else if (value == "zstd")
        o.compression_type = qc::COMPRESSION_ZSTD;
      else
        return fail(fmt::format("Parameter 'compression-type' does not accept value '{}'", value));
    } else if (key == "data_file") {
      o.data_file = value;
    } else if (key == "encryption" || key == "encrypt.format") {
      return fail("Encrypted images are not supported by qnbd");
    } else {
      return fail(fmt::format("Invalid parameter '{}'", key));
    }
  }

  if (!backing.empty()) {
    if (format == "raw") return fail("Backing file not supported for file format 'raw'");
    if (backing_format.empty()) return fail("Backing file specified without backing format");
    // The backing name is stored as given; a relative one is resolved
    // against the new image's directory, as qemu does.
    std::filesystem::path bpath(backing);
    if (bpath.is_relative()) bpath = std::filesystem::path(filename).parent_path() / bpath;
    auto bsize = backing_size(bpath.string(), backing_format);
    if (!bsize) {
      if (!size) {
        return fail(fmt::format("Could not open backing image '{}': {}", backing, bsize.error().message));
      }
      std::fprintf(stderr, "qnbd: warning: Could not verify backing image '%s': %s\n", backing.c_str(),
                   bsize.error().message.c_str());
    } else if (!size) {
      size = *bsize;
    }
  }
  if (!size) {
    std::fprintf(stderr, "qnbd: %s: Image creation needs a size parameter\n", filename.c_str());
    return 1;
  }
  if (*size > (static_cast<std::uint64_t>(INT64_MAX) & ~511ull)) {
    return fail("Image size must be less than 8 EiB!");
  }
  const std::uint64_t requested = *size;
  // qemu rounds the virtual size up to whole 512-byte sectors (qcow2_co_create_opts).
  o.size = align_up(requested, 512);
  o.backing_file = backing;
  o.backing_format = backing_format;

  if (!quiet) {
    std::string line = fmt::format("Formatting '{}', fmt={}", filename, format);
    if (format == "qcow2") {
      line += fmt::format(" cluster_size={} extended_l2={}", o.cluster_size, o.extended_l2 ? "on" : "off");
      if (prealloc_given) line += " preallocation=" + prealloc_text;
      line += fmt::format(" compression_type={} size={}", o.compression_type == qc::COMPRESSION_ZSTD ? "zstd" : "zlib",
                          requested);
      if (!backing.empty()) line += fmt::format(" backing_file={} backing_fmt={}", backing, backing_format);
      if (compat_given) line += " compat=" + compat_text;
      if (!o.data_file.empty()) line += " data_file=" + o.data_file;
      if (o.data_file_raw) line += " data_file_raw=on";
      line += fmt::format(" lazy_refcounts={} refcount_bits={}", o.lazy_refcounts ? "on" : "off", o.refcount_bits);
    } else {
      if (prealloc_given) line += " preallocation=" + prealloc_text;
      line += fmt::format(" size={}", requested);
    }
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }

  if (format == "raw") {
    auto file = image::create_posix_file(filename);
    if (!file) return fail(file.error().message);
    Result<void> r = (*file)->truncate(o.size);
    if (r && o.preallocation != qc::Preallocation::off) {
      r = (*file)->write_zeroes(0, o.size, false);
    }
    if (r) r = (*file)->flush();
    if (!r) return fail(r.error().message);
    return 0;
  }

  if (auto v = qc::validate_create_options(o); !v) return fail(v.error().message);
  auto file = image::create_posix_file(filename);
  if (!file) return fail(file.error().message);
  std::unique_ptr<image::File> data;
  if (!o.data_file.empty()) {
    std::filesystem::path dpath(o.data_file);
    if (dpath.is_relative()) dpath = std::filesystem::path(filename).parent_path() / dpath;
    auto d = image::create_posix_file(dpath.string());
    if (!d) return fail(d.error().message);
    data = std::move(*d);
  }
  if (auto r = qc::create_qcow2(**file, o, data.get()); !r) return fail(r.error().message);
  return 0;
}

}  // namespace

void add_create_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("create", "Create a new qcow2 or raw image (qemu-img create syntax)");
  struct Args {
    std::string format = "raw";
    std::vector<std::string> options;
    std::string backing, backing_format, filename, size;
    bool quiet = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("-f", args->format, "image format: qcow2 or raw (default raw, as qemu-img)");
  cmd->add_option("-o", args->options,
                  "format options: cluster_size, compat, refcount_bits, lazy_refcounts, "
                  "extended_l2, compression_type, data_file, data_file_raw, preallocation")
      ->allow_extra_args(false);
  cmd->add_option("-b", args->backing, "backing file");
  cmd->add_option("-F", args->backing_format, "backing file format");
  cmd->add_flag("-q", args->quiet, "quiet");
  cmd->add_option("FILE", args->filename, "image to create")->required();
  auto* size = cmd->add_option("SIZE", args->size, "virtual size (k, M, G, T, P, E suffixes)");
  cmd->callback([args, size, &status] {
    status = run_create(args->format, args->options, args->backing, args->backing_format, args->filename,
                        size->count() ? std::optional<std::string>(args->size) : std::nullopt, args->quiet);
  });
}

}  // namespace qnbd::cli
