// Strict JSON configuration loader. nlohmann::json stays inside this file;
// every exception it may throw is caught here and turned into an Error.
#include "config/config.hpp"
#include "config/image_spec.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <optional>
#include <set>

#include <nlohmann/json.hpp>

namespace qnbd::config {
// Keys and names come from the file and may hold control characters; the
// message must stay one printable line, so those are shown escaped.
std::string one_line(std::string_view text) {
  std::string out;
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (u < 0x20 || u == 0x7f) {
      out += fmt::format("\\x{:02x}", u);
    } else {
      out += c;
    }
  }
  return out;
}

namespace {

using nlohmann::json;

// Deeper nesting than this is never a valid config; refusing it early keeps
// the duplicate-key tracker and error messages bounded.
constexpr std::size_t max_depth = 32;

// RFC 6901 escaping of one reference token.
std::string escape_token(std::string_view token) {
  std::string out;
  for (char c : token) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

std::string child(const std::string& pointer, std::string_view key) { return pointer + "/" + escape_token(key); }
std::string child(const std::string& pointer, std::size_t index) { return pointer + "/" + std::to_string(index); }

// The pointer of the document itself is "", which reads badly in a message.
std::string shown(const std::string& pointer) { return pointer.empty() ? "<root>" : pointer; }

// The offending value as it would appear in JSON, cut short so one message
// stays one readable line.
std::string describe(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  constexpr std::size_t limit = 60;
  if (s.size() > limit) {
    s.resize(limit - 3);
    s += "...";
  }
  return s;
}

template <typename... Args>
Error fail(const std::string& pointer, fmt::format_string<Args...> format, Args&&... args) {
  return Error{EINVAL, one_line(shown(pointer) + ": " + fmt::format(format, std::forward<Args>(args)...))};
}

Result<void> expect_object(const json& v, const std::string& pointer, std::initializer_list<std::string_view> allowed) {
  if (!v.is_object()) return fail(pointer, "expected an object, got {}", describe(v));
  for (const auto& [key, value] : v.items()) {
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
      std::string names;
      for (auto name : allowed) {
        if (!names.empty()) names += ", ";
        names += name;
      }
      return fail(child(pointer, key), "unknown key (allowed: {})", names);
    }
  }
  return ok();
}

const json* find(const json& object, std::string_view key) {
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

Result<std::string> as_string(const json& v, const std::string& pointer, std::size_t max_bytes, bool allow_empty) {
  if (!v.is_string()) return fail(pointer, "expected a string, got {}", describe(v));
  const auto& s = v.get_ref<const std::string&>();
  if (!allow_empty && s.empty()) return fail(pointer, "must not be empty");
  if (s.size() > max_bytes) {
    return fail(pointer, "too long ({} bytes, at most {})", s.size(), max_bytes);
  }
  // Names and paths end up in C strings and on the wire; an embedded NUL
  // would silently cut them short.
  if (s.find('\0') != std::string::npos) return fail(pointer, "must not contain a NUL character");
  return s;
}

Result<bool> as_bool(const json& v, const std::string& pointer) {
  if (!v.is_boolean()) return fail(pointer, "expected a boolean, got {}", describe(v));
  return v.get<bool>();
}

Result<std::uint64_t> as_integer(const json& v, const std::string& pointer, std::uint64_t min, std::uint64_t max) {
  // 10.0 is a float to nlohmann and refused: a limit is a count, not a measure.
  if (!v.is_number_integer()) return fail(pointer, "expected an integer, got {}", describe(v));
  bool in_range;
  std::uint64_t value = 0;
  if (v.is_number_unsigned()) {
    value = v.get<std::uint64_t>();
    in_range = value >= min && value <= max;
  } else {
    auto signed_value = v.get<std::int64_t>();
    in_range = signed_value >= 0 && static_cast<std::uint64_t>(signed_value) >= min &&
               static_cast<std::uint64_t>(signed_value) <= max;
    value = static_cast<std::uint64_t>(signed_value);
  }
  if (!in_range) return fail(pointer, "expected an integer in [{}, {}], got {}", min, max, describe(v));
  return value;
}

Result<std::string> as_enum(const json& v, const std::string& pointer, std::initializer_list<std::string_view> values) {
  std::string names;
  for (auto name : values) {
    if (!names.empty()) names += ", ";
    names += fmt::format("\"{}\"", name);
  }
  if (!v.is_string()) return fail(pointer, "expected one of {}, got {}", names, describe(v));
  const auto& s = v.get_ref<const std::string&>();
  if (std::find(values.begin(), values.end(), s) == values.end()) {
    return fail(pointer, "expected one of {}, got {}", names, describe(v));
  }
  return s;
}

Result<ExportConfig> read_export(const json& v, const std::string& pointer) {
  QNBD_TRY(expect_object(v, pointer,
                         {"name", "image", "format", "read_only", "description", "allocation_depth", "bitmaps", "cache",
                          "discard", "detect_zeroes", "aio", "load_snapshot", "snapshot", "locking", "recover_bitmaps",
                          "recovery_chunk_size", "view_scratch_dir", "view_scratch_max"}));
  ExportConfig e;
  const json* name = find(v, "name");
  if (name == nullptr) return fail(child(pointer, "name"), "required key is missing");
  e.name = QNBD_TRY(as_string(*name, child(pointer, "name"), max_name_bytes, true));
  const json* image = find(v, "image");
  if (image == nullptr) return fail(child(pointer, "image"), "required key is missing");
  e.image = QNBD_TRY(as_string(*image, child(pointer, "image"), PATH_MAX, false));
  // A json: image (QEMU's block options, config/image_spec.hpp) is checked
  // now, as every other key is.
  if (is_json_filename(e.image)) {
    if (auto spec = parse_image_json(e.image); !spec) return fail(child(pointer, "image"), "{}", spec.error().message);
  }
  if (const json* x = find(v, "format")) {
    e.format = QNBD_TRY(as_enum(*x, child(pointer, "format"), {"raw", "qcow2", ""}));
  }
  if (const json* x = find(v, "read_only")) e.read_only = QNBD_TRY(as_bool(*x, child(pointer, "read_only")));
  if (const json* x = find(v, "description")) {
    e.description = QNBD_TRY(as_string(*x, child(pointer, "description"), max_name_bytes, true));
  }
  if (const json* x = find(v, "allocation_depth")) {
    e.allocation_depth = QNBD_TRY(as_bool(*x, child(pointer, "allocation_depth")));
  }
  if (const json* x = find(v, "bitmaps")) {
    const std::string bitmaps_pointer = child(pointer, "bitmaps");
    if (!x->is_array()) return fail(bitmaps_pointer, "expected an array of strings, got {}", describe(*x));
    std::map<std::string, std::size_t> seen;
    for (std::size_t i = 0; i < x->size(); ++i) {
      auto bitmap = QNBD_TRY(as_string((*x)[i], child(bitmaps_pointer, i), max_bitmap_name_bytes, false));
      auto [it, inserted] = seen.emplace(bitmap, i);
      if (!inserted) {
        return fail(child(bitmaps_pointer, i), "duplicate bitmap \"{}\" (also {})", bitmap,
                    child(bitmaps_pointer, it->second));
      }
      e.bitmaps.push_back(std::move(bitmap));
    }
    if (e.format == "raw" && !e.bitmaps.empty()) {
      return fail(bitmaps_pointer, "a raw image has no bitmaps (only qcow2 stores them)");
    }
  }
  if (const json* x = find(v, "cache")) {
    e.cache =
        QNBD_TRY(as_enum(*x, child(pointer, "cache"), {"writeback", "writethrough", "none", "directsync", "unsafe"}));
  }
  if (const json* x = find(v, "discard")) {
    e.discard = QNBD_TRY(as_enum(*x, child(pointer, "discard"), {"ignore", "unmap"}));
  }
  // qemu-nbd's --detect-zeroes and --aio, refused where qemu-nbd refuses
  // them: unmapping zeroes needs discard unmap, native AIO needs O_DIRECT.
  if (const json* x = find(v, "detect_zeroes")) {
    e.detect_zeroes = QNBD_TRY(as_enum(*x, child(pointer, "detect_zeroes"), {"off", "on", "unmap"}));
    if (e.detect_zeroes == "unmap" && e.discard != "unmap")
      return fail(child(pointer, "detect_zeroes"), "\"unmap\" needs \"discard\": \"unmap\"");
  }
  if (const json* x = find(v, "aio")) {
    e.aio = QNBD_TRY(as_enum(*x, child(pointer, "aio"), {"threads", "native", "io_uring"}));
    if (e.aio == "native" && e.cache != "none" && e.cache != "directsync")
      return fail(child(pointer, "aio"), "\"native\" needs \"cache\": \"none\" or \"directsync\" (O_DIRECT)");
  }
  if (const json* x = find(v, "load_snapshot")) {
    const std::string p = child(pointer, "load_snapshot");
    e.load_snapshot = QNBD_TRY(as_string(*x, p, max_name_bytes, false));
    if (!e.read_only) return fail(p, "a snapshot is served read-only: needs \"read_only\": true");
  }
  if (const json* x = find(v, "snapshot")) e.snapshot = QNBD_TRY(as_bool(*x, child(pointer, "snapshot")));
  if (const json* x = find(v, "locking")) {
    e.locking = QNBD_TRY(as_enum(*x, child(pointer, "locking"), {"auto", "on", "off"}));
  }
  if (const json* x = find(v, "recover_bitmaps")) {
    e.recover_bitmaps = QNBD_TRY(as_bool(*x, child(pointer, "recover_bitmaps")));
  }
  if (const json* x = find(v, "recovery_chunk_size")) {
    const std::string p = child(pointer, "recovery_chunk_size");
    auto n = static_cast<std::uint64_t>(QNBD_TRY(as_integer(*x, p, 65536, 1ull << 40)));
    if (n & (n - 1)) return fail(p, "expected a power of two, got {}", n);
    e.recovery_chunk_size = n;
  }
  if (const json* x = find(v, "view_scratch_dir")) {
    e.view_scratch_dir = QNBD_TRY(as_string(*x, child(pointer, "view_scratch_dir"), PATH_MAX, false));
  }
  if (const json* x = find(v, "view_scratch_max")) {
    e.view_scratch_max =
        static_cast<std::uint64_t>(QNBD_TRY(as_integer(*x, child(pointer, "view_scratch_max"), 1, 1ull << 62)));
  }
  return e;
}

Result<TlsConfig> read_tls(const json& v, const std::string& pointer) {
  QNBD_TRY(expect_object(v, pointer, {"creds", "dir", "verify_peer", "authz"}));
  TlsConfig t;
  t.id = "listener " + pointer;
  const json* creds = find(v, "creds");
  if (creds == nullptr) return fail(child(pointer, "creds"), "required key is missing");
  t.creds = QNBD_TRY(as_enum(*creds, child(pointer, "creds"), {"x509", "psk"}));
  const json* dir = find(v, "dir");
  if (dir == nullptr) return fail(child(pointer, "dir"), "required key is missing");
  t.dir = QNBD_TRY(as_string(*dir, child(pointer, "dir"), PATH_MAX, false));
  if (const json* x = find(v, "verify_peer")) {
    if (t.creds == "psk") return fail(child(pointer, "verify_peer"), "only for x509 credentials");
    t.verify_peer = QNBD_TRY(as_bool(*x, child(pointer, "verify_peer")));
  }
  if (const json* x = find(v, "authz")) {
    const std::string ap = child(pointer, "authz");
    if (!x->is_array() || x->empty())
      return fail(ap, "expected a non-empty array of client DNs or PSK usernames, got {}", describe(*x));
    if (t.creds == "x509" && !t.verify_peer)
      return fail(ap, "needs verify_peer (an unverified certificate proves no identity)");
    for (std::size_t i = 0; i < x->size(); ++i)
      t.authz.push_back(QNBD_TRY(as_string((*x)[i], child(ap, i), max_name_bytes, false)));
    t.authz_id = "authz " + ap;
  }
  return t;
}

Result<ListenerConfig> read_listener(const json& v, const std::string& pointer) {
  if (!v.is_object()) return fail(pointer, "expected an object, got {}", describe(v));
  const json* type = find(v, "type");
  if (type == nullptr) return fail(child(pointer, "type"), "required key is missing");
  ListenerConfig l;
  l.type = QNBD_TRY(as_enum(*type, child(pointer, "type"), {"tcp", "unix"}));
  if (l.type == "tcp") {
    if (find(v, "path") != nullptr) return fail(child(pointer, "path"), "not allowed for a tcp listener");
    QNBD_TRY(expect_object(v, pointer, {"type", "host", "port", "tls"}));
    if (const json* x = find(v, "host")) l.host = QNBD_TRY(as_string(*x, child(pointer, "host"), 255, false));
    if (const json* x = find(v, "port")) {
      l.port = static_cast<std::uint16_t>(QNBD_TRY(as_integer(*x, child(pointer, "port"), 1, 65535)));
    }
  } else {
    for (std::string_view key : {"host", "port"}) {
      if (find(v, key) != nullptr) return fail(child(pointer, key), "not allowed for a unix listener");
    }
    QNBD_TRY(expect_object(v, pointer, {"type", "path", "tls"}));
    const json* path = find(v, "path");
    if (path == nullptr) return fail(child(pointer, "path"), "required key is missing for a unix listener");
    l.path = QNBD_TRY(as_string(*path, child(pointer, "path"), max_unix_path_bytes, false));
    l.host.clear();
    l.port = 0;
  }
  if (const json* x = find(v, "tls")) {
    l.tls = QNBD_TRY(read_tls(*x, child(pointer, "tls")));
    l.has_tls = true;
  }
  return l;
}

Result<Limits> read_limits(const json& v, const std::string& pointer) {
  QNBD_TRY(expect_object(v, pointer,
                         {"max_connections", "handshake_timeout_seconds", "max_inflight_bytes_per_connection",
                          "threads", "max_connections_per_address", "poll_max_ns"}));
  Limits limits;
  if (const json* x = find(v, "max_connections")) {
    limits.max_connections = static_cast<std::uint32_t>(
        QNBD_TRY(as_integer(*x, child(pointer, "max_connections"), 0, max_connections_limit)));
  }
  if (const json* x = find(v, "handshake_timeout_seconds")) {
    limits.handshake_timeout_seconds = static_cast<std::uint32_t>(
        QNBD_TRY(as_integer(*x, child(pointer, "handshake_timeout_seconds"), 1, max_handshake_timeout_seconds)));
  }
  if (const json* x = find(v, "max_inflight_bytes_per_connection")) {
    limits.max_inflight_bytes_per_connection = QNBD_TRY(
        as_integer(*x, child(pointer, "max_inflight_bytes_per_connection"), min_inflight_bytes, max_inflight_bytes));
  }
  if (const json* x = find(v, "max_connections_per_address")) {
    limits.max_connections_per_address = static_cast<std::uint32_t>(
        QNBD_TRY(as_integer(*x, child(pointer, "max_connections_per_address"), 0, max_connections_limit)));
  }
  if (const json* x = find(v, "threads")) {
    limits.threads = static_cast<std::uint32_t>(QNBD_TRY(as_integer(*x, child(pointer, "threads"), 0, max_threads)));
  }
  if (const json* x = find(v, "poll_max_ns"))
    limits.poll_max_ns =
        static_cast<std::uint64_t>(QNBD_TRY(as_integer(*x, child(pointer, "poll_max_ns"), 0, max_poll_max_ns)));
  return limits;
}

Result<Config> read_config(const json& doc) {
  QNBD_TRY(expect_object(doc, "", {"$schema", "exports", "listeners", "limits", "control"}));
  if (const json* x = find(doc, "$schema")) QNBD_TRY(as_string(*x, "/$schema", PATH_MAX, true));

  Config config;
  const json* exports = find(doc, "exports");
  if (exports == nullptr) return fail("/exports", "required key is missing");
  if (!exports->is_array()) return fail("/exports", "expected an array of exports, got {}", describe(*exports));
  if (exports->empty()) return fail("/exports", "at least one export is required");
  std::map<std::string, std::size_t> names;
  for (std::size_t i = 0; i < exports->size(); ++i) {
    auto e = QNBD_TRY(read_export((*exports)[i], child("/exports", i)));
    auto [it, inserted] = names.emplace(e.name, i);
    if (!inserted) {
      return fail(child(child("/exports", i), "name"), "duplicate export name \"{}\" (also {})", e.name,
                  child(child("/exports", it->second), "name"));
    }
    config.exports.push_back(std::move(e));
  }

  if (const json* listeners = find(doc, "listeners")) {
    if (!listeners->is_array()) {
      return fail("/listeners", "expected an array of listeners, got {}", describe(*listeners));
    }
    if (listeners->empty()) return fail("/listeners", "at least one listener is required (or leave the key out)");
    std::map<std::string, std::size_t> seen;
    for (std::size_t i = 0; i < listeners->size(); ++i) {
      auto l = QNBD_TRY(read_listener((*listeners)[i], child("/listeners", i)));
      std::string identity = l.type == "tcp" ? fmt::format("tcp {}:{}", l.host, l.port) : "unix " + l.path;
      auto [it, inserted] = seen.emplace(identity, i);
      if (!inserted) {
        return fail(child("/listeners", i), "duplicate listener ({}, also {})", identity,
                    child("/listeners", it->second));
      }
      config.listeners.push_back(std::move(l));
    }
  } else {
    config.listeners.push_back(ListenerConfig{});
  }

  if (const json* limits = find(doc, "limits")) config.limits = QNBD_TRY(read_limits(*limits, "/limits"));
  if (const json* c = find(doc, "control"))
    config.control = QNBD_TRY(as_string(*c, "/control", max_unix_path_bytes, false));
  return config;
}

// Tracks the path of the value being parsed, so that a repeated key (which
// nlohmann would silently resolve to the last value) and excessive nesting
// can be reported with their JSON pointer.
class ParseTracker {
 public:
  bool on_event(int depth, json::parse_event_t event, const json& parsed) {
    (void)depth;
    if (problem_) return true;
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (frames_.size() >= max_depth) {
          problem_ = fail(pointer(), "nested deeper than {} levels", max_depth);
          return true;
        }
        frames_.push_back(Frame{event == json::parse_event_t::object_start, {}, {}, 0});
        break;
      case json::parse_event_t::key: {
        auto& top = frames_.back();
        top.key = parsed.get<std::string>();
        if (!top.keys.insert(top.key).second) {
          problem_ = fail(pointer(), "duplicate key");
        }
        break;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!frames_.empty()) frames_.pop_back();
        element_done();
        break;
      case json::parse_event_t::value: element_done(); break;
    }
    return true;
  }

  const std::optional<Error>& problem() const { return problem_; }

 private:
  struct Frame {
    bool is_object;
    std::set<std::string> keys;
    std::string key;
    std::size_t index;
  };

  void element_done() {
    if (!frames_.empty() && !frames_.back().is_object) ++frames_.back().index;
  }

  std::string pointer() const {
    std::string p;
    for (const auto& f : frames_) p = f.is_object ? child(p, f.key) : child(p, f.index);
    return p;
  }

  std::vector<Frame> frames_;
  std::optional<Error> problem_;
};

// nlohmann's messages start with "[json.exception.parse_error.101] parse
// error at line 3, column 5: ..."; keep the part a user can act on.
std::string syntax_message(const std::string& what) {
  std::string_view s = what;
  if (auto bracket = s.find("] "); s.starts_with("[json.exception") && bracket != s.npos) {
    s.remove_prefix(bracket + 2);
  }
  if (s.starts_with("parse error at ")) s.remove_prefix(std::strlen("parse error at "));
  return "JSON syntax error at " + std::string(s);
}

}  // namespace

