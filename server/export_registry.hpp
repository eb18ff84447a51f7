// The export registry: one Export per served export, owning
// everything a connection needs of it (what the handshake advertises, the
// device, the exported bitmaps and their device handles), and the one place
// where a connection's selected metadata contexts become device handles.
// Asio-free.
//
// Exports may be added and removed while serving (the control socket's
// export-add and export-remove, docs/control.md):
//   - the handshake (protocol::ExportCatalog) reads infos(), an immutable
//     snapshot replaced under mu_ on every add/remove, so a negotiation
//     never sees a list change under it;
//   - an Export is immutable once made and shared (shared_ptr) by the
//     registry and every connection on it: removing it never pulls it from
//     under a connection;
//   - a connection attach()es to the export it negotiated (matched by name
//     and instance, so an export removed and re-added under the same name
//     is never confused with the old one) and detach()es when it ends; the
//     registry keeps each connection's stop/abort hooks, which is how
//     remove(force) ends them;
//   - remove() takes the export out of the list first (no new connection can
//     attach), then ends or waits for the attached ones, then closes the
//     device (bitmaps stored, image lock released) exactly once.
// Thread-safety: every member may run on any thread; mu_ guards the lists.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.hpp"
#include "image/block_device.hpp"
#include "protocol/catalog.hpp"
#include "protocol/meta_context.hpp"
#include "server/server.hpp"

namespace qnbd::server {

// A connection selects at most base:allocation, qemu:allocation-depth and
// one qemu:dirty-bitmap:NAME context per exported bitmap
// (match_meta_contexts never selects one twice). BLOCK_STATUS keeps
// fixed-size per-context state of this many entries, so an export may have
// at most kMaxBitmapsPerExport bitmaps: Export::make refuses more, before
// anything is served, instead of dropping contexts silently.
inline constexpr std::size_t kMaxContexts = 64;
inline constexpr std::size_t kMaxBitmapsPerExport = kMaxContexts - 2;

// One selected metadata context of a connection, resolved once after the
// handshake.
struct ServedContext {
  protocol::ContextKind kind = protocol::ContextKind::base_allocation;
  std::uint32_t id = 0;           // the context id sent in NBD_REP_META_CONTEXT
  std::string name;               // e.g. "qemu:dirty-bitmap:b0", for logs
  std::size_t bitmap_handle = 0;  // dirty_bitmap: BlockDevice::bitmap_status handle
};

class Export {
 public:
  // Refuses more than kMaxBitmapsPerExport bitmaps or a missing device.
  // info.bitmaps is filled from spec.bitmaps (the names, in order).
  static Result<std::shared_ptr<const Export>> make(ExportSpec spec);

  const protocol::ExportInfo& info() const { return info_; }
  const std::string& name() const { return info_.name; }
  image::BlockDevice& device() const { return *device_; }
  // The device, shared (the control socket keeps it alive while a command runs).
  const std::shared_ptr<image::BlockDevice>& device_ptr() const { return device_; }
  const std::string& image() const { return image_; }
  bool discard_unmap() const { return discard_unmap_; }
  DetectZeroes detect_zeroes() const { return detect_zeroes_; }
  bool inline_io() const { return inline_io_; }
  // True once remove() took the export out of the registry: long requests
  // stop between steps (as on shutdown) so a forced removal is not held up
  // by a whole-disk WRITE_ZEROES.
  bool retiring() const { return retiring_.load(std::memory_order_relaxed); }

  // The contexts the Negotiator selected for this export, each bitmap
  // context with its device handle. Fails (the connection is closed) only
  // if a context names a bitmap this export does not have or there are
  // more than kMaxContexts: the Negotiator matched against info(), so
  // neither happens unless the two disagree.
  Result<std::vector<ServedContext>> resolve_contexts(const std::vector<protocol::MetaContext>& selected) const;

