// The export registry (see export_registry.hpp) and describe_export, what
// the handshake advertises for a device.
#include "server/export_registry.hpp"

#include <algorithm>
#include <cerrno>

#include <fmt/format.h>

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
  e->detect_zeroes_ = spec.detect_zeroes;
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

ExportRegistry::ExportRegistry() : infos_(std::make_shared<const protocol::ExportList>()) {}

void ExportRegistry::publish_locked() {
  auto list = std::make_shared<protocol::ExportList>();
  list->reserve(entries_.size());
  for (const auto& en : entries_) list->push_back(en->exp->info());
  infos_ = std::move(list);
}

ExportRegistry::Entry* ExportRegistry::find_entry_locked(const Export* e) {
  for (auto* v : {&entries_, &retiring_})
    for (const auto& en : *v)
      if (en->exp.get() == e) return en.get();
  return nullptr;
}

Result<std::shared_ptr<const Export>> ExportRegistry::add(ExportSpec spec) {
  spec.info.instance = next_instance_.fetch_add(1, std::memory_order_relaxed);
  auto e = QNBD_TRY(Export::make(std::move(spec)));
  std::lock_guard lk(mu_);
  for (const auto& x : entries_)
    if (x->exp->name() == e->name()) return make_error(EEXIST, "export '{}' already exists", e->name());
  auto en = std::make_shared<Entry>();
  en->exp = e;
  entries_.push_back(std::move(en));
  publish_locked();
  return e;
}

Result<void> ExportRegistry::remove(std::string_view name, bool force, RemoveTimes times) {
  std::shared_ptr<Entry> en;
  std::vector<ConnectionHooks> hooks;
  {
    std::lock_guard lk(mu_);
    auto it = std::find_if(entries_.begin(), entries_.end(), [&](const auto& x) { return x->exp->name() == name; });
    if (it == entries_.end()) return make_error(ENOENT, "no export named '{}'", name);
    en = *it;
    if (!force && !en->conns.empty()) {
      return make_error(EBUSY, "export '{}' has {} connection(s); remove it with force to close them", name,
                        en->conns.size());
    }
    // From here no connection can attach to it: attach() looks in entries_.
    entries_.erase(it);
    retiring_.push_back(en);
    publish_locked();
    en->exp->retiring_.store(true, std::memory_order_relaxed);
    for (const auto& [id, h] : en->conns) hooks.push_back(h);
  }
  const std::string label(name);
  auto wait_detached = [&](std::chrono::milliseconds limit) {
    std::unique_lock lk(mu_);
    return detached_.wait_for(lk, limit, [&] { return en->conns.empty(); });
  };
  if (!hooks.empty()) {
    for (const auto& h : hooks)
      if (h.stop) h.stop();
    if (!wait_detached(times.grace)) {
      {
        std::lock_guard lk(mu_);
        hooks.clear();
        for (const auto& [id, h] : en->conns) hooks.push_back(h);
      }
      for (const auto& h : hooks)
        if (h.abort) h.abort();
      if (!wait_detached(times.drain_limit)) {
        return make_error(EBUSY,
                          "export '{}' removed, but its connections' disk requests did not finish; "
                          "its image stays open until shutdown",
                          label);
      }
    }
  }
  {
    std::lock_guard lk(mu_);
    if (en->closing) return ok();  // close_all() took it
    en->closing = true;
  }
  auto res = en->exp->device().close();
  {
    std::lock_guard lk(mu_);
    std::erase(retiring_, en);
  }
  if (!res) return make_error(res.error().code, "closing export '{}': {}", label, res.error().message);
  return ok();
}

std::shared_ptr<const Export> ExportRegistry::attach(const protocol::ExportInfo& negotiated, std::uint64_t conn,
                                                     ConnectionHooks hooks) {
  std::lock_guard lk(mu_);
  for (const auto& en : entries_) {
    if (en->exp->name() == negotiated.name && en->exp->info().instance == negotiated.instance) {
      en->conns[conn] = std::move(hooks);
      return en->exp;
    }
  }
  return nullptr;
}

void ExportRegistry::detach(const Export* e, std::uint64_t conn) {
  {
    std::lock_guard lk(mu_);
    if (Entry* en = find_entry_locked(e)) en->conns.erase(conn);
  }
  detached_.notify_all();
}

std::vector<std::string> ExportRegistry::close_all() {
  std::vector<std::shared_ptr<Entry>> todo;
  {
    std::lock_guard lk(mu_);
    for (auto* v : {&entries_, &retiring_}) {
      for (const auto& en : *v) {
        if (en->closing) continue;
        en->closing = true;
        todo.push_back(en);
      }
    }
  }
  std::vector<std::string> errors;
  for (const auto& en : todo) {
    auto res = en->exp->device().close();
    if (!res) errors.push_back(fmt::format("export '{}': {}", en->exp->name(), res.error().message));
  }
  return errors;
}

std::shared_ptr<const Export> ExportRegistry::find(std::string_view name) const {
  std::lock_guard lk(mu_);
  for (const auto& en : entries_)
    if (en->exp->name() == name) return en->exp;
  return nullptr;
}

std::vector<std::shared_ptr<const Export>> ExportRegistry::all() const {
  std::lock_guard lk(mu_);
  std::vector<std::shared_ptr<const Export>> out;
  out.reserve(entries_.size());
  for (const auto& en : entries_) out.push_back(en->exp);
  return out;
}

std::vector<ExportListing> ExportRegistry::list() const {
  std::lock_guard lk(mu_);
  std::vector<ExportListing> out;
  out.reserve(entries_.size());
  for (const auto& en : entries_) out.push_back({en->exp, en->conns.size()});
  return out;
}

std::shared_ptr<const protocol::ExportList> ExportRegistry::infos() const {
  std::lock_guard lk(mu_);
  return infos_;
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
