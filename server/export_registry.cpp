// The export registry (see export_registry.hpp) and describe_export, what
// the handshake advertises for a device.
#include "server/export_registry.hpp"

#include <algorithm>
#include <cerrno>

#include "protocol/constants.hpp"

namespace qnbd::server {

Result<std::shared_ptr<const Export>> Export::make(ExportSpec spec) {
  if (!spec.device) return make_error(EINVAL, "export '{}': no device", spec.info.name);
  if (spec.bitmaps.size() > kMaxBitmapsPerExport)
    return make_error(EINVAL, "export '{}': {} bitmaps, at most {} can be exported", spec.info.name,
                      spec.bitmaps.size(), kMaxBitmapsPerExport);
  std::shared_ptr<Export> e(new Export());
  e->info_ = std::move(spec.info);
  e->info_.bitmaps.clear();
  for (const auto& b : spec.bitmaps) e->info_.bitmaps.push_back(b.name);
  e->device_ = std::move(spec.device);
  e->bitmaps_ = std::move(spec.bitmaps);
  e->discard_unmap_ = spec.discard_unmap;
  e->inline_io_ = spec.inline_io;
  e->image_ = std::move(spec.image);
  return std::shared_ptr<const Export>(std::move(e));
}

Result<std::vector<ServedContext>> Export::resolve_contexts(const std::vector<protocol::MetaContext>& selected) const {
  if (selected.size() > kMaxContexts)
    return make_error(EINVAL, "{} metadata contexts selected, at most {}", selected.size(), kMaxContexts);
  std::vector<ServedContext> out;
  out.reserve(selected.size());
  for (const auto& c : selected) {
    ServedContext s{c.kind, c.id, c.name, 0};
    if (c.kind == protocol::ContextKind::dirty_bitmap) {
      if (c.bitmap >= bitmaps_.size())
        return make_error(EINVAL, "context {} names bitmap {} of {}", c.name, c.bitmap, bitmaps_.size());
      s.bitmap_handle = bitmaps_[c.bitmap].handle;
    }
    out.push_back(std::move(s));
  }
  return out;
}

Result<void> ExportRegistry::add(ExportSpec spec) {
  auto e = QNBD_TRY(Export::make(std::move(spec)));
  std::lock_guard lk(mu_);
  for (const auto& x : exports_)
    if (x->name() == e->name()) return make_error(EEXIST, "export '{}' given twice", e->name());
  exports_.push_back(std::move(e));
  publish_locked();
  return ok();
}

std::shared_ptr<const Export> ExportRegistry::remove(std::string_view name) {
  std::lock_guard lk(mu_);
  for (auto it = exports_.begin(); it != exports_.end(); ++it) {
    if ((*it)->name() == name) {
      auto e = std::move(*it);
      exports_.erase(it);
      publish_locked();
      return e;
    }
  }
  return nullptr;
}

void ExportRegistry::publish_locked() {
  auto next = std::make_shared<std::vector<protocol::ExportInfo>>();
  for (const auto& x : exports_) next->push_back(x->info());
  infos_ = std::move(next);
}

std::shared_ptr<const std::vector<protocol::ExportInfo>> ExportRegistry::infos() const {
  std::lock_guard lk(mu_);
  return infos_;
}

std::shared_ptr<const Export> ExportRegistry::find(std::string_view name) const {
  std::lock_guard lk(mu_);
  for (const auto& e : exports_)
    if (e->name() == name) return e;
  return nullptr;
}

std::vector<std::shared_ptr<const Export>> ExportRegistry::all() const {
  std::lock_guard lk(mu_);
  return exports_;
}

protocol::ExportInfo describe_export(const image::BlockDevice& device, std::string name, std::string description,
                                     bool read_only, bool multi_conn, bool allocation_depth) {
  auto caps = device.capabilities();
  protocol::ExportInfo e;
  e.name = std::move(name);
  e.description = std::move(description);
  e.size = device.size();
  e.read_only = read_only || !caps.writable;
  e.can_flush = true;
  e.can_fua = true;
  e.can_cache = true;
  // Like qemu-nbd: a writable export offers TRIM (a no-op with
  // --discard=ignore), WRITE_ZEROES and FAST_ZERO.
  e.can_trim = true;
  e.can_write_zeroes = true;
  e.can_fast_zero = true;
  e.can_multi_conn = multi_conn && caps.can_multi_conn;
  e.min_block = std::max<std::uint32_t>(1, caps.min_block);
  // qemu-nbd advertises max(4096, minimum), not the cluster size.
  e.preferred_block = std::max<std::uint32_t>(4096, e.min_block);
  e.max_payload = protocol::kMaxPayload;
  e.allocation_depth = allocation_depth;
  return e;
}


}  // namespace qnbd::server
