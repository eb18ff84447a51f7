// qnbd serve: export an image over NBD, with qemu-nbd's option spelling.
#include <fcntl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"
#include "common/log.hpp"
#include "config/config.hpp"
#include "image/block_device.hpp"
#include "image/offset_device.hpp"
#include "image/view/cbw.hpp"
#include "protocol/constants.hpp"
#include "server/server.hpp"
#include "server/tls.hpp"

namespace qnbd::cli {

namespace {

struct ServeArgs {
  std::string image;
  std::string socket;
  std::optional<std::string> selinux_label;  // --selinux-label, for the -k socket
  std::uint16_t port = 10809;
  std::string bind = "127.0.0.1";
  std::string export_name;
  std::string description;
  bool read_only = false;
  std::string format;  // "" = detect
  bool image_opts = false;
  std::optional<std::string> offset;  // -o, as qemu-nbd parses it (decimal, 0x hex, 0 octal)
  bool persistent = false;
  std::uint32_t shared = 1;  // qemu-nbd's default
  bool allocation_depth = false;
  bool fork = false;
  std::string pid_file;
  std::string cache;  // "" = writeback (qemu-nbd's default); -n means none
  bool nocache = false;
  std::string discard = "ignore";
  std::string detect_zeroes = "off";
  std::string aio = "threads";
  std::optional<std::string> load_snapshot;  // -l (an empty argument is a snapshot id, as for qemu-nbd)
  bool snapshot = false;                     // -s
  int verbose = 0;
  std::vector<std::string> bitmaps;
  std::string config;
  std::string control;
  std::uint32_t threads = 0;
  bool no_inline_io = false;
  std::optional<std::uint64_t> poll_max_ns;  // absent: the config file's, else the server's default
  std::uint32_t handshake_timeout = 10;
  std::vector<std::string> objects;  // --object, qemu-nbd's spelling
  std::string tls_creds;             // --tls-creds ID
  std::string tls_authz;             // --tls-authz ID
  std::uint32_t max_per_address = 0;
  LockArgs lock;
  std::string recover_bitmaps = "yes";
  std::uint64_t recovery_chunk = 0;
  std::string view_scratch_dir;
  std::uint64_t view_scratch_max = 0;
};

// How an export's image is opened and written, in qemu-nbd's words (its
// --cache, --discard, --detect-zeroes, --aio, -l and -s; the config file's keys
// of the same names).
struct OpenModes {
  std::string cache = "writeback";
  std::string discard = "ignore";
  std::string detect_zeroes = "off";
  std::string aio = "threads";
  std::optional<std::string> load_snapshot;  // none: the active layer
  bool snapshot = false;                     // -s: writes go to a temporary overlay
  bool image_opts = false;                   // --image-opts: IMAGE is block options
  std::uint64_t offset = 0;                  // -o: the export starts this far into the image
};

// qemu-nbd -l's argument: "snapshot.id=ID[,snapshot.name=NAME]" (either
// key alone too), or a bare id or name.
Result<image::SnapshotRef> parse_snapshot_ref(const std::string& s) {
  image::SnapshotRef ref;
  constexpr std::string_view kPrefix = "snapshot.";
  if (s.compare(0, kPrefix.size(), kPrefix) != 0) {
    ref.id = s;
    ref.id_or_name = true;
    return ref;
  }
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = std::min(s.find(',', pos), s.size());
    const std::string item = s.substr(pos, comma - pos);
    const std::size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
    if (key == "snapshot.id" && eq != std::string::npos) {
      ref.id = value;
      ref.has_id = true;
    } else if (key == "snapshot.name" && eq != std::string::npos) {
      ref.name = value;
      ref.has_name = true;
    } else {
      return make_error(EINVAL, "Invalid parameter '{}'", key);
    }
    pos = comma + 1;
  }
  return ref;
}

// qemu-nbd -o's argument, read as its qemu_strtou64(..., 0): decimal, or
// hex after 0x, or octal after 0; nothing else in the string.
Result<std::uint64_t> parse_offset(const std::string& s) {
  const auto bad = [&] { return make_error(EINVAL, "Invalid offset '{}'", s); };
  if (s.empty() || s[0] == '-' || s[0] == '+' || std::isspace(static_cast<unsigned char>(s[0]))) return bad();
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s.c_str(), &end, 0);
  if (errno != 0 || end != s.c_str() + s.size()) return bad();
  return static_cast<std::uint64_t>(v);
}

