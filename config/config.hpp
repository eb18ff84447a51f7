// The qnbd server configuration (a JSON file, see docs/config.md and
// config/schema.json) as plain structs, and its strict loader.
//
// Loading never throws: every defect comes back as an Error whose message
// starts with the JSON pointer of the offending key, e.g.
//   /exports/1/read_only: expected a boolean, got "yes"
// Plain data, no shared state: safe to use from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/result.hpp"

namespace qnbd::config {

struct ExportConfig {
  std::string name;    // NBD export name; "" is the default export
  std::string image;   // path of the image file (load_config resolves it
                       // against the config file's directory)
  std::string format;  // "raw", "qcow2", or "" = detect from the content
  bool read_only = false;
  std::string description;                // sent as NBD_INFO_DESCRIPTION when non-empty
  bool allocation_depth = false;          // offer the qemu:allocation-depth context
  std::vector<std::string> bitmaps;       // qcow2 bitmaps offered as qemu:dirty-bitmap:NAME
  std::string cache = "writeback";        // "writeback" | "writethrough" | "none" | "directsync" | "unsafe"
  std::string discard = "ignore";         // "ignore" | "unmap"
  std::string detect_zeroes = "off";      // "off" | "on" | "unmap" (needs discard unmap), qemu-nbd --detect-zeroes
  std::string aio = "threads";            // "threads" | "native" (needs cache none) | "io_uring", qemu-nbd --aio
  std::string load_snapshot;              // qemu-nbd -l: internal snapshot to serve (needs read_only); "" = none
  bool snapshot = false;                  // qemu-nbd -s: writes go to a temporary overlay
  std::string locking = "auto";           // "auto" | "on" | "off": QEMU-compatible image locks
  bool recover_bitmaps = true;            // crash-safe bitmaps (docs/crash-safe-bitmaps.md)
  std::uint64_t recovery_chunk_size = 0;  // bytes per record bit, power of two; 0 = default
  std::string view_scratch_dir;           // point-in-time views' scratch files; "" = beside the image
  std::uint64_t view_scratch_max = 0;     // bytes per view; 0 = the disk size
};

// TLS on one listener (docs/tls.md): with it the listener requires
// NBD_OPT_STARTTLS before anything else (NBD proto.md "FORCEDTLS mode").
struct TlsConfig {
  std::string id = "tls0";         // name in log lines (the --object id)
  std::string creds = "x509";      // "x509" (qemu's tls-creds-x509) | "psk" (tls-creds-psk)
  std::string dir;                 // x509: ca-cert.pem, server-cert.pem, server-key.pem;
                                   // psk: keys.psk (load_config resolves it)
  bool verify_peer = true;         // x509: require a client certificate signed by ca-cert.pem
  std::string authz_id;            // "" = no authz; else the --object authz-simple id
  std::vector<std::string> authz;  // client DNs (x509) or PSK usernames allowed
};

struct ListenerConfig {
  std::string type = "tcp";        // "tcp" | "unix"
  std::string host = "127.0.0.1";  // tcp only
  std::uint16_t port = 10809;      // tcp only, 1..65535
  std::string path;                // unix only: socket path
  bool has_tls = false;            // `tls` below is set
  TlsConfig tls;
};

struct Limits {
  std::uint32_t max_connections = 100;  // 0 = unlimited
  std::uint32_t handshake_timeout_seconds = 10;
  std::uint64_t max_inflight_bytes_per_connection = 64ull << 20;
  std::uint32_t threads = 0;  // 0 = one per core
  // Connections one client address may hold at once, counting those still
  // negotiating (TCP only; 0 = unlimited).
  std::uint32_t max_connections_per_address = 0;
  // Longest a connection alone on its I/O thread polls for its client's
  // next request (serve --poll-max-ns); absent = the server's default.
  std::optional<std::uint64_t> poll_max_ns;
};

struct Config {
  std::vector<ExportConfig> exports;      // at least one, names unique
  std::vector<ListenerConfig> listeners;  // defaults to one tcp 127.0.0.1:10809
  Limits limits;
  std::string control;  // control socket path (docs/control.md); "" = none
};

// Bounds enforced by the loader, exported so the docs, the schema and the
// tests agree with the code.
inline constexpr std::size_t max_name_bytes = 4096;         // NBD string limit
inline constexpr std::size_t max_bitmap_name_bytes = 1023;  // qcow2 bitmap name limit
inline constexpr std::size_t max_unix_path_bytes = 107;     // sun_path minus the NUL
inline constexpr std::uint32_t max_connections_limit = 1'000'000;
inline constexpr std::uint32_t max_handshake_timeout_seconds = 3600;
inline constexpr std::uint64_t min_inflight_bytes = 64ull << 10;  // 64 KiB
inline constexpr std::uint64_t max_inflight_bytes = 4ull << 30;   // 4 GiB
inline constexpr std::uint32_t max_threads = 1024;
inline constexpr std::uint64_t max_poll_max_ns = 1'000'000;  // 1 ms
inline constexpr std::size_t max_config_file_bytes = 16u << 20;

// The qemu-style objects of `qnbd serve --object ...` (qemu-nbd's spelling,
// docs/tls.md): tls-creds-x509, tls-creds-psk and authz-simple, then
// --tls-creds ID / --tls-authz ID pick the ones to use. Values may contain
// commas written as ",," (qemu's escaping, needed for DNs).
struct QemuObject {
  std::string qom_type;
  std::vector<std::pair<std::string, std::string>> props;  // in order, id included
  const std::string* get(std::string_view key) const;
};
[[nodiscard]] Result<QemuObject> parse_qemu_object(std::string_view text);
// TEXT with control characters escaped (\n, \t, \xNN): user strings in
// a one-line message.
[[nodiscard]] std::string one_line(std::string_view text);
// QemuOpts fields: TEXT split at single commas, ",," kept as one comma.
[[nodiscard]] std::vector<std::string> split_qemu_opts(std::string_view text);
// Build the TlsConfig from all --object arguments and the two ids. Errors
// (EINVAL) name the option: unknown object type or property, duplicate id,
// endpoint=client, missing dir, --tls-creds naming no credentials, ...
[[nodiscard]] Result<TlsConfig> tls_from_objects(const std::vector<std::string>& objects, std::string_view creds_id,
                                                 std::string_view authz_id);

// Parse and validate a configuration held in memory. Image paths are kept as
// written. Errors: EINVAL, message "POINTER: what is wrong" (or "line L,
// column C: ..." for JSON syntax errors).
[[nodiscard]] Result<Config> parse_config(std::string_view json_text);

// Read PATH, parse and validate it, then resolve relative image paths against
// the directory holding PATH. Errors are prefixed with PATH; I/O errors keep
// their errno.
[[nodiscard]] Result<Config> load_config(const std::string& path);

}  // namespace qnbd::config
