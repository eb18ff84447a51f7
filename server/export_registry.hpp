// The export registry: one Export object per served export, owning
// everything a connection needs of it (what the handshake advertises, the
// device, the exported bitmaps and their device handles), and the one place
// where a connection's selected metadata contexts become device handles.
// Asio-free.
//
// Thread-safety: an Export is immutable once made and shared (shared_ptr)
// by the registry and every connection on it, so removing an export from
// the registry would never pull it from under a connection. The registry's
// list is guarded by mu_: add(), find() and all() may run on any thread.
// infos() hands out a snapshot of the advertised list: add() and remove()
// (point-in-time views come and go while serving) publish a new list, and
// each handshake negotiates against the snapshot it took at its start
// (SnapshotCatalog), so what it looked up stays valid.
#pragma once

#include <cstddef>
#include <cstdint>
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
  bool inline_io() const { return inline_io_; }

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
  bool inline_io_ = true;
  std::string image_;
};

class ExportRegistry {
 public:
  // Refuses a name already served (the config loader refuses duplicates
  // too; this keeps find() unambiguous for any caller).
  Result<void> add(ExportSpec spec);
  // The export called `name` ("" is a name like any other), or nullptr.
  std::shared_ptr<const Export> find(std::string_view name) const;
  // Stop listing `name`; returns the export (connections on it keep their
  // reference), or nullptr if there is none.
  std::shared_ptr<const Export> remove(std::string_view name);
  // Every export, in listing order.
  std::vector<std::shared_ptr<const Export>> all() const;
  // What the handshake advertises, in listing order: a snapshot (see the
  // thread-safety note above).
  std::shared_ptr<const std::vector<protocol::ExportInfo>> infos() const;

 private:
  void publish_locked();
  mutable std::mutex mu_;  // a leaf lock: nothing else is taken under it
  std::vector<std::shared_ptr<const Export>> exports_;
  std::shared_ptr<const std::vector<protocol::ExportInfo>> infos_ =
      std::make_shared<const std::vector<protocol::ExportInfo>>();
};

// The catalog one handshake negotiates against: the export list as it was
// when the connection began, plus the server's live shutdown flag.
class SnapshotCatalog final : public protocol::ExportCatalog {
 public:
  SnapshotCatalog(std::shared_ptr<const std::vector<protocol::ExportInfo>> infos, const protocol::ExportCatalog& live)
      : infos_(std::move(infos)), live_(live) {}
  const std::vector<protocol::ExportInfo>& exports() const override { return *infos_; }
  bool shutting_down() const override { return live_.shutting_down(); }

 private:
  std::shared_ptr<const std::vector<protocol::ExportInfo>> infos_;
  const protocol::ExportCatalog& live_;
};

}  // namespace qnbd::server
