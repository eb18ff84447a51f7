#include "protocol/control.hpp"

#include <algorithm>
#include <cerrno>
#include <set>

#include <fmt/format.h>

namespace qnbd::protocol::control {
namespace {

using nlohmann::json;

struct Bad {
  ErrorCode code;
  std::string message;
};

// Nesting depth of the JSON text, counted outside strings, so a line of a
// million '[' is refused before the parser builds a million arrays.
bool too_deep(std::string_view s) {
  unsigned depth = 0;
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"')
      in_string = true;
    else if (c == '[' || c == '{') {
      if (++depth > max_depth) return true;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// Reads the arguments object of one command, refusing unknown keys.
class Args {
 public:
  explicit Args(const json& a) : a_(a) {}

  // Export names may be empty ("" is the default export, proto.md
  // "Option types"); bitmap names and paths may not.
  std::string str(const char* key, bool required, std::size_t max_bytes, bool allow_empty = false) {
    const json* v = get(key, required);
    if (!v) return {};
    if (!v->is_string()) throw Bad{ErrorCode::invalid_argument, msg("'{}' must be a string", key)};
    std::string s = v->get<std::string>();
    if (s.empty() && !allow_empty) throw Bad{ErrorCode::invalid_argument, msg("'{}' must not be empty", key)};
    if (s.size() > max_bytes)
      throw Bad{ErrorCode::invalid_argument, msg("'{}' is longer than {} bytes", key, max_bytes)};
    if (s.find('\0') != std::string::npos) throw Bad{ErrorCode::invalid_argument, msg("'{}' contains a NUL byte", key)};
    return s;
  }
  bool flag(const char* key) {
    const json* v = get(key, false);
    if (!v) return false;
    if (!v->is_boolean()) throw Bad{ErrorCode::invalid_argument, msg("'{}' must be true or false", key)};
    return v->get<bool>();
  }
  // A granularity: a power of two from 512 B to 2 GiB (qcow2.txt "Bitmap
  // directory": granularity_bits 9..31), or absent (0).
  std::uint64_t granularity(const char* key) {
    const json* v = get(key, false);
    if (!v) return 0;
    if (!v->is_number_unsigned()) throw Bad{ErrorCode::invalid_argument, msg("'{}' must be a positive integer", key)};
    const std::uint64_t g = v->get<std::uint64_t>();
    if (g < 512 || g > (1ull << 31) || (g & (g - 1)) != 0) {
      throw Bad{ErrorCode::invalid_argument, msg("'{}' must be a power of 2 from 512 to 2147483648", key)};
    }
    return g;
  }
  std::vector<std::string> strings(const char* key, bool required, std::size_t max_bytes, bool allow_empty = false) {
    const json* v = get(key, required);
    if (!v) return {};
    if (!v->is_array()) throw Bad{ErrorCode::invalid_argument, msg("'{}' must be an array of strings", key)};
    if (v->size() > max_list_items)
      throw Bad{ErrorCode::invalid_argument, msg("'{}' has more than {} items", key, max_list_items)};
    if (required && v->empty()) throw Bad{ErrorCode::invalid_argument, msg("'{}' must not be empty", key)};
    std::vector<std::string> out;
    std::set<std::string> seen;
    for (const json& e : *v) {
      if (!e.is_string() || (!allow_empty && e.get_ref<const std::string&>().empty()) ||
          e.get_ref<const std::string&>().size() > max_bytes) {
        throw Bad{ErrorCode::invalid_argument,
                  msg("'{}' must hold non-empty strings of at most {} bytes", key, max_bytes)};
      }
      if (!seen.insert(e.get<std::string>()).second) {
        throw Bad{ErrorCode::invalid_argument, msg("'{}' names '{}' twice", key, e.get<std::string>())};
      }
      out.push_back(e.get<std::string>());
    }
    return out;
  }
  // Every key must have been asked for.
  void done() {
    for (auto it = a_.begin(); it != a_.end(); ++it) {
      if (!used_.count(it.key()))
        throw Bad{ErrorCode::invalid_argument, msg("unknown argument {}", dump(json(it.key())))};
    }
  }

 private:
  template <typename... T>
  static std::string msg(fmt::format_string<T...> f, T&&... args) {
    return fmt::format(f, std::forward<T>(args)...);
  }
  const json* get(const char* key, bool required) {
    used_.insert(key);
    auto it = a_.find(key);
    if (it == a_.end() || it->is_null()) {
      if (required) throw Bad{ErrorCode::invalid_argument, msg("missing argument '{}'", key)};
      return nullptr;
    }
    return &*it;
  }
  const json& a_;
  std::set<std::string> used_;
};

Command parse_command(const std::string& name, const json& arguments) {
  Args a(arguments);
  Command cmd;
  auto simple = [&](BitmapSimple::Kind k) {
    BitmapSimple c;
    c.kind = k;
    c.export_name = a.str("export", true, max_name_bytes, true);
    c.name = a.str("name", true, max_bitmap_name_bytes);
    return c;
  };
  if (name == "status") {
    cmd = Status{};
  } else if (name == "bitmap-add") {
    BitmapAdd c;
    c.export_name = a.str("export", true, max_name_bytes, true);
    c.name = a.str("name", true, max_bitmap_name_bytes);
    c.granularity = a.granularity("granularity");
    c.disabled = a.flag("disabled");
    cmd = c;
  } else if (name == "bitmap-remove") {
    cmd = simple(BitmapSimple::Kind::remove);
  } else if (name == "bitmap-clear") {
    cmd = simple(BitmapSimple::Kind::clear);
  } else if (name == "bitmap-enable") {
    cmd = simple(BitmapSimple::Kind::enable);
  } else if (name == "bitmap-disable") {
    cmd = simple(BitmapSimple::Kind::disable);
  } else if (name == "bitmap-merge") {
    BitmapMerge c;
    c.export_name = a.str("export", true, max_name_bytes, true);
    c.target = a.str("target", true, max_bitmap_name_bytes);
    c.sources = a.strings("sources", true, max_bitmap_name_bytes);
    cmd = c;
  } else if (name == "export-add") {
    ExportAdd c;
    c.name = a.str("name", true, max_name_bytes, true);
    c.image = a.str("image", true, 4096);
    c.format = a.str("format", false, 16);
    if (!c.format.empty() && c.format != "raw" && c.format != "qcow2") {
      throw Bad{ErrorCode::invalid_argument, "'format' must be \"raw\" or \"qcow2\""};
    }
    c.read_only = a.flag("read-only");
    c.bitmaps = a.strings("bitmaps", false, max_bitmap_name_bytes);
    c.allocation_depth = a.flag("allocation-depth");
    cmd = c;
  } else if (name == "export-remove") {
    ExportRemove c;
    c.name = a.str("name", true, max_name_bytes, true);
    c.force = a.flag("force");
    cmd = c;
  } else if (name == "checkpoint") {
    Checkpoint c;
    c.name = a.str("name", true, max_bitmap_name_bytes);
    c.disable = a.str("disable", false, max_bitmap_name_bytes);
    c.exports = a.strings("exports", true, max_name_bytes, true);
    c.granularity = a.granularity("granularity");
    if (c.disable == c.name) throw Bad{ErrorCode::invalid_argument, "'disable' must differ from 'name'"};
    c.views = a.strings("views", false, max_name_bytes, true);
    for (const std::string& v : c.views) {
      if (std::find(c.exports.begin(), c.exports.end(), v) == c.exports.end())
        throw Bad{ErrorCode::invalid_argument,
                  fmt::format("'views' names {} which is not in 'exports'", dump(json(v)))};
    }
    cmd = c;
  } else if (name == "view-end") {
    ViewEnd c;
    c.views = a.strings("views", false, max_name_bytes + 1 + max_bitmap_name_bytes, true);
    c.checkpoint = a.str("checkpoint", false, max_bitmap_name_bytes);
    if (c.views.empty() == c.checkpoint.empty())
      throw Bad{ErrorCode::invalid_argument, "give either 'views' or 'checkpoint'"};
    cmd = c;
  } else {
    throw Bad{ErrorCode::unknown_command, "unknown command " + dump(json(name))};
  }
  a.done();
  return cmd;
}

}  // namespace

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::parse_error: return "parse-error";
    case ErrorCode::unknown_command: return "unknown-command";
    case ErrorCode::invalid_argument: return "invalid-argument";
    case ErrorCode::not_found: return "not-found";
    case ErrorCode::exists: return "exists";
    case ErrorCode::busy: return "busy";
    case ErrorCode::not_supported: return "not-supported";
    case ErrorCode::io_error: return "io-error";
  }
  return "io-error";
}

ErrorCode error_code_for_errno(int err) {
  switch (err) {
    case ENOENT: return ErrorCode::not_found;
    case EEXIST: return ErrorCode::exists;
    case EBUSY: return ErrorCode::busy;
    case ENOTSUP:
    case EROFS:
    case EPERM: return ErrorCode::not_supported;
    case EINVAL:
    case EFBIG:
    case ERANGE:
    case ENAMETOOLONG: return ErrorCode::invalid_argument;
    default: return ErrorCode::io_error;
  }
}

std::variant<Request, Refusal> parse_request(std::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (line.size() > max_line_bytes)
    return Refusal{nullptr, ErrorCode::parse_error, "request line is longer than 1 MiB"};
  if (too_deep(line)) return Refusal{nullptr, ErrorCode::parse_error, "request nests deeper than 16 levels"};
  json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Refusal{nullptr, ErrorCode::parse_error, "request is not valid JSON"};
  if (!j.is_object()) return Refusal{nullptr, ErrorCode::parse_error, "request is not a JSON object"};
  json id = nullptr;
  if (auto it = j.find("id"); it != j.end()) {
    if (!it->is_string() && !it->is_number() && !it->is_null()) {
      return Refusal{nullptr, ErrorCode::invalid_argument, "'id' must be a string, a number or null"};
    }
    id = *it;
  }
  try {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() != "id" && it.key() != "command" && it.key() != "arguments") {
        throw Bad{ErrorCode::invalid_argument, "unknown request member " + dump(json(it.key()))};
      }
    }
    auto c = j.find("command");
    if (c == j.end() || !c->is_string()) throw Bad{ErrorCode::invalid_argument, "'command' must be a string"};
    static const json empty = json::object();
    const json* arguments = &empty;
    if (auto a = j.find("arguments"); a != j.end() && !a->is_null()) {
      if (!a->is_object()) throw Bad{ErrorCode::invalid_argument, "'arguments' must be an object"};
      arguments = &*a;
    }
    Request r;
    r.id = id;
    r.command = c->get<std::string>();
    r.cmd = parse_command(r.command, *arguments);
    return r;
  } catch (const Bad& b) {
    return Refusal{id, b.code, b.message};
  } catch (const std::exception& e) {  // nlohmann type errors: none expected, refused all the same
    return Refusal{id, ErrorCode::invalid_argument, e.what()};
  }
}