// --recover-bitmaps / recover_bitmaps (docs/crash-safe-bitmaps.md).
struct BitmapRecovery {
  bool enabled = true;
  std::uint64_t chunk_size = 0;  // 0 = default
};

Result<image::CacheMode> parse_cache(const std::string& s) {
  if (s == "writeback") return image::CacheMode::writeback;
  if (s == "none" || s == "off") return image::CacheMode::none;
  if (s == "directsync") return image::CacheMode::directsync;
  if (s == "writethrough") return image::CacheMode::writethrough;
  if (s == "unsafe") return image::CacheMode::unsafe;
  return make_error(EINVAL, "invalid cache mode '{}' (writeback, writethrough, none, directsync, unsafe)", s);
}

Result<image::ImageFormat> parse_format(const std::string& s) {
  if (s.empty()) return image::ImageFormat::detect;
  if (s == "raw") return image::ImageFormat::raw;
  if (s == "qcow2") return image::ImageFormat::qcow2;
  return make_error(EINVAL, "unknown format '{}' (raw, qcow2)", s);
}

Result<server::DetectZeroes> parse_detect_zeroes(const std::string& s) {
  if (s == "off") return server::DetectZeroes::off;
  if (s == "on") return server::DetectZeroes::on;
  if (s == "unmap") return server::DetectZeroes::unmap;
  return make_error(EINVAL, "Failed to parse detect_zeroes mode: invalid parameter value: {}", s);
}