 private:
  Export() = default;
  protocol::ExportInfo info_;
  std::shared_ptr<image::BlockDevice> device_;
  std::vector<ExportedBitmap> bitmaps_;  // info_.bitmaps[i] == bitmaps_[i].name
  bool discard_unmap_ = false;
  DetectZeroes detect_zeroes_ = DetectZeroes::off;
  bool inline_io_ = true;
  std::string image_;
  mutable std::atomic<bool> retiring_{false};
  friend class ExportRegistry;
};

// How the registry ends a connection attached to an export being removed
// with force. Both are called on the remover's thread, never under mu_, and
// must only post work to the connection (they may run after it ended).
struct ConnectionHooks {
  std::function<void()> stop;   // answer what is in flight, then close
  std::function<void()> abort;  // the client did not take its replies: cut it off
};

// How long remove(force) lets connections end before cutting them off, and
// how long it then waits for their disk work.
struct RemoveTimes {
  std::chrono::milliseconds grace{2000};
  std::chrono::milliseconds drain_limit{60000};
};

// One export and its connection count, as status shows it.
struct ExportListing {
  std::shared_ptr<const Export> exp;
  std::size_t connections = 0;
};

class ExportRegistry {
 public:
  ExportRegistry();
  // Serve `spec` (its device already opened). Refuses a name already served
  // (EEXIST) and what Export::make refuses (EINVAL); on failure the device
  // is left as it was (open): closing it is the caller's.
  Result<std::shared_ptr<const Export>> add(ExportSpec spec);
  // Stop serving `name`: ENOENT if not served; EBUSY if clients are attached
  // and !force (nothing changes). With force, attached connections are
  // stopped (in-flight requests answered, then closed), cut off after
  // times.grace, and waited for up to times.drain_limit more; then the
  // device is closed and its close() result returned. If connections are
  // still running disk requests after that (a hung device), EBUSY: the
  // export is gone from the list but its device stays open, and is closed
  // by close_all() at shutdown.
  // Serialize calls for one name (the control socket runs one command at a
  // time); concurrent removes of different exports are fine.
  Result<void> remove(std::string_view name, bool force, RemoveTimes times = {});
  // The export called `name` ("" is a name like any other), or nullptr.
  std::shared_ptr<const Export> find(std::string_view name) const;
  // Every export, in listing order.
  std::vector<std::shared_ptr<const Export>> all() const;
  // Every export with its attached connections, in listing order.
  std::vector<ExportListing> list() const;
  // What the handshake advertises, in listing order: an immutable snapshot.
  std::shared_ptr<const protocol::ExportList> infos() const;

  // A connection `conn` that negotiated `negotiated` starts transmission:
  // the Export it names (same name and instance), or nullptr if that was
  // removed meanwhile (the connection must close).
  std::shared_ptr<const Export> attach(const protocol::ExportInfo& negotiated, std::uint64_t conn,
                                       ConnectionHooks hooks);
  // The connection ended (safe to call for one never attached). The caller
  // drops its reference to `e` first: remove() then holds the last one, and
  // the image file (and its lock) is closed before remove() returns.
  void detach(const Export* e, std::uint64_t conn);

  // Shutdown, once no connection is left: close every device not closed
  // yet (the listed exports and any a failed remove left open). Returns
  // the errors as "export 'NAME': message".
  std::vector<std::string> close_all();

 private:
  struct Entry {
    std::shared_ptr<const Export> exp;
    std::map<std::uint64_t, ConnectionHooks> conns;  // attached connections
    bool closing = false;                            // someone took on closing the device
  };
  void publish_locked();  // rebuild infos_ from entries_
  Entry* find_entry_locked(const Export* e);

  mutable std::mutex mu_;                         // a leaf lock: nothing else is taken under it
  std::condition_variable detached_;              // a connection detached (remove waits)
  std::vector<std::shared_ptr<Entry>> entries_;   // listing order
  std::vector<std::shared_ptr<Entry>> retiring_;  // removed, device not closed yet
  std::shared_ptr<const protocol::ExportList> infos_;
  std::atomic<std::uint64_t> next_instance_{1};
};

}  // namespace qnbd::server