std::string encode_result(const json& id, const json& result) {
  json r = json::object();
  r["id"] = id;
  r["result"] = result;
  return dump(r) + "\n";
}

std::string encode_error(const json& id, ErrorCode code, std::string_view message) {
  json r = json::object();
  r["id"] = id;
  r["error"] = json{{"code", error_code_name(code)}, {"message", std::string(message)}};
  return dump(r) + "\n";
}

void LineBuffer::feed(std::string_view bytes) {
  if (next_ready_ == ready_.size()) {
    ready_.clear();
    next_ready_ = 0;
  }
  while (!bytes.empty()) {
    const std::size_t nl = bytes.find('\n');
    const std::string_view part = bytes.substr(0, nl);
    if (!skipping_) {
      if (buf_.size() + part.size() > max_) {
        skipping_ = true;
        buf_.clear();
        buf_.shrink_to_fit();
      } else {
        buf_.append(part);
      }
    }
    if (nl == std::string_view::npos) return;
    ready_.push_back(Line{skipping_ ? std::string() : std::move(buf_), skipping_});
    buf_.clear();
    skipping_ = false;
    bytes.remove_prefix(nl + 1);
  }
}

std::optional<LineBuffer::Line> LineBuffer::next() {
  if (next_ready_ == ready_.size()) return std::nullopt;
  return std::move(ready_[next_ready_++]);
}

}  // namespace qnbd::protocol::control
