// json: pseudo-filenames and --image-opts; see image_spec.hpp.
//
// Both spellings become one flat map of dotted keys (QEMU flattens a json:
// object the same way, so {"file": {"filename": X}} and {"file.filename": X}
// mean the same), then one interpreter walks the node tree and marks every
// key it uses; a key left over is an option the node does not have.
#include "config/image_spec.hpp"

#include <cerrno>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/size.hpp"
#include "config/config.hpp"

namespace qnbd::config {
namespace {

constexpr std::size_t kMaxArgumentBytes = 64 * 1024;
constexpr int kMaxDepth = 8;  // file.file.filename is the deepest key used

struct Scalar {
  enum class Kind { null, boolean, number, string } kind = Kind::string;
  std::string text;  // the string, or the number as written
};

class Options {
 public:
  Result<void> put(std::string key, Scalar v) {
    if (!map_.emplace(key, std::move(v)).second) return make_error(EINVAL, "Duplicate option '{}'", key);
    return ok();
  }
  const Scalar* find(const std::string& key) {
    auto it = map_.find(key);
    if (it == map_.end()) return nullptr;
    used_.insert(key);
    return &it->second;
  }
  bool has_prefix(const std::string& prefix) const {
    auto it = map_.lower_bound(prefix);
    return it != map_.end() && it->first.compare(0, prefix.size(), prefix) == 0;
  }
  // The first key under `prefix` nothing used (its name relative to it).
  std::optional<std::string> unused_under(const std::string& prefix) const {
    for (auto it = map_.lower_bound(prefix); it != map_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
      if (!used_.count(it->first)) return it->first.substr(prefix.size());
    return std::nullopt;
  }

 private:
  std::map<std::string, Scalar> map_;
  std::set<std::string> used_;
};

Result<void> flatten(const nlohmann::json& obj, const std::string& prefix, int depth, Options& out) {
  if (depth > kMaxDepth) return make_error(EINVAL, "Options nested deeper than {} levels", kMaxDepth);
  for (const auto& [k, v] : obj.items()) {
    const std::string key = prefix + k;
    if (v.is_object()) {
      QNBD_TRY(flatten(v, key + ".", depth + 1, out));
      continue;
    }
    Scalar s;
    if (v.is_null()) {
      s.kind = Scalar::Kind::null;
    } else if (v.is_boolean()) {
      s.kind = Scalar::Kind::boolean;
      s.text = v.get<bool>() ? "true" : "false";
    } else if (v.is_number()) {
      s.kind = Scalar::Kind::number;
      s.text = v.dump();
    } else if (v.is_string()) {
      s.text = v.get<std::string>();
    } else {
      return make_error(EINVAL, "Parameter '{}' expects a scalar value", key);
    }
    QNBD_TRY(out.put(key, std::move(s)));
  }
  return ok();
}

Result<std::string> string_option(Options& o, const std::string& key) {
  const Scalar* s = o.find(key);
  if (!s) return std::string();
  if (s->kind != Scalar::Kind::string)
    return make_error(EINVAL, "Invalid parameter type for '{}', expected: string", key);
  if (s->text.empty()) return make_error(EINVAL, "Parameter '{}' is empty", key);
  return s->text;
}

// QEMU's size parameters: a JSON number, or a string in QEMU's size syntax
// (common/size.hpp), with QemuOpts' messages.
Result<std::optional<std::uint64_t>> size_option(Options& o, const std::string& key) {
  const Scalar* s = o.find(key);
  if (!s) return std::optional<std::uint64_t>{};
  auto bad = [&] {
    return make_error(EINVAL,
                      "Parameter '{}' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)",
                      key);
  };
  if (s->kind != Scalar::Kind::number && s->kind != Scalar::Kind::string) return bad();
  const ParsedSize p = parse_qemu_size(s->text);
  if (p.status == ParsedSize::Status::out_of_range) {
    return make_error(ERANGE, "Value '{}' is out of range for parameter '{}'", one_line(s->text), key);
  }
  if (!p.ok()) return bad();
  return std::optional<std::uint64_t>{p.bytes};
}

Result<void> no_leftovers(const Options& o, const std::string& prefix, std::string_view what) {
  if (auto k = o.unused_under(prefix)) return make_error(EINVAL, "{} doesn't support the option '{}'", what, *k);
  return ok();
}

bool is_protocol(const std::string& driver) { return driver == "file" || driver == "host_device"; }

// A protocol node at `prefix` (driver file or host_device, or absent).
Result<void> protocol_node(Options& o, const std::string& prefix, ImageSpec& spec) {
  const std::string driver = QNBD_TRY(string_option(o, prefix + "driver"));
  if (!driver.empty() && !is_protocol(driver))
    return make_error(EINVAL, "unsupported block driver '{}' here (file, host_device)", driver);
  spec.filename = QNBD_TRY(string_option(o, prefix + "filename"));
  if (spec.filename.empty()) return make_error(EINVAL, "The 'file' block driver requires a file name");
  return no_leftovers(o, prefix, fmt::format("Block protocol '{}'", driver.empty() ? "file" : driver));
}

Result<void> range_options(Options& o, const std::string& prefix, ImageSpec& spec) {
  spec.offset = QNBD_TRY(size_option(o, prefix + "offset"));
  spec.size = QNBD_TRY(size_option(o, prefix + "size"));
  return ok();
}

Result<ImageSpec> interpret(Options& o) {
  ImageSpec spec;
  const std::string driver = QNBD_TRY(string_option(o, "driver"));
  if (is_protocol(driver)) {
    // The file itself, served as raw (no probing).
    spec.format = "raw";
    QNBD_TRY(protocol_node(o, "", spec));
    return spec;
  }
  if (!driver.empty() && driver != "raw" && driver != "qcow2")
    return make_error(ENOTSUP, "unsupported format '{}' (raw, qcow2)", driver);
  spec.format = driver;
  const std::string node = driver.empty() ? "Block format" : fmt::format("Block format '{}'", driver);

  if (const Scalar* backing = o.find("backing")) {
    // QEMU takes a string as the name of another node, except "" (the old
    // spelling of null). Only the qcow2 node has a backing file to drop.
    if (backing->kind == Scalar::Kind::string && !backing->text.empty())
      return make_error(EINVAL, "Cannot find device='{0}' nor node-name='{0}'", backing->text);
    if (backing->kind != Scalar::Kind::null && backing->kind != Scalar::Kind::string)
      return make_error(EINVAL, "Invalid parameter type for 'backing', expected: string or null");
    if (backing->kind == Scalar::Kind::string)
      spec.warnings.push_back("Use of \"backing\": \"\" is deprecated; use \"backing\": null instead");
    spec.no_backing = driver != "raw";
  }
  if (driver == "raw") QNBD_TRY(range_options(o, "", spec));

  if (const Scalar* file = o.find("file")) {
    if (file->kind == Scalar::Kind::string)
      return make_error(EINVAL, "Cannot find device='{0}' nor node-name='{0}'", file->text);
    return make_error(EINVAL, "Invalid parameter type for 'file', expected: object");
  }
  if (!o.has_prefix("file.")) return make_error(EINVAL, "A block device must be specified for \"file\"");
  const std::string child = QNBD_TRY(string_option(o, "file.driver"));
  if (child == "raw") {
    // A raw range between the format and the file.
    if (spec.offset || spec.size)
      return make_error(ENOTSUP, "a raw range over another raw range is not supported (give one offset and size)");
    QNBD_TRY(range_options(o, "file.", spec));
    if (const Scalar* f = o.find("file.file"); f && f->kind == Scalar::Kind::string)
      return make_error(EINVAL, "Cannot find device='{0}' nor node-name='{0}'", f->text);
    if (!o.has_prefix("file.file.")) return make_error(EINVAL, "A block device must be specified for \"file\"");
    QNBD_TRY(protocol_node(o, "file.file.", spec));
    QNBD_TRY(no_leftovers(o, "file.", "Block format 'raw'"));
  } else {
    QNBD_TRY(protocol_node(o, "file.", spec));
  }
  QNBD_TRY(no_leftovers(o, "", node));
  return spec;
}

void rebase_filenames(nlohmann::json& obj, const std::filesystem::path& base, int depth) {
  if (depth > kMaxDepth) return;
  for (auto& [k, v] : obj.items()) {
    if (v.is_object()) {
      rebase_filenames(v, base, depth + 1);
    } else if (v.is_string() && (k == "filename" || k.ends_with(".filename"))) {
      const std::filesystem::path f(v.get<std::string>());
      if (f.is_relative()) v = (base / f).string();
    }
  }
}

// Messages quote keys and values from the argument: one line, always.
Result<ImageSpec> printable(Result<ImageSpec> r) {
  if (!r) return make_error(r.error().code, "{}", one_line(r.error().message));
  return r;
}

}  // namespace

std::string rebase_image_json(const std::string& image, const std::string& base_dir) {
  if (!is_json_filename(image) || image.size() > kMaxArgumentBytes || base_dir.empty()) return image;
  auto doc = nlohmann::json::parse(std::string_view(image).substr(5), nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) return image;
  rebase_filenames(doc, base_dir, 0);
  return "json:" + doc.dump();
}

bool is_json_filename(std::string_view image) { return image.substr(0, 5) == "json:"; }

Result<ImageSpec> parse_image_json(std::string_view image) {
  if (!is_json_filename(image)) return make_error(EINVAL, "not a json: filename");
  if (image.size() > kMaxArgumentBytes) return make_error(EINVAL, "json: options longer than 64 KiB");
  const auto doc = nlohmann::json::parse(image.substr(5), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return make_error(EINVAL, "Could not parse the JSON options");
  if (!doc.is_object()) return make_error(EINVAL, "Invalid JSON object given");
  Options o;
  if (auto r = flatten(doc, "", 0, o); !r) return printable(r.error());
  return printable(interpret(o));
}

Result<ImageSpec> parse_image_opts(std::string_view text) {
  if (text.size() > kMaxArgumentBytes) return make_error(EINVAL, "--image-opts: longer than 64 KiB");
  Options o;
  for (const std::string& field : split_qemu_opts(text)) {
    const auto eq = field.find('=');
    if (eq == std::string::npos || eq == 0)
      return printable(make_error(EINVAL,
                                  "'{}' is not KEY=VALUE (--image-opts takes block options, e.g. "
                                  "driver=qcow2,file.filename=PATH)",
                                  field));
    if (auto r = o.put(field.substr(0, eq), Scalar{Scalar::Kind::string, field.substr(eq + 1)}); !r)
      return printable(r.error());
  }
  return printable(interpret(o));
}

}  // namespace qnbd::config