Result<Config> parse_config(std::string_view json_text) {
  ParseTracker tracker;
  json doc;
  try {
    doc =
        json::parse(json_text.begin(), json_text.end(), [&tracker](int depth, json::parse_event_t event, json& parsed) {
          return tracker.on_event(depth, event, parsed);
        });
  } catch (const json::parse_error& e) {
    return Error{EINVAL, one_line(syntax_message(e.what()))};
  } catch (const std::exception& e) {
    return Error{EINVAL, one_line(fmt::format("cannot parse JSON: {}", e.what()))};
  }
  if (tracker.problem()) return *tracker.problem();
  try {
    return read_config(doc);
  } catch (const std::exception& e) {
    // The readers check every type before converting, so this is a bug in
    // this file; still, a config file must never bring the server down.
    return Error{EINVAL, one_line(fmt::format("invalid configuration: {}", e.what()))};
  }
}

Result<Config> load_config(const std::string& path) {
  // O_NONBLOCK: a FIFO must not block the open; fstat below refuses it.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    int err = errno;
    return Error{err, fmt::format("{}: cannot open: {}", path, std::strerror(err))};
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return Error{err, fmt::format("{}: cannot stat: {}", path, std::strerror(err))};
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Error{EINVAL, fmt::format("{}: not a regular file", path)};
  }
  if (static_cast<std::uint64_t>(st.st_size) > max_config_file_bytes) {
    ::close(fd);
    return Error{EFBIG, fmt::format("{}: too large ({} bytes, at most {})", path, st.st_size, max_config_file_bytes)};
  }
  std::string text(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      return Error{err, fmt::format("{}: read failed: {}", path, std::strerror(err))};
    }
    if (n == 0) break;  // the file shrank under us: parse what is there
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  text.resize(done);

  auto parsed = parse_config(text);
  if (!parsed) {
    Error e = std::move(parsed).error();
    e.message = path + ": " + e.message;
    return e;
  }
  Config config = std::move(parsed).value();
  // Relative image paths name files next to the config, not in whatever
  // directory the server happens to be started from.
  const std::filesystem::path base = std::filesystem::path(path).parent_path();
  for (auto& e : config.exports) {
    if (is_json_filename(e.image)) {
      e.image = rebase_image_json(e.image, base.string());
      continue;
    }
    std::filesystem::path image(e.image);
    if (image.is_relative() && !base.empty()) e.image = (base / image).string();
  }
  for (auto& l : config.listeners) {
    std::filesystem::path dir(l.tls.dir);
    if (l.has_tls && dir.is_relative() && !base.empty()) l.tls.dir = (base / dir).string();
  }
  return config;
}

}  // namespace qnbd::config