// Checks the modes as qemu-nbd does, with its messages: detect-zeroes=unmap
// needs discard=unmap, aio=native needs O_DIRECT (cache none or
// directsync). The aio mode itself changes nothing here: qnbd's I/O
// threads and inline page-cache I/O serve every mode.
Result<void> check_open_modes(const std::string& path, const OpenModes& m, bool discard_unmap) {
  auto detect = QNBD_TRY(parse_detect_zeroes(m.detect_zeroes));
  if (detect == server::DetectZeroes::unmap && !discard_unmap)
    return make_error(EINVAL,
                      "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
  if (m.aio != "threads" && m.aio != "native" && m.aio != "io_uring")
    return make_error(EINVAL, "Invalid aio mode '{}'", m.aio);
  if (m.aio == "native" && m.cache != "none" && m.cache != "directsync")
    return make_error(EINVAL,
                      "Failed to blk_new_open '{}': aio=native was specified, but it requires cache.direct=on, which "
                      "was not specified.",
                      path);
  return {};
}

Result<server::ExportSpec> open_export(const std::string& image, std::string format, bool read_only,
                                       const OpenModes& modes, std::string name, std::string description,
                                       bool multi_conn, bool allocation_depth, const std::vector<std::string>& bitmaps,
                                       image::LockOptions lock, BitmapRecovery recovery = {},
                                       image::ViewOptions views = {}) {
  image::OpenOptions oo;
  // json:{...} or --image-opts: the file, its format, range and backing.
  const std::string path = QNBD_TRY(resolve_image_argument(image, modes.image_opts, format, oo));
  const std::string& discard = modes.discard;
  if (discard != "ignore" && discard != "unmap" && discard != "off" && discard != "on")
    return make_error(EINVAL, "invalid discard mode '{}' (ignore, unmap)", discard);
  const bool discard_unmap = discard == "unmap" || discard == "on";
  QNBD_TRY(check_open_modes(path, modes, discard_unmap));
  const std::uint64_t c = recovery.chunk_size;
  if (c && ((c & (c - 1)) || c < (64u << 10) || c > (1ull << 40))) {
    return make_error(EINVAL, "invalid recovery chunk size {} (a power of two from 65536 to 1 TiB)", c);
  }
  oo.format = QNBD_TRY(parse_format(format));
  if (modes.load_snapshot) {
    // qemu-nbd -o -l asks the raw node it put on top for the snapshot.
    if (modes.offset) {
      return make_error(ENOTSUP,
                        "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily "
                        "loading internal snapshots");
    }
    // qemu-nbd -s -l looks for the snapshot in its new, empty overlay.
    if (modes.snapshot) return make_error(ENOENT, "Failed to load snapshot: Can't find snapshot");
    if (!read_only) return make_error(EINVAL, "a snapshot (-l) can only be served read-only");
    oo.load_snapshot = QNBD_TRY(parse_snapshot_ref(*modes.load_snapshot));
  }
  oo.read_only = read_only;
  oo.cache = QNBD_TRY(parse_cache(modes.cache));
  oo.discard_unmap = discard_unmap;
  oo.recover_bitmaps = recovery.enabled;
  oo.recovery_chunk = recovery.chunk_size;
  // qemu-nbd's permissions: a writable export holds write and shares it
  // with nobody (qcow2), a read-only one lets readers in.
  lock.use = image::LockUse::export_;
  oo.lock = lock;
  std::shared_ptr<image::BlockDevice> dev =
      QNBD_TRY(modes.snapshot ? image::open_image_with_temporary_overlay(path, oo) : image::open_image(path, oo));
  if (lock.force_share) warn_force_share(path);
  // qemu-nbd -o: a raw node with that offset on top of the image.
  if (modes.offset) dev = QNBD_TRY(image::offset_device(std::move(dev), modes.offset, path));
  server::ExportSpec spec;
  spec.info =
      server::describe_export(*dev, std::move(name), std::move(description), read_only, multi_conn, allocation_depth);
  for (const auto& b : bitmaps) {
    if (std::any_of(spec.bitmaps.begin(), spec.bitmaps.end(), [&](const auto& e) { return e.name == b; })) continue;
    auto h = dev->export_bitmap(b);
    if (!h) return make_error(h.error().code, "{}: cannot export bitmap: {}", path, h.error().message);
    spec.bitmaps.push_back({b, *h});
  }
  if (!read_only) {
    if (auto r = dev->start_tracking(); !r) return make_error(r.error().code, "{}: {}", path, r.error().message);
  }
  spec.device = std::move(dev);
  if (!read_only && spec.device->write_gate()) {
    // A writable export that can take checkpoints can have point-in-time
    // views (docs/backup-views.md). We hold its write lock now, so scratch
    // files named after it are a dead server's (not with -s: the image is
    // only our backing file, and a writer of it may be creating one).
    if (!modes.snapshot) image::remove_stale_scratch(path, views.scratch_dir);
    spec.device = std::make_shared<image::CbwDevice>(std::move(spec.device), path, views);
  }
  spec.image = path;
  spec.discard_unmap = oo.discard_unmap;
  spec.detect_zeroes = *parse_detect_zeroes(modes.detect_zeroes);
  // With O_DIRECT or a sync per write every call waits for the disk.
  spec.inline_io = oo.cache == image::CacheMode::writeback || oo.cache == image::CacheMode::unsafe;
  return spec;
}

// Load the credentials a listener's TlsConfig names (checks the files now).
Result<std::shared_ptr<const server::TlsCredentials>> load_tls(const config::TlsConfig& t) {
  server::TlsCredsSpec spec;
  spec.kind = t.creds == "psk" ? server::TlsCredsSpec::Kind::psk : server::TlsCredsSpec::Kind::x509;
  spec.id = t.id;
  spec.dir = t.dir;
  spec.verify_peer = t.verify_peer;
  std::optional<server::TlsAuthzSpec> authz;
  if (!t.authz.empty()) authz = server::TlsAuthzSpec{t.authz_id, t.authz};
  auto creds = QNBD_TRY(server::TlsCredentials::load(spec, std::move(authz)));
  log::info("TLS required: {}", creds->describe());
  return creds;
}

// The config file's per-export keys, else the command line's flags.
image::ViewOptions view_options(const std::string& dir, std::uint64_t max, const ServeArgs& a) {
  image::ViewOptions v;
  v.scratch_dir = dir.empty() ? a.view_scratch_dir : dir;
  v.scratch_max = max ? max : a.view_scratch_max;
  return v;
}

OpenModes open_modes(const ServeArgs& a) {
  OpenModes m;
  m.cache = a.nocache ? "none" : a.cache.empty() ? "writeback" : a.cache;
  m.discard = a.discard;
  m.detect_zeroes = a.detect_zeroes;
  m.aio = a.aio;
  m.load_snapshot = a.load_snapshot;
  m.snapshot = a.snapshot;
  m.image_opts = a.image_opts;
  return m;
}

Result<server::ServerOptions> build_options(const ServeArgs& a) {
  server::ServerOptions o;
  // qemu-nbd: -n is --cache=none, and the two may not both be given.
  if (a.nocache && !a.cache.empty()) return make_error(EINVAL, "-n and --cache can only be specified once");
  if (a.selinux_label && a.socket.empty())
    return make_error(EINVAL, "--selinux-label is not permitted without --socket");
  // --object / --tls-creds / --tls-authz: TLS for the command line's listener.
  std::shared_ptr<const server::TlsCredentials> cli_tls;
  if (!a.tls_creds.empty() || !a.tls_authz.empty()) {
    auto t = QNBD_TRY(config::tls_from_objects(a.objects, a.tls_creds, a.tls_authz));
    cli_tls = QNBD_TRY(load_tls(t));
  } else if (!a.objects.empty()) {
    // Still check the objects, so a typo is not silently ignored; unused
    // credentials are fine (qemu-nbd accepts them too).
    auto t = config::tls_from_objects(a.objects, "", "");
    if (!t && t.error().code != ENOENT) return std::move(t).error();
  }
  o.max_connections_per_address = a.max_per_address;
  o.handshake_timeout_seconds = a.handshake_timeout;
  o.threads = a.threads;
  o.inline_io = !a.no_inline_io;
  if (a.poll_max_ns) o.poll_max = std::chrono::nanoseconds(*a.poll_max_ns);
  if (!a.config.empty()) {
    if (!a.image.empty()) return make_error(EINVAL, "give either --config or an IMAGE, not both");
    if (a.offset) return make_error(EINVAL, "-o/--offset is for an IMAGE, not for --config");
    auto cfg = QNBD_TRY(config::load_config(a.config));
    for (const auto& e : cfg.exports) {
      image::LockOptions lock;
      if (!image::parse_locking(e.locking, lock.locking)) return make_error(EINVAL, "bad locking '{}'", e.locking);
      const OpenModes modes{e.cache,
                            e.discard,
                            e.detect_zeroes,
                            e.aio,
                            e.load_snapshot.empty() ? std::nullopt : std::optional(e.load_snapshot),
                            e.snapshot};
      auto spec =
          QNBD_TRY(open_export(e.image, e.format, e.read_only, modes, e.name, e.description, true, e.allocation_depth,
                               e.bitmaps, lock, BitmapRecovery{e.recover_bitmaps, e.recovery_chunk_size},
                               view_options(e.view_scratch_dir, e.view_scratch_max, a)));
      o.exports.push_back(std::move(spec));
    }
    for (const auto& l : cfg.listeners) {
      server::ListenerSpec ls;
      if (l.type == "unix") {
        ls.kind = server::ListenerSpec::Kind::unix_socket;
        ls.path = l.path;
      } else {
        ls.host = l.host;
        ls.port = l.port;
      }
      if (l.has_tls) ls.tls = QNBD_TRY(load_tls(l.tls));
      o.listeners.push_back(ls);
    }
    // -k on the command line overrides the file's listeners (tests, ad hoc runs).
    if (!a.socket.empty()) {
      server::ListenerSpec ls;
      ls.kind = server::ListenerSpec::Kind::unix_socket;
      ls.path = a.socket;
      ls.selinux_label = a.selinux_label;
      ls.tls = cli_tls;
      o.listeners = {ls};
    }
    if (!a.max_per_address) o.max_connections_per_address = cfg.limits.max_connections_per_address;
    o.persistent = true;
    o.max_connections = cfg.limits.max_connections;
    o.handshake_timeout_seconds = cfg.limits.handshake_timeout_seconds;
    o.max_inflight_bytes = cfg.limits.max_inflight_bytes_per_connection;
    if (!a.threads) o.threads = cfg.limits.threads;
    if (!a.poll_max_ns && cfg.limits.poll_max_ns) o.poll_max = std::chrono::nanoseconds(*cfg.limits.poll_max_ns);
    o.control_path = cfg.control;
    // export-add on a config-file server: the defaults an export entry
    // without those keys gets (config::ExportConfig).
    o.open_export = [a](const server::ExportRequest& r) {
      const config::ExportConfig d;
      image::LockOptions lock;
      (void)image::parse_locking(d.locking, lock.locking);
      return open_export(r.image, r.format, r.read_only,
                         OpenModes{d.cache, d.discard, d.detect_zeroes, d.aio, std::nullopt}, r.name, d.description,
                         true, r.allocation_depth, r.bitmaps, lock,
                         BitmapRecovery{d.recover_bitmaps, d.recovery_chunk_size}, view_options("", 0, a));
    };
  } else {
    if (a.image.empty()) return make_error(EINVAL, "an IMAGE (or --config FILE) is required");
    // qemu-nbd's limits and words: NBD strings are at most 4096 bytes
    // (proto.md "Conventions": export names and descriptions are strings).
    if (a.export_name.size() > protocol::kMaxString) {
      return make_error(EINVAL, "export name '{}' too long", a.export_name);
    }
    if (a.description.size() > protocol::kMaxString) {
      return make_error(EINVAL, "export description '{}' too long", a.description);
    }
    // qemu-nbd: -l implies -r.
    const bool read_only = a.read_only || a.load_snapshot.has_value();
    OpenModes modes = open_modes(a);
    if (a.offset) modes.offset = QNBD_TRY(parse_offset(*a.offset));
    // qemu-nbd prepends each -B to its list, so it lists (NBD_OPT_LIST_META_CONTEXT)
    // and replies (BLOCK_STATUS chunks) with the last -B first: clients that
    // compare the two servers see the same order. A config file's `bitmaps`
    // keep their order, as QMP's block-export-add keeps it.
    const std::vector<std::string> bitmaps(a.bitmaps.rbegin(), a.bitmaps.rend());
    auto spec =
        QNBD_TRY(open_export(a.image, a.format, read_only, modes, a.export_name, a.description, a.shared != 1,
                             a.allocation_depth, bitmaps, lock_options(a.lock, image::LockUse::export_),
                             BitmapRecovery{a.recover_bitmaps == "yes", a.recovery_chunk}, view_options("", 0, a)));
    o.exports.push_back(std::move(spec));
    server::ListenerSpec ls;
    if (!a.socket.empty()) {
      ls.kind = server::ListenerSpec::Kind::unix_socket;
      ls.path = a.socket;
      ls.selinux_label = a.selinux_label;
    } else {
      ls.host = a.bind;
      ls.port = a.port;
    }
    ls.tls = cli_tls;
    o.listeners.push_back(ls);
    o.persistent = a.persistent;
    o.max_connections = a.shared;
    // export-add opens its image as this command line opened IMAGE: the
    // same cache, discard, detect-zeroes, locking, bitmap recovery and
    // multi-conn choice.
    o.open_export = [a](const server::ExportRequest& r) {
      OpenModes modes = open_modes(a);
      modes.load_snapshot.reset();  // -l and -s are about IMAGE, not this one
      modes.snapshot = false;
      modes.image_opts = false;  // a json: image is still read as one
      return open_export(r.image, r.format, r.read_only, modes, r.name, "", a.shared != 1, r.allocation_depth,
                         r.bitmaps, lock_options(a.lock, image::LockUse::export_),
                         BitmapRecovery{a.recover_bitmaps == "yes", a.recovery_chunk}, view_options("", 0, a));
    };
  }
  if (!a.control.empty()) o.control_path = a.control;
  // systemd socket activation replaces the configured listeners.
  if (auto sd = server::systemd_listeners(); !sd.empty()) {
    for (auto& l : sd) l.tls = cli_tls;
    o.listeners = std::move(sd);
  }
  return o;
}

int serve(const ServeArgs& a) {
  // A log line to a stderr pipe whose reader went away (`2>&1 | logger`,
  // a log collector restarted) must not kill the server mid-request or
  // mid-shutdown, losing unflushed writes and leaving bitmaps in_use: the
  // write fails with EPIPE instead. qemu-nbd ignores SIGPIPE too. Sockets
  // never raise it (Asio sends with MSG_NOSIGNAL).
  ::signal(SIGPIPE, SIG_IGN);
  // qemu-nbd also survives SIGUSR1, SIGALRM and SIGIO: QEMU's main loop
  // blocks the first (its SIG_IPI) and reads the others from a signalfd
  // with no handler (qemu_signal_init). A stray one (a `kill -USR1` meant
  // for another process) must not end qnbd mid-request either.
  for (int sig : {SIGUSR1, SIGALRM, SIGIO}) ::signal(sig, SIG_IGN);
  log::init(a.verbose);
  auto opts = build_options(a);
  if (!opts) {
    std::fprintf(stderr, "qnbd serve: %s\n", opts.error().message.c_str());
    return 1;
  }
  // The pid file is created now, so a path that cannot be created is
  // refused before anything runs ("Could not create", as qemu-nbd), rather
  // than leave whoever waits for it waiting; the pid goes in once the
  // server listens, and a rename makes it appear whole. The temporary name
  // is predictable: a symbolic link planted there is not followed.
  int pid_fd = -1;
  const std::string pid_tmp = a.pid_file + ".tmp";
  if (!a.pid_file.empty()) {
    pid_fd = ::open(pid_tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (pid_fd < 0) {
      std::fprintf(stderr, "qnbd serve: Could not create '%s': %s\n", a.pid_file.c_str(), std::strerror(errno));
      return 1;
    }
  }
  int ready_fd = -1;
  if (a.fork) {
    // Daemonize before any thread exists; the parent exits once the child
    // listens (status 0) or dies trying (status 1), like qemu-nbd --fork.
    int p[2];
    if (::pipe(p) != 0) {
      std::perror("qnbd serve: pipe");
      return 1;
    }
    pid_t pid = ::fork();
    if (pid < 0) {
      std::perror("qnbd serve: fork");
      return 1;
    }
    if (pid > 0) {
      ::close(p[1]);
      char c;
      ssize_t n = ::read(p[0], &c, 1);
      return n == 1 ? 0 : 1;
    }
    ::close(p[0]);
    ::setsid();
    ready_fd = p[1];
  }
  opts->on_listening = [&a, &pid_tmp, pid_fd, ready_fd] {
    if (pid_fd >= 0) {
      // Written only now, so waiting for the file means waiting for the socket.
      const std::string pid = std::to_string(::getpid()) + "\n";
      errno = EIO;  // a short write sets none
      if (::write(pid_fd, pid.data(), pid.size()) != static_cast<ssize_t>(pid.size()) ||
          ::rename(pid_tmp.c_str(), a.pid_file.c_str()) != 0) {
        log::error("cannot write the pid file {}: {}", a.pid_file, std::strerror(errno));
      }
      ::close(pid_fd);
    }
    if (ready_fd >= 0) {
      int devnull = ::open("/dev/null", O_RDWR);
      if (devnull >= 0) {
        ::dup2(devnull, 0);
        ::dup2(devnull, 1);
        if (a.verbose == 0) ::dup2(devnull, 2);
        ::close(devnull);
      }
      char c = 1;
      (void)!::write(ready_fd, &c, 1);
      ::close(ready_fd);
    }
  };
  // A server that cannot even be built (threads, descriptors) throws; it
  // ends here too, so the pid file is cleaned up.
  auto status = [&]() -> Result<int> {
    try {
      return server::run_server(std::move(*opts));
    } catch (const std::exception& e) {
      return make_error(EIO, "{}", e.what());
    }
  }();
  if (!a.pid_file.empty()) {
    ::unlink(a.pid_file.c_str());
    ::unlink(pid_tmp.c_str());  // never renamed: the server did not listen
  }
  if (!status) {
    std::fprintf(stderr, "qnbd serve: %s\n", status.error().message.c_str());
    return 1;
  }
  return *status;
}

}  // namespace

void add_serve_command(CLI::App& app, int& status) {
  auto args = std::make_shared<ServeArgs>();
  auto* cmd = app.add_subcommand("serve", "Export a disk image over NBD (options as qemu-nbd)");
  cmd->add_option("IMAGE", args->image, "Image file (raw or qcow2)");
  cmd->add_option("-k,--socket", args->socket, "Listen on this Unix socket instead of TCP");
  cmd->add_option("--selinux-label", args->selinux_label,
                  "Create the -k socket with this SELinux context (as qemu-nbd; needs --socket)");
  cmd->add_option("-p,--port", args->port, "TCP port (default 10809)");
  cmd->add_option("-b,--bind", args->bind, "Address to listen on (default 127.0.0.1)");
  cmd->add_option("-x,--export-name", args->export_name, "Export name (default \"\")");
  cmd->add_option("-D,--description", args->description, "Export description");
  cmd->add_flag("-r,--read-only", args->read_only, "Export read-only");
  cmd->add_flag("-s,--snapshot", args->snapshot,
                "Write to a temporary qcow2 overlay (in $TMPDIR, else /var/tmp) instead of the image");
  cmd->add_option("-l,--load-snapshot", args->load_snapshot,
                  "Serve an internal snapshot of the qcow2 image, read-only: an id or name, or "
                  "snapshot.id=ID[,snapshot.name=NAME]");
  cmd->add_option("-o,--offset", args->offset,
                  "Serve the image from this byte offset on (a multiple of 512), as qemu-nbd -o");
  cmd->add_option("-f,--format", args->format, "Image format: raw or qcow2 (default: detect)");
  cmd->add_flag("--image-opts", args->image_opts,
                "IMAGE is block options (driver=qcow2,file.filename=PATH,...), as qemu-nbd's; a json:{...} IMAGE is "
                "read the same way without it");
  cmd->add_flag("-t,--persistent", args->persistent, "Keep serving after the last client disconnects");
  cmd->add_option("-e,--shared", args->shared, "Allow NUM clients at once (default 1, 0 = unlimited)");
  cmd->add_flag("-A,--allocation-depth", args->allocation_depth, "Offer the qemu:allocation-depth context");
  cmd->add_flag("--fork", args->fork, "Fork into the background once listening");
  cmd->add_option("--pid-file", args->pid_file, "Write the server PID here once listening");
  cmd->add_option("--cache", args->cache, "Cache mode: writeback (default), writethrough, none, directsync, unsafe");
  cmd->add_flag("-n,--nocache", args->nocache, "Same as --cache=none");
  cmd->add_option("--aio", args->aio,
                  "AIO mode, as qemu-nbd: threads (default), native (needs --cache=none) or io_uring; qnbd's own "
                  "I/O threads serve every mode");
  cmd->add_option("--discard", args->discard, "Discard mode: ignore (default) or unmap");
  cmd->add_option("--detect-zeroes", args->detect_zeroes,
                  "Write all-zero WRITE payloads as zeroes: off (default), on, or unmap (needs --discard=unmap)");
  cmd->add_option("--recover-bitmaps", args->recover_bitmaps,
                  "Keep enabled bitmaps crash-safe with a write-intent record beside the image and recover "
                  "them after a crash: yes (default) or no")
      ->check(CLI::IsMember({"yes", "no"}));
  cmd->add_option("--recovery-chunk-size", args->recovery_chunk,
                  "Bytes of disk per write-intent record bit (power of two, 64 KiB..1 TiB; default 64 MiB)");
  cmd->add_option("--view-scratch-dir", args->view_scratch_dir,
                  "Where point-in-time views keep their scratch files (default: beside the image)");
  cmd->add_option("--view-scratch-max", args->view_scratch_max,
                  "Bytes of scratch one view may use; past it the view fails, the writer goes on "
                  "(default: the disk size)");
  cmd->add_flag("-v,--verbose", args->verbose, "More logging (repeatable)");
  cmd->add_option("-B,--bitmap", args->bitmaps, "Export persistent dirty bitmap NAME as qemu:dirty-bitmap:NAME")
      ->allow_extra_args(false);
  cmd->add_option("--config", args->config, "Serve the exports and listeners of a JSON config file");
  cmd->add_option("--control", args->control,
                  "Open a control socket here (mode 0600) for qnbd ctl: live bitmaps, checkpoints (docs/control.md)");
  cmd->add_option("--threads", args->threads, "I/O threads (default: one per core)");
  cmd->add_flag("--no-inline-io", args->no_inline_io,
                "Run every device call on the blocking pool (default: small page-cache I/O runs inline)");
  cmd->add_option("--poll-max-ns", args->poll_max_ns,
                  "Longest a connection alone on its I/O thread spins for its client's next request before it "
                  "sleeps, adapted as QEMU's iothread poll-max-ns (0 = never; default 64000)")
      ->check(CLI::Range(std::uint64_t{0}, std::uint64_t{1'000'000}));
  cmd->add_option("--handshake-timeout", args->handshake_timeout, "Seconds allowed for negotiation (0 = none)");
  cmd->add_option("--object", args->objects,
                  "tls-creds-x509,id=ID,endpoint=server,dir=DIR[,verify-peer=on|off] | "
                  "tls-creds-psk,id=ID,endpoint=server,dir=DIR | authz-simple,id=ID,identity=DN (repeatable)")
      ->allow_extra_args(false);
  cmd->add_option("--tls-creds", args->tls_creds, "Require TLS with the credentials of --object ID");
  cmd->add_option("--tls-authz", args->tls_authz, "Allow only the client identity of --object authz-simple ID");
  cmd->add_option("--max-connections-per-address", args->max_per_address,
                  "Connections one client IP address may hold at once (0 = unlimited)");
  add_lock_options(cmd, args->lock, true);
  cmd->set_version_flag("-V,--version", qnbd::cli::kVersionText);
  cmd->callback([args, cmd, &status] {
    // qemu-nbd takes an option given an empty value (--cache=, -k '') as
    // that value and refuses it; CLI11 leaves the string empty, as if the
    // option were absent, which would serve a default instead (-k '' on
    // TCP). Refuse them here.
    const std::pair<const char*, const std::string*> strings[] = {
        {"--socket", &args->socket},       {"--pid-file", &args->pid_file},   {"--cache", &args->cache},
        {"--tls-creds", &args->tls_creds}, {"--tls-authz", &args->tls_authz}, {"--control", &args->control},
        {"--config", &args->config}};
    for (const auto& [name, value] : strings) {
      if (cmd->count(name) && value->empty()) {
        std::fprintf(stderr, "qnbd serve: %s: an empty value\n", name);
        status = 1;
        return;
      }
    }
    status = serve(*args);
  });
}

}  // namespace qnbd::cli
