// Live edits of the persistent bitmaps of an image open for writing: the
// control socket's bitmap commands and checkpoints (image/checkpoint.hpp).
//
// The rules and error words are the at-rest ones (check_bitmap_op in
// bitmap_edit.cpp). What differs is ordering: an edit is prepared (checked,
// data loaded: the I/O), committed in memory while the device's write gate
// holds writes back (so a write is marked wholly before or wholly after
// the switch), then persisted with writes running again. Enabled bitmaps
// stay in_use on disk as at any time a writer has the image open (as in QEMU's
// block/qcow2-bitmap.c: their data is stored at close); a bitmap that is
// disabled, cleared or merged into is written with its contents and, when
// disabled, without in_use, so it is consistent on disk from then on.
#include <algorithm>

#include "common/log.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image/qcow2/bitmap_store.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image/qcow2/refcount.hpp"

namespace qnbd::image::qcow2 {
namespace {

BitmapOp::Kind at_rest_kind(LiveBitmapOp::Kind k) {
  switch (k) {
    case LiveBitmapOp::Kind::add: return BitmapOp::Kind::add;
    case LiveBitmapOp::Kind::remove: return BitmapOp::Kind::remove;
    case LiveBitmapOp::Kind::clear: return BitmapOp::Kind::clear;
    case LiveBitmapOp::Kind::enable: return BitmapOp::Kind::enable;
    case LiveBitmapOp::Kind::disable: return BitmapOp::Kind::disable;
    case LiveBitmapOp::Kind::merge: return BitmapOp::Kind::merge;
  }
  return BitmapOp::Kind::add;
}

}  // namespace

Result<BitmapStore::LiveEdit> BitmapStore::prepare_live(const std::vector<LiveBitmapOp>& ops) {
  if (!writable_) return make_error(EROFS, "bitmaps: image is open read-only");
  LiveEdit edit;
  edit.lock = std::unique_lock(edit_mutex_);
  // The enabled bitmaps must be in_use on disk before any directory that
  // a live edit writes (that directory keeps them in_use).
  QNBD_TRY(before_write(0, 0));

  std::lock_guard lock(load_mutex_);
  auto live = [&](const std::string& name) -> Entry* {
    for (Entry& e : entries_) {
      if (!e.removed && e.info.name == name) return &e;
    }
    return nullptr;
  };
  std::vector<BitmapInfo> dir;
  for (const Entry& e : entries_) {
    if (!e.removed) dir.push_back(e.info);
  }
  const BitmapLimits limits{header_.version, header_.cluster_size(), header_.size};
  for (const LiveBitmapOp& op : ops) {
    const BitmapOp at_rest{at_rest_kind(op.kind), op.source};
    if (auto r = check_bitmap_op(dir, op.name, at_rest, op.granularity, op.disabled, limits, false); !r) {
      return op_failed(at_rest.kind, op.name, r.error());
    }
    auto need = [&](const std::string& name) -> Result<void> {
      Entry* e = live(name);  // null: added by an earlier op of this edit (clean, in memory)
      if (e && !e->bits) {
        if (auto r = load_locked(*e); !r) return op_failed(at_rest.kind, op.name, r.error());
      }
      return ok();
    };
    switch (op.kind) {
      case LiveBitmapOp::Kind::add: {
        auto bits = DirtyBitmap::create(header_.size, dir.back().granularity);
        if (!bits) return op_failed(at_rest.kind, op.name, bits.error());
        edit.added.push_back(dir.back());
        edit.created.push_back(std::make_unique<DirtyBitmap>(std::move(bits).take()));
        break;
      }
      case LiveBitmapOp::Kind::remove: break;
      case LiveBitmapOp::Kind::merge: QNBD_TRY(need(op.source)); [[fallthrough]];
      case LiveBitmapOp::Kind::clear:
      case LiveBitmapOp::Kind::enable:
      case LiveBitmapOp::Kind::disable: QNBD_TRY(need(op.name)); break;
    }
  }
  edit.ops = ops;
  return edit;
}

void BitmapStore::commit_live(LiveEdit& edit) noexcept {
  std::lock_guard load(load_mutex_);
  std::unique_lock lock(live_mu_);
  auto live = [&](const std::string& name) -> Entry* {
    for (Entry& e : entries_) {
      if (!e.removed && e.info.name == name) return &e;
    }
    return nullptr;
  };
  std::size_t next_added = 0;
  for (const LiveBitmapOp& op : edit.ops) {
    if (op.kind == LiveBitmapOp::Kind::add) {
      Entry n;
      n.info = edit.added[next_added];
      n.bits = std::move(edit.created[next_added]);
      ++next_added;
      n.changed = true;
      entries_.push_back(std::move(n));
      continue;
    }
    // prepare_live checked that every name resolves at its turn.
    Entry* e = live(op.name);
    if (!e) continue;
    switch (op.kind) {
      case LiveBitmapOp::Kind::add: break;
      case LiveBitmapOp::Kind::remove: e->removed = true; break;
      case LiveBitmapOp::Kind::clear:
        e->bits->reset();
        e->changed = true;
        break;
      case LiveBitmapOp::Kind::enable:
      case LiveBitmapOp::Kind::disable:
        e->info.auto_enabled = op.kind == LiveBitmapOp::Kind::enable;
        e->changed = true;
        break;
      case LiveBitmapOp::Kind::merge:
        if (Entry* s = live(op.source); s && s != e) {
          // Same disk size on both sides, so merge cannot refuse.
          if (auto r = e->bits->merge(*s->bits); !r) log::error("bitmap merge: {}", r.error().message);
        }
        e->changed = true;
        break;
    }
  }
  tracking_.clear();
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (!e.removed && e.info.auto_enabled && !e.info.in_use) tracking_.push_back(i);
  }
}

