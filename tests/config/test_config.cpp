// The config loader: defaults, every field, and many malformed documents, each
// of which must be refused with the JSON pointer of the defect.
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <fmt/format.h>

#include "config/config.hpp"

using qnbd::config::load_config;
using qnbd::config::parse_config;

namespace {

// The error message of a document that must be refused.
std::string error_of(std::string_view text) {
  auto r = parse_config(text);
  REQUIRE_MESSAGE(!r, "accepted: " << text);
  CHECK(r.error().code == EINVAL);
  // One line: the server logs it as is.
  CHECK(r.error().message.find('\n') == std::string::npos);
  return r.error().message;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  REQUIRE(in);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("minimal config gets the documented defaults") {
  auto r = parse_config(R"({"exports": [{"name": "", "image": "disk.qcow2"}]})");
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  const auto& c = *r;
  REQUIRE(c.exports.size() == 1);
  const auto& e = c.exports[0];
  CHECK(e.name == "");
  CHECK(e.image == "disk.qcow2");
  CHECK(e.format == "");
  CHECK_FALSE(e.read_only);
  CHECK(e.description == "");
  CHECK_FALSE(e.allocation_depth);
  CHECK(e.bitmaps.empty());
  CHECK(e.cache == "writeback");
  CHECK(e.discard == "ignore");
  REQUIRE(c.listeners.size() == 1);
  CHECK(c.listeners[0].type == "tcp");
  CHECK(c.listeners[0].host == "127.0.0.1");
  CHECK(c.listeners[0].port == 10809);
  CHECK(c.limits.max_connections == 100);
  CHECK(c.limits.handshake_timeout_seconds == 10);
  CHECK(c.limits.max_inflight_bytes_per_connection == 64u * 1024 * 1024);
  CHECK(c.limits.threads == 0);
  CHECK_FALSE(c.limits.poll_max_ns.has_value());
}

TEST_CASE("every field is read") {
  auto r = parse_config(R"({
    "$schema": "../schema.json",
    "exports": [
      {"name": "a", "image": "/srv/a.qcow2", "format": "qcow2", "read_only": true,
       "description": "disk A", "allocation_depth": true, "bitmaps": ["b0", "b1"],
       "cache": "none", "discard": "unmap", "detect_zeroes": "unmap", "aio": "native", "locking": "off",
       "recover_bitmaps": false, "recovery_chunk_size": 1048576},
      {"name": "b", "image": "b.img", "format": "raw", "cache": "unsafe", "snapshot": true},
      {"name": "c", "image": "c.qcow2", "read_only": true, "load_snapshot": "snapshot.name=s1"}
    ],
    "listeners": [
      {"type": "tcp", "host": "::1", "port": 10810},
      {"type": "unix", "path": "/run/qnbd.sock"}
    ],
    "limits": {"max_connections": 0, "handshake_timeout_seconds": 30,
               "max_inflight_bytes_per_connection": 1048576, "threads": 4, "poll_max_ns": 0}
  })");
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  const auto& c = *r;
  REQUIRE(c.exports.size() == 3);
  CHECK(c.exports[2].load_snapshot == "snapshot.name=s1");
  CHECK(c.exports[1].load_snapshot.empty());
  CHECK(c.exports[1].snapshot);
  CHECK_FALSE(c.exports[0].snapshot);
  CHECK(c.exports[0].name == "a");
  CHECK(c.exports[0].image == "/srv/a.qcow2");
  CHECK(c.exports[0].format == "qcow2");
  CHECK(c.exports[0].read_only);
  CHECK(c.exports[0].description == "disk A");
  CHECK(c.exports[0].allocation_depth);
  CHECK(c.exports[0].bitmaps == std::vector<std::string>{"b0", "b1"});
  CHECK(c.exports[0].cache == "none");
  CHECK(c.exports[0].discard == "unmap");
  CHECK(c.exports[0].detect_zeroes == "unmap");
  CHECK(c.exports[0].aio == "native");
  CHECK(c.exports[1].detect_zeroes == "off");
  CHECK(c.exports[1].aio == "threads");
  CHECK(c.exports[1].format == "raw");
  CHECK(c.exports[1].cache == "unsafe");
  CHECK(c.exports[0].locking == "off");
  CHECK(c.exports[1].locking == "auto");
  CHECK_FALSE(c.exports[0].recover_bitmaps);
  CHECK(c.exports[0].recovery_chunk_size == 1048576);
  CHECK(c.exports[1].recover_bitmaps);
  CHECK(c.exports[1].recovery_chunk_size == 0);
  REQUIRE(c.listeners.size() == 2);
  CHECK(c.listeners[0].host == "::1");
  CHECK(c.listeners[0].port == 10810);
  CHECK(c.listeners[1].type == "unix");
  CHECK(c.listeners[1].path == "/run/qnbd.sock");
  CHECK(c.limits.max_connections == 0);
  CHECK(c.limits.handshake_timeout_seconds == 30);
  CHECK(c.limits.max_inflight_bytes_per_connection == 1048576);
  CHECK(c.limits.threads == 4);
  REQUIRE(c.limits.poll_max_ns.has_value());
  CHECK(*c.limits.poll_max_ns == 0);
}

// qemu-nbd's cache modes, directsync included (O_DIRECT and write-through,
// so native AIO may go with it too).
TEST_CASE("every cache mode is read, directsync with native AIO") {
  for (const char* mode : {"writeback", "writethrough", "none", "directsync", "unsafe"}) {
    CAPTURE(mode);
    auto r = parse_config(fmt::format(R"({{"exports": [{{"name": "a", "image": "a", "cache": "{}"}}]}})", mode));
    REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
    CHECK(r->exports[0].cache == mode);
  }
  auto r = parse_config(R"({"exports": [{"name": "a", "image": "a", "cache": "directsync", "aio": "native"}]})");
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  CHECK(r->exports[0].aio == "native");
}

TEST_CASE("malformed documents name the JSON pointer and the defect") {
  struct Case {
    const char* text;
    const char* expected;  // exact message
  };
  const Case cases[] = {
      // the document
      {R"([])", "<root>: expected an object, got []"},
      {R"({})", "/exports: required key is missing"},
      {R"({"exports": [], "x": 1})", "/x: unknown key (allowed: $schema, exports, listeners, limits, control)"},
      {R"({"exports": {}})", "/exports: expected an array of exports, got {}"},
      {R"({"exports": []})", "/exports: at least one export is required"},
      {R"({"$schema": 3, "exports": []})", "/$schema: expected a string, got 3"},
      // exports
      {R"({"exports": [7]})", "/exports/0: expected an object, got 7"},
      {R"({"exports": [{"image": "a"}]})", "/exports/0/name: required key is missing"},
      {R"({"exports": [{"name": "a"}]})", "/exports/0/image: required key is missing"},
      {R"({"exports": [{"name": "a", "image": ""}]})", "/exports/0/image: must not be empty"},
      {R"({"exports": [{"name": 1, "image": "a"}]})", "/exports/0/name: expected a string, got 1"},
      {R"({"exports": [{"name": "a", "image": "a"}, {"name": "b", "image": "b", "read_only": "yes"}]})",
       R"(/exports/1/read_only: expected a boolean, got "yes")"},
      {R"({"exports": [{"name": "a", "image": "a", "readonly": true}]})",
       "/exports/0/readonly: unknown key (allowed: name, image, format, read_only, description, "
       "allocation_depth, bitmaps, cache, discard, detect_zeroes, aio, load_snapshot, snapshot, locking, recover_bitmaps, recovery_chunk_size, view_scratch_dir, "
       "view_scratch_max)"},
      {R"({"exports": [{"name": "a", "image": "a", "recover_bitmaps": "no"}]})",
       R"(/exports/0/recover_bitmaps: expected a boolean, got "no")"},
      {R"({"exports": [{"name": "a", "image": "a", "recovery_chunk_size": 100000}]})",
       "/exports/0/recovery_chunk_size: expected a power of two, got 100000"},
      {R"({"exports": [{"name": "a", "image": "a", "recovery_chunk_size": 4096}]})",
       "/exports/0/recovery_chunk_size: expected an integer in [65536, 1099511627776], got 4096"},
      {R"({"exports": [{"name": "a", "image": "a", "view_scratch_max": 0}]})",
       "/exports/0/view_scratch_max: expected an integer in [1, 4611686018427387904], got 0"},
      {R"({"exports": [{"name": "a", "image": "a", "view_scratch_max": "1G"}]})",
       R"(/exports/0/view_scratch_max: expected an integer, got "1G")"},
      {R"({"exports": [{"name": "a", "image": "a", "view_scratch_dir": ""}]})",
       "/exports/0/view_scratch_dir: must not be empty"},
      {R"({"exports": [{"name": "a", "image": "a", "view_scratch_dir": 7}]})",
       "/exports/0/view_scratch_dir: expected a string, got 7"},
      {R"({"exports": [{"name": "a", "image": "a"}, {"name": "a", "image": "b"}]})",
       R"(/exports/1/name: duplicate export name "a" (also /exports/0/name))"},
      {R"({"exports": [{"name": "a", "image": "a", "format": "vmdk"}]})",
       R"(/exports/0/format: expected one of "raw", "qcow2", "", got "vmdk")"},
      {R"({"exports": [{"name": "a", "image": "a", "format": null}]})",
       R"(/exports/0/format: expected one of "raw", "qcow2", "", got null)"},
      {R"({"exports": [{"name": "a", "image": "a", "cache": "direct"}]})",
       R"(/exports/0/cache: expected one of "writeback", "writethrough", "none", "directsync", "unsafe", got "direct")"},
      {R"({"exports": [{"name": "a", "image": "a", "discard": true}]})",
       R"(/exports/0/discard: expected one of "ignore", "unmap", got true)"},
      {R"({"exports": [{"name": "a", "image": "a", "detect_zeroes": "yes"}]})",
       R"(/exports/0/detect_zeroes: expected one of "off", "on", "unmap", got "yes")"},
      {R"({"exports": [{"name": "a", "image": "a", "detect_zeroes": "unmap"}]})",
       R"(/exports/0/detect_zeroes: "unmap" needs "discard": "unmap")"},
      {R"({"exports": [{"name": "a", "image": "a", "aio": "posix"}]})",
       R"(/exports/0/aio: expected one of "threads", "native", "io_uring", got "posix")"},
      {R"({"exports": [{"name": "a", "image": "a", "load_snapshot": "s1"}]})",
       R"(/exports/0/load_snapshot: a snapshot is served read-only: needs "read_only": true)"},
      {R"({"exports": [{"name": "a", "image": "a", "read_only": true, "load_snapshot": ""}]})",
       R"(/exports/0/load_snapshot: must not be empty)"},
      {R"({"exports": [{"name": "a", "image": "a", "aio": "native"}]})",
       R"(/exports/0/aio: "native" needs "cache": "none" or "directsync" (O_DIRECT))"},
      {R"({"exports": [{"name": "a", "image": "a", "locking": false}]})",
       R"(/exports/0/locking: expected one of "auto", "on", "off", got false)"},
      {R"({"exports": [{"name": "a", "image": "a", "locking": "yes"}]})",
       R"(/exports/0/locking: expected one of "auto", "on", "off", got "yes")"},
      {R"({"exports": [{"name": "a", "image": "a", "allocation_depth": 1}]})",
       "/exports/0/allocation_depth: expected a boolean, got 1"},
      {R"({"exports": [{"name": "a", "image": "a", "description": ["x"]}]})",
       R"(/exports/0/description: expected a string, got ["x"])"},
      {R"({"exports": [{"name": "a", "image": "a", "bitmaps": "b0"}]})",
       R"(/exports/0/bitmaps: expected an array of strings, got "b0")"},
      {R"({"exports": [{"name": "a", "image": "a", "bitmaps": ["b0", 5]}]})",
       "/exports/0/bitmaps/1: expected a string, got 5"},
      {R"({"exports": [{"name": "a", "image": "a", "bitmaps": [""]}]})", "/exports/0/bitmaps/0: must not be empty"},
      {R"({"exports": [{"name": "a", "image": "a", "bitmaps": ["b0", "b1", "b0"]}]})",
       R"(/exports/0/bitmaps/2: duplicate bitmap "b0" (also /exports/0/bitmaps/0))"},
      {R"({"exports": [{"name": "a", "image": "a", "format": "raw", "bitmaps": ["b0"]}]})",
       "/exports/0/bitmaps: a raw image has no bitmaps (only qcow2 stores them)"},
      {R"({"exports": [{"name": "a\u0000b", "image": "a"}]})", "/exports/0/name: must not contain a NUL character"},
      // listeners
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": []})",
       "/listeners: at least one listener is required (or leave the key out)"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": {"type": "tcp"}})",
       R"(/listeners: expected an array of listeners, got {"type":"tcp"})"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"port": 1}]})",
       "/listeners/0/type: required key is missing"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "vsock"}]})",
       R"(/listeners/0/type: expected one of "tcp", "unix", got "vsock")"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp", "port": 0}]})",
       "/listeners/0/port: expected an integer in [1, 65535], got 0"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp", "port": 65536}]})",
       "/listeners/0/port: expected an integer in [1, 65535], got 65536"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp", "port": -1}]})",
       "/listeners/0/port: expected an integer in [1, 65535], got -1"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp", "port": "10809"}]})",
       R"(/listeners/0/port: expected an integer, got "10809")"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp", "port": 10809.5}]})",
       "/listeners/0/port: expected an integer, got 10809.5"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp", "host": ""}]})",
       "/listeners/0/host: must not be empty"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp", "path": "/s"}]})",
       "/listeners/0/path: not allowed for a tcp listener"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "unix"}]})",
       "/listeners/0/path: required key is missing for a unix listener"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "unix", "path": "/s", "port": 1}]})",
       "/listeners/0/port: not allowed for a unix listener"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "unix", "path": "/s", "mode": 1}]})",
       "/listeners/0/mode: unknown key (allowed: type, path, tls)"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "tcp"}, {"type": "tcp", "port": 10809}]})",
       "/listeners/1: duplicate listener (tcp 127.0.0.1:10809, also /listeners/0)"},
      {R"({"exports": [{"name": "", "image": "a"}], "listeners": [{"type": "unix", "path": "/s"}, {"type": "unix", "path": "/s"}]})",
       "/listeners/1: duplicate listener (unix /s, also /listeners/0)"},
      // limits
      {R"({"exports": [{"name": "", "image": "a"}], "limits": []})", "/limits: expected an object, got []"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {"max_conn": 1}})",
       "/limits/max_conn: unknown key (allowed: max_connections, handshake_timeout_seconds, "
       "max_inflight_bytes_per_connection, threads, max_connections_per_address, poll_max_ns)"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {"poll_max_ns": 1000001}})",
       "/limits/poll_max_ns: expected an integer in [0, 1000000], got 1000001"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {"max_connections": 1000001}})",
       "/limits/max_connections: expected an integer in [0, 1000000], got 1000001"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {"handshake_timeout_seconds": 0}})",
       "/limits/handshake_timeout_seconds: expected an integer in [1, 3600], got 0"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {"max_inflight_bytes_per_connection": 100}})",
       "/limits/max_inflight_bytes_per_connection: expected an integer in [65536, 4294967296], got 100"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {"threads": 1e3}})",
       "/limits/threads: expected an integer, got 1000.0"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {"threads": 18446744073709551616}})",
       "/limits/threads: expected an integer, got 1.8446744073709552e+19"},
      // keys needing RFC 6901 escapes
      {R"({"exports": [{"name": "", "image": "a", "a/b~c": 1}]})",
       "/exports/0/a~1b~0c: unknown key (allowed: name, image, format, read_only, description, "
       "allocation_depth, bitmaps, cache, discard, detect_zeroes, aio, load_snapshot, snapshot, locking, recover_bitmaps, recovery_chunk_size, view_scratch_dir, "
       "view_scratch_max)"},
      // control characters from the file are shown escaped: one line
      {R"({"exports": [{"name": "", "image": "a", "x\ny": 1}]})",
       "/exports/0/x\\ny: unknown key (allowed: name, image, format, read_only, description, "
       "allocation_depth, bitmaps, cache, discard, detect_zeroes, aio, load_snapshot, snapshot, locking, recover_bitmaps, recovery_chunk_size, view_scratch_dir, "
       "view_scratch_max)"},
      {R"({"exports": [{"name": "a\u0001", "image": "a"}, {"name": "a\u0001", "image": "b"}]})",
       R"(/exports/1/name: duplicate export name "a\x01" (also /exports/0/name))"},
      // repeated keys, which a plain JSON parser would silently merge
      {R"({"exports": [{"name": "a", "image": "a", "read_only": true, "read_only": false}]})",
       "/exports/0/read_only: duplicate key"},
      {R"({"exports": [{"name": "", "image": "a"}], "limits": {}, "limits": {}})", "/limits: duplicate key"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.text);
    CHECK(error_of(c.text) == c.expected);
  }
}

