// The NBD server: listeners, per-connection sessions, exports and graceful
// shutdown. This header is Asio-free so cli/cmd_serve.cpp (and tests) stay
// cheap to compile; everything Asio lives behind it (server/internal.hpp
// lists the files and what each does).
//
// Threading: `threads` io_contexts, each run by one thread; a connection is
// placed on one of them (round robin) and runs on its own strand there (no
// locks on session state, no thread hops per request); blocking BlockDevice calls
// that wait for the disk run on a separate bounded thread pool and resume on
// the session strand; small page-cache reads/writes run inline.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/block_device.hpp"
#include "protocol/catalog.hpp"
#include "server/poll_window.hpp"

namespace qnbd::server {

class TlsCredentials;  // server/tls.hpp

// A dirty bitmap served as qemu:dirty-bitmap:NAME: its name and the handle
// BlockDevice::export_bitmap returned for it.
struct ExportedBitmap {
  std::string name;
  std::size_t handle = 0;
};

// qemu's detect-zeroes (qemu-nbd --detect-zeroes): a WRITE whose payload
// is all zero bytes is done as a write of zeroes, which on qcow2 sets zero
// clusters instead of storing data; with unmap (only with --discard=unmap)
// it may also release the space, as a WRITE_ZEROES without NO_HOLE does.
enum class DetectZeroes : std::uint8_t { off, on, unmap };

struct ExportSpec {
  protocol::ExportInfo info;                   // as advertised (info.bitmaps is filled from `bitmaps`)
  std::shared_ptr<image::BlockDevice> device;  // shared by every connection
  bool discard_unmap = false;                  // TRIM releases space (else ignored)
  DetectZeroes detect_zeroes = DetectZeroes::off;
  // At most kMaxBitmapsPerExport (export_registry.hpp); run_server refuses more.
  std::vector<ExportedBitmap> bitmaps;
  // Cheap requests may run on the io threads (false for O_DIRECT images,
  // whose every call waits for the disk).
  bool inline_io = true;
  std::string image;  // the image path (control socket status)
};

// What export-add asks for (docs/control.md "export-add"): the image is
// opened as `serve` opens its own for the same flags.
struct ExportRequest {
  std::string name;
  std::string image;   // absolute (a relative one is resolved against the server's working directory)
  std::string format;  // "", "raw" or "qcow2"
  bool read_only = false;
  std::vector<std::string> bitmaps;  // -B
  bool allocation_depth = false;     // -A
};

struct ListenerSpec {
  enum class Kind { tcp, unix_socket, inherited_fd };
  Kind kind = Kind::tcp;
  std::string host = "127.0.0.1";
  std::uint16_t port = 10809;
  std::string path;  // unix_socket
  // unix_socket: the SELinux context its socket is created with
  // (qemu-nbd --selinux-label); absent: the process's default.
  std::optional<std::string> selinux_label;
  int fd = -1;  // inherited_fd (systemd socket activation)
  // Set: TLS is required on this listener (NBD proto.md "FORCEDTLS mode").
  std::shared_ptr<const TlsCredentials> tls;
};

struct ServerOptions {
  std::vector<ExportSpec> exports;
  std::vector<ListenerSpec> listeners;
  bool persistent = true;             // false: exit after the last client leaves
  std::uint32_t max_connections = 0;  // 0 = unlimited
  // Connections one client IP address may hold, negotiating ones included
  // (0 = unlimited; Unix-socket clients are not counted).
  std::uint32_t max_connections_per_address = 0;
  std::uint32_t handshake_timeout_seconds = 10;
  std::uint64_t max_inflight_bytes = 64ull << 20;  // per connection
  std::uint32_t max_inflight_requests = 16;        // per connection
  std::uint32_t threads = 0;                       // 0 = one per core
  // Run small reads/writes/block status on the io threads instead of the
  // blocking pool (see Session::runs_inline); off = always use the pool.
  bool inline_io = true;
  // How long a connection alone on its io thread, with nothing in flight,
  // may spin for its client's next request before it sleeps (the ceiling of
  // Session's adaptive PollWindow, which says why); 0 = never.
  std::chrono::nanoseconds poll_max{PollWindow::kDefaultMax};
  // Test seam: when set, counts the spins for a next request that began
  // (tests/server/test_server.cpp checks when a connection may spin).
  std::atomic<std::uint64_t>* polls_started = nullptr;
  // The control socket's path (docs/control.md); "" = none.
  std::string control_path;
  // Opens an image for export-add, as the exports above were opened (the
  // same cache, discard, locking and bitmap recovery settings); unset =
  // export-add answers not-supported.
  std::function<Result<ExportSpec>(const ExportRequest&)> open_export;
  // Called once every listener is bound and listening (pid file, --fork).
  std::function<void()> on_listening;
};

// Listeners handed over by systemd (LISTEN_PID/LISTEN_FDS), as inherited_fd
// specs; empty if this process was not socket-activated. Clears the
// variables so children do not inherit them.
std::vector<ListenerSpec> systemd_listeners();

// Run until shutdown (signal, or last client gone when not persistent).
// Returns the process exit status; errors setting up exports or listeners
// are returned before anything is served.
[[nodiscard]] Result<int> run_server(ServerOptions options);

// ExportInfo for a device, with qemu-nbd's flag choices (qemu's nbd/server.c
// nbd_export_create).
protocol::ExportInfo describe_export(const image::BlockDevice& device, std::string name, std::string description,
                                     bool read_only, bool multi_conn, bool allocation_depth);

}  // namespace qnbd::server