// The next write-intent record for a live edit's new directory
// (docs/crash-safe-bitmaps.md, "Live edits", step 14): armed, then marked
// by every write and filled with the current record's chunks. False (the
// switch clears AUTOCLEAR_QNBD_INTENT) when nothing is tracked or it cannot
// be written.
bool BitmapStore::arm_next_record(std::uint64_t disk_size, std::uint64_t dir_offset, std::span<const std::byte> dir,
                                  const std::vector<BitmapUpdate>& updated) {
  std::vector<bool> tracked(updated.size());
  bool any = false;
  for (std::size_t k = 0; k < updated.size(); ++k) any |= tracked[k] = updated[k].info.in_use;
  if (!any) return false;
  auto armed = [&]() -> Result<std::unique_ptr<IntentRecord>> {
    const std::uint64_t sum = fnv1a64(dir);
    // No directory on disk is this one with in_use cleared: "before"
    // never matches (read_intent then expects the tracked ones in_use).
    IntentIdentity id{disk_size, dir_offset, dir.size(), sum, ~sum, static_cast<std::uint32_t>(updated.size())};
    std::unique_ptr<File> f = QNBD_TRY(intent_.open_next(true));
    return IntentRecord::arm(std::move(f), id, record_->chunk_size(), tracked);
  }();
  if (armed) {
    IntentRecord* next = armed->get();
    {
      std::unique_lock lock(live_mu_);
      next_record_ = std::move(*armed);
    }
    // From here every write marks both; then the new record gets what
    // the old one had.
    auto filled = next->mark_from(*record_);
    if (filled) return true;
    log::warn("{}: cannot fill the next write-intent record: {}", file_.name(), filled.error().message);
    std::unique_lock lock(live_mu_);
    next_record_.reset();
  } else {
    log::warn("{}: cannot arm the next write-intent record: {}", file_.name(), armed.error().message);
  }
  intent_.remove_next();
  return false;
}

Result<void> BitmapStore::write_directory(Refcounts& refcounts, Header& header, bool closing, const LiveRewrite* live) {
  std::vector<BitmapUpdate> updated;
  std::vector<std::size_t> index;  // entries_ index of each update
  std::vector<BitmapInfo> old_directory;
  {
    std::lock_guard lock(load_mutex_);
    if (!marked_.load(std::memory_order_relaxed)) return ok();  // nothing changed since open
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      if (e.removed) continue;
      const bool tracked = std::find(tracking_.begin(), tracking_.end(), i) != tracking_.end();
      BitmapUpdate u{e.info, nullptr};
      if (tracked) u.info.in_use = !closing;
      // A tracked bitmap's on-disk data means nothing while it is in_use, so
      // it is written only at close (or when it has no table yet).
      if ((tracked && closing) || e.changed || e.info.table_offset == 0) u.data = e.bits.get();
      updated.push_back(std::move(u));
      index.push_back(i);
    }
    old_directory = directory_;
  }
  // entries_ does not change meanwhile: only commit_live changes it, under
  // the edit lock that a live caller holds and that close excludes (no
  // edit runs once the device is being closed). Each DirtyBitmap stays
  // where it is (entries_ holds unique_ptrs) and has its own lock.
  // A live edit keeps the bitmaps crash-safe across its switch
  // (docs/crash-safe-bitmaps.md, "Live edits"): once the new directory is
  // durable, a record armed for it, holding every chunk the current record
  // holds, is marked by every write from then on; the header switch keeps
  // AUTOCLEAR_QNBD_INTENT; afterwards the new record replaces the old one
  // (rename). A crash before the switch is durable finds the old directory
  // and the old record; after it, the new directory and the new record
  // (under either name). Without the record, or if arming fails, the switch
  // clears the bit as before.
  LiveRewrite with_intent;
  if (live) with_intent = *live;
  bool have_record;
  {
    std::shared_lock lock(live_mu_);
    have_record = record_ != nullptr;
  }
  if (live && !closing && have_record && intent_.open_next && intent_.promote_next) {
    with_intent.before_switch = [&](std::uint64_t dir_offset, std::span<const std::byte> dir) {
      return arm_next_record(header.size, dir_offset, dir, updated);
    };
  }
  auto rewritten =
      rewrite_bitmap_directory(file_, header, refcounts, old_directory, updated, live ? &with_intent : nullptr);
  if (!rewritten) {
    // The switch did not happen (or is not known to be durable): the old
    // record still covers what is on disk; drop the next one.
    std::unique_ptr<IntentRecord> next;
    {
      std::unique_lock lock(live_mu_);
      next = std::move(next_record_);
    }
    if (next && intent_.remove_next) intent_.remove_next();
    return rewritten;
  }
  std::unique_ptr<IntentRecord> dropped;
  bool promoted = false;
  {
    std::lock_guard lock(load_mutex_);
    directory_.clear();
    for (std::size_t k = 0; k < updated.size(); ++k) {
      Entry& e = entries_[index[k]];
      e.info.table_offset = updated[k].info.table_offset;
      e.info.table_size = updated[k].info.table_size;
      e.info.granularity = updated[k].info.granularity;
      if (closing) e.info.in_use = updated[k].info.in_use;
      e.changed = false;
      directory_.push_back(updated[k].info);
    }
    // At close the header switch above cleared AUTOCLEAR_QNBD_INTENT (not
    // in AUTOCLEAR_MASK) and the stored bitmaps are consistent: the record
    // is dropped and removed. After a live edit that armed the next record
    // (and kept the bit), the next record replaces this one; if it could not
    // be armed, the bit is clear and this record names a directory that is
    // gone: dropped too, and until the next open a crash leaves the enabled
    // bitmaps in_use, as without the feature (never a bitmap that missed a
    // write). before_write uses the records under live_mu_ (shared), so they
    // change under live_mu_.
    if (record_) {
      std::unique_lock live_lock(live_mu_);
      dropped = std::move(record_);
      if (next_record_) {
        record_ = std::move(next_record_);
        promoted = true;
      }
    }
    if (closing) {
      tracking_.clear();
      marked_.store(false, std::memory_order_release);
    }
  }
  if (dropped) {
    dropped.reset();
    if (promoted) {
      if (auto r = intent_.promote_next(); !r)
        log::warn("{}: {} (recovery reads the record under either name)", file_.name(), r.error().message);
    } else if (intent_.remove) {
      intent_.remove();
    }
  }
  return ok();
}