TEST_CASE("JSON syntax errors say where") {
  CHECK(error_of("").starts_with("JSON syntax error at line 1, column 1"));
  CHECK(error_of("{\"exports\": [\n  {\"name\": \"a\",}\n]}").starts_with("JSON syntax error at line 2, column"));
  CHECK(error_of("{\"exports\": []} trailing").starts_with("JSON syntax error at line 1"));
  CHECK(error_of("{\"a\": \"\xff\"}").starts_with("JSON syntax error"));  // invalid UTF-8
  CHECK(error_of("// comment\n{}").starts_with("JSON syntax error"));
}

TEST_CASE("deep nesting is refused, not recursed into") {
  std::string deep(100000, '[');
  CHECK(error_of(deep).starts_with("JSON syntax error"));  // unterminated
  std::string closed = R"({"exports": )" + std::string(40, '[') + std::string(40, ']') + "}";
  CHECK(error_of(closed).find("nested deeper than 32 levels") != std::string::npos);
}

TEST_CASE("load_config reads a file, prefixes errors with its path, resolves relative images") {
  const auto dir = std::filesystem::path(QNBD_TEST_BINARY_DIR) / "tests" / "config-tmp";
  std::filesystem::create_directories(dir);
  const auto good = dir / "good.json";
  {
    std::ofstream out(good);
    out << R"({"exports": [{"name": "a", "image": "a.qcow2"}, {"name": "b", "image": "/abs/b.raw"}]})";
  }
  auto r = load_config(good.string());
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  CHECK(r->exports[0].image == (dir / "a.qcow2").string());
  CHECK(r->exports[1].image == "/abs/b.raw");

  const auto bad = dir / "bad.json";
  {
    std::ofstream out(bad);
    out << R"({"exports": [{"name": "a", "image": "a", "read_only": "yes"}]})";
  }
  auto b = load_config(bad.string());
  REQUIRE(!b);
  CHECK(b.error().message == bad.string() + R"(: /exports/0/read_only: expected a boolean, got "yes")");

  auto missing = load_config((dir / "does-not-exist.json").string());
  REQUIRE(!missing);
  CHECK(missing.error().code == ENOENT);
  CHECK(missing.error().message.find("does-not-exist.json: cannot open") != std::string::npos);

  auto directory = load_config(dir.string());
  REQUIRE(!directory);
  CHECK(directory.error().message.find("not a regular file") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("the shipped examples load") {
  const auto examples = std::filesystem::path(QNBD_TEST_SOURCE_DIR) / "config" / "examples";
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(examples)) {
    if (entry.path().extension() != ".json") continue;
    CAPTURE(entry.path().string());
    auto r = load_config(entry.path().string());
    CHECK_MESSAGE(r, (r ? "" : r.error().message));
    ++count;
  }
  CHECK(count >= 2);
}

TEST_CASE("the schema is valid JSON naming every key the loader accepts") {
  const auto schema = read_file(std::filesystem::path(QNBD_TEST_SOURCE_DIR) / "config" / "schema.json");
  // The loader itself rejects the schema as a config, but must parse it as
  // JSON: an error about a key, not about syntax.
  auto r = parse_config(schema);
  REQUIRE(!r);
  CHECK_FALSE(r.error().message.starts_with("JSON syntax error"));
  for (const char* key : {"exports",
                          "listeners",
                          "limits",
                          "name",
                          "image",
                          "format",
                          "read_only",
                          "description",
                          "allocation_depth",
                          "bitmaps",
                          "cache",
                          "discard",
                          "detect_zeroes",
                          "aio",
                          "load_snapshot",
                          "snapshot",
                          "locking",
                          "type",
                          "host",
                          "port",
                          "path",
                          "max_connections",
                          "handshake_timeout_seconds",
                          "max_inflight_bytes_per_connection",
                          "threads"}) {
    CAPTURE(key);
    CHECK(schema.find(std::string("\"") + key + "\"") != std::string::npos);
  }
}

TEST_CASE("mutated examples never throw or crash, and are accepted or refused with one line") {
  const auto examples = std::filesystem::path(QNBD_TEST_SOURCE_DIR) / "config" / "examples";
  const auto text = read_file(examples / "multi.json");
  // Seeded, so a failure reproduces.
  std::uint64_t state = 0x9e3779b97f4a7c15ull;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const char alphabet[] = "{}[]\",:0123456789-.eE tfnul\\/~x\x00\xff";
  int accepted = 0, refused = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string mutated = text;
    const int edits = 1 + static_cast<int>(next() % 4);
    for (int e = 0; e < edits && !mutated.empty(); ++e) {
      const std::size_t pos = next() % mutated.size();
      const char c = alphabet[next() % (sizeof alphabet - 1)];
      switch (next() % 3) {
        case 0: mutated[pos] = c; break;
        case 1: mutated.insert(pos, 1, c); break;
        default: mutated.erase(pos, 1); break;
      }
    }
    CAPTURE(mutated);
    qnbd::Result<qnbd::config::Config> r = qnbd::Error{};
    REQUIRE_NOTHROW(r = parse_config(mutated));
    if (r) {
      ++accepted;
    } else {
      ++refused;
      CHECK(r.error().message.find('\n') == std::string::npos);
      CHECK_FALSE(r.error().message.empty());
    }
  }
  // Both outcomes must occur, or the mutation is not exercising anything.
  CHECK(accepted > 0);
  CHECK(refused > 0);
}