Result<std::vector<BitmapState>> BitmapStore::states() {
  std::lock_guard lock(load_mutex_);
  std::vector<BitmapState> out;
  for (Entry& e : entries_) {
    if (e.removed) continue;
    BitmapState s;
    s.name = e.info.name;
    s.granularity = e.info.granularity;
    s.enabled = e.info.auto_enabled && !e.info.in_use;
    s.in_use = e.info.in_use;
    if (!e.info.in_use) {
      const DirtyBitmap* bits = QNBD_TRY(load_locked(e));
      s.dirty_bytes = std::min(bits->count_dirty() * bits->granularity(), bits->size());
    }
    out.push_back(std::move(s));
  }
  return out;
}

class Qcow2Image::LiveBitmapEdit final : public BitmapTransaction {
 public:
  LiveBitmapEdit(Qcow2Image& img, BitmapStore::LiveEdit edit) : img_(img), edit_(std::move(edit)) {}
  void commit() noexcept override { img_.bitmap_store_->commit_live(edit_); }
  Result<void> persist() override { return img_.persist_bitmaps(); }

 private:
  Qcow2Image& img_;
  BitmapStore::LiveEdit edit_;  // holds the store's edit lock until persisted
};

Result<std::vector<BitmapState>> Qcow2Image::bitmap_states() { return bitmap_store_->states(); }

Result<std::unique_ptr<BitmapTransaction>> Qcow2Image::begin_bitmap_edit(const std::vector<LiveBitmapOp>& ops) {
  if (!writable_) return make_error(EROFS, "{}: image is opened read-only", path_);
  BitmapStore::LiveEdit edit = QNBD_TRY(bitmap_store_->prepare_live(ops));
  return std::unique_ptr<BitmapTransaction>(std::make_unique<LiveBitmapEdit>(*this, std::move(edit)));
}

// Writes run on while the directory is written: the metadata mutex is
// taken only for the short steps of rewrite_bitmap_directory (allocation,
// the header switch, the frees), never across its syncs (with a checkpoint
// every second, holding it over them stalled guest writes for hundreds of
// milliseconds). The crash-ordering argument is beside
// rewrite_bitmap_directory.
Result<void> Qcow2Image::persist_bitmaps() {
  {
    std::lock_guard lock(mutex_);
    if (closed_) return make_error(EIO, "{}: image is closed", path_);
    if (header_.corrupt()) return make_error(EIO, "{}: image is marked corrupt; writes are refused", path_);
  }
  LiveRewrite live;
  live.lock = [this] { return std::unique_lock<std::mutex>(mutex_); };
  live.switched = [this](const std::vector<BitmapUpdate>& updated) {
    std::vector<BitmapInfo> dir;
    for (const BitmapUpdate& u : updated) dir.push_back(u.info);
    register_bitmaps(dir);
  };
  QNBD_TRY(bitmap_store_->write_directory(*refcounts_, header_, /*closing=*/false, &live));
  std::lock_guard lock(mutex_);
  bitmaps_ = bitmap_store_->directory();
  l2_cache_->depends_on_flush();  // as close(): the store may have changed refcounts
  return ok();
}

}  // namespace qnbd::image::qcow2
