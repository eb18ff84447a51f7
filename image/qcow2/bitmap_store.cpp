#include "image/qcow2/bitmap_store.hpp"

#include <algorithm>
#include <bit>
#include <cstring>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"
#include "image/qcow2/bitmap.hpp"
#include "image/qcow2/refcount.hpp"

namespace qnbd::image::qcow2 {

Result<DirtyBitmap> load_bitmap_data(File& file, std::uint64_t cluster_size, std::uint64_t disk_size,
                                     const BitmapInfo& info, std::uint64_t file_size) {
  DirtyBitmap bits = QNBD_TRY(DirtyBitmap::create(disk_size, info.granularity));
  // The directory check at open guarantees table_size == clusters needed and
  // table_size * cluster_size <= 512 MiB, so the table is at most 8 MiB.
  const std::uint64_t data_bytes = bits.byte_count();
  const std::uint64_t need = div_round_up(data_bytes, cluster_size);
  if (need != info.table_size) {
    return make_error(EINVAL, "bitmap '{}': bitmap table size does not match the disk size", info.name);
  }
  if (!range_within(info.table_offset, std::uint64_t{info.table_size} * 8, file_size)) {
    return make_error(EINVAL, "bitmap '{}': bitmap table runs past the end of the file", info.name);
  }
  std::vector<std::byte> table(std::size_t{info.table_size} * 8);
  QNBD_TRY(file.read_exact(table, info.table_offset, "bitmap table"));
  std::vector<std::byte> cluster(static_cast<std::size_t>(cluster_size));
  // A data cluster named by two entries would let a small file fill a big
  // bitmap with private leaves (memory grows with the declared size, not
  // with the file); QEMU's check counts it as a refcount error, we refuse.
  std::vector<std::uint64_t> hosts;
  for (std::uint64_t i = 0; i < info.table_size; ++i) {
    const std::uint64_t host = load_be64(table.data() + i * 8) & BME_TABLE_ENTRY_OFFSET_MASK;
    if (host != 0) hosts.push_back(host);
  }
  std::sort(hosts.begin(), hosts.end());
  if (std::adjacent_find(hosts.begin(), hosts.end()) != hosts.end()) {
    return make_error(EINVAL, "bitmap '{}': a bitmap data cluster is referenced twice", info.name);
  }
  for (std::uint64_t i = 0; i < info.table_size; ++i) {
    const std::uint64_t e = load_be64(table.data() + i * 8);
    const std::uint64_t host = e & BME_TABLE_ENTRY_OFFSET_MASK;
    const std::uint64_t first = i * cluster_size;
    const std::uint64_t n = std::min(cluster_size, data_bytes - first);
    // qcow2.txt "Bitmap table", as QEMU's check_table_entry.
    if ((e & BME_TABLE_ENTRY_RESERVED_MASK) ||
        (host != 0 && ((e & BME_TABLE_ENTRY_FLAG_ALL_ONES) || !is_aligned(host, cluster_size) ||
                       !range_within(host, cluster_size, file_size)))) {
      return make_error(EINVAL, "bitmap '{}': invalid bitmap table entry {:#018x}", info.name, e);
    }
    if (host == 0) {
      // Freshly created bitmaps are all zeroes already (and hold no memory
      // for clean ranges: DirtyBitmap allocates only dirty leaves).
      if (e & BME_TABLE_ENTRY_FLAG_ALL_ONES) bits.fill_bytes(first, n, true);
      continue;
    }
    std::span<std::byte> part(cluster.data(), static_cast<std::size_t>(n));
    QNBD_TRY(file.read_exact(part, host, "bitmap data"));
    if (!bits.tail_bits_clear(first, part)) {
      log::debug("bitmap '{}': unused bits after the end of the disk are set; ignored", info.name);
    }
    bits.load_bytes(first, part);
  }
  return bits;
}

namespace {

// Host clusters a bitmap table points to (data clusters), read from disk.
Result<std::vector<std::uint64_t>> table_data_clusters(File& file, const BitmapInfo& b, std::uint64_t cluster_size) {
  std::vector<std::byte> table(std::size_t{b.table_size} * 8);
  QNBD_TRY(file.read_exact(table, b.table_offset, "bitmap table"));
  std::vector<std::uint64_t> out;
  for (std::size_t i = 0; i < b.table_size; ++i) {
    std::uint64_t host = load_be64(table.data() + i * 8) & BME_TABLE_ENTRY_OFFSET_MASK;
    if (host != 0 && is_aligned(host, cluster_size)) out.push_back(host);
  }
  return out;
}

// One bitmap to store: which clusters of its serialized data hold a dirty
// bit (the others become table entry 0, reading as all zeroes), and where
// they and the table go.
struct TablePlan {
  BitmapUpdate* update = nullptr;
  std::uint64_t entries = 0;         // table entries (data clusters)
  std::vector<std::uint64_t> dirty;  // table indexes of the clusters to write
  std::vector<std::uint64_t> hosts;  // their host offsets (phase 1)
  std::uint64_t table_offset = 0;    // phase 1
  std::uint64_t table_bytes = 0;     // whole clusters
};

// Phase 2 of rewrite_bitmap_directory: each planned bitmap's dirty clusters
// and table into the clusters phase 1 allocated, then the directory (its
// first dir_size bytes to `dir_bytes`), then a sync.
Result<void> write_new_directory(File& file, std::uint64_t cs, std::vector<TablePlan>& plans,
                                 const std::vector<BitmapUpdate>& updated, std::uint64_t dir_offset,
                                 std::uint64_t dir_alloc, std::uint64_t dir_size, std::vector<std::byte>& dir_bytes) {
  std::vector<std::byte> cluster(static_cast<std::size_t>(cs));
  for (TablePlan& p : plans) {
    const DirtyBitmap& bits = *p.update->data;
    std::vector<std::byte> table(static_cast<std::size_t>(p.table_bytes));
    for (std::size_t k = 0; k < p.dirty.size(); ++k) {
      // store_bytes zero-fills past the data, so the unused tail bits and
      // the rest of the last cluster are zero (qcow2.txt "Bitmap data").
      bits.store_bytes(p.dirty[k] * cs, cluster);
      QNBD_TRY(file.pwrite(cluster, p.hosts[k]));
      store_be64(table.data() + p.dirty[k] * 8, p.hosts[k]);
    }
    QNBD_TRY(file.pwrite(table, p.table_offset));
    BitmapInfo& b = p.update->info;
    b.granularity = bits.granularity();
    b.table_offset = p.table_offset;
    b.table_size = static_cast<std::uint32_t>(p.entries);
  }
  if (dir_alloc) {
    std::vector<std::byte> dir(static_cast<std::size_t>(dir_alloc));
    std::size_t pos = 0;
    for (const BitmapUpdate& u : updated) {
      const BitmapInfo& b = u.info;
      std::byte* q = dir.data() + pos;
      store_be64(q, b.table_offset);
      store_be32(q + 8, b.table_size);
      store_be32(q + 12, (b.in_use ? BME_FLAG_IN_USE : 0) | (b.auto_enabled ? BME_FLAG_AUTO : 0));
      q[16] = std::byte{BT_DIRTY_TRACKING_BITMAP};
      q[17] = static_cast<std::byte>(std::countr_zero(b.granularity));
      store_be16(q + 18, static_cast<std::uint16_t>(b.name.size()));
      store_be32(q + 20, 0);  // extra_data_size
      std::memcpy(q + 24, b.name.data(), b.name.size());
      pos += static_cast<std::size_t>(align_up(24 + b.name.size(), 8));
    }
    // Only the directory's own bytes, as QEMU writes it: the rest of its
    // cluster is never read, and a directory at the end of the file leaves
    // the file ending where qemu-img's and qemu-nbd's does.
    dir.resize(static_cast<std::size_t>(dir_size));
    QNBD_TRY(file.pwrite(dir, dir_offset));
    dir_bytes = std::move(dir);
  }
  return file.flush();
}

}  // namespace

// Crash ordering (QEMU's full directory replacement, update_ext_header_and_dir,
// and its rule "refcounts before pointers"), true at every point whether or not
// guest writes run meanwhile (`live`):
//   phase 0  plan (which clusters are dirty), read the old tables: reads only.
//   phase 1  allocate every new cluster; the refcount blocks that count them
//            are written back. A crash from here to phase 3 leaks these
//            clusters at worst (nothing points at them).
//   phase 2  write data, tables and directory into them; fsync. After it the
//            new structures and the refcounts covering them are on disk.
//            A failure in phase 1 or 2 (a full disk) frees the new clusters
//            again: nothing points at them, so lowering their refcounts is
//            safe whenever it reaches the disk.
//   phase 3  the header switch: one write of cluster 0 pointing at the new
//            directory, its autoclear word as it is on disk (see below). It
//            may reach the disk at any moment after this (a
//            guest FLUSH syncs the file too); whenever it does, everything it
//            points at is already durable (phase 2 finished before it was
//            issued). Until it does, the old header and the old directory,
//            tables and data (never written in place, not yet freed) are
//            what a crash leaves, with the write-intent record (still armed,
//            still marking) matching that old directory.
//   phase 4  fsync: the new header is durable. Then, where the autoclear
//            word changes (a clean store clears AUTOCLEAR_QNBD_INTENT; the
//            first bitmap sets AUTOCLEAR_BITMAPS), that 8-byte word alone,
//            and another fsync.
//   phase 5  free the old directory, tables and data: only now, so no crash
//            can leave a durable header pointing at a freed (and perhaps
//            reused) cluster; freed refcounts not yet on disk leak only.
// Why the autoclear word is not switched with the directory: QEMU lays the
// header out with the bitmaps extension's fields (nb_bitmaps, the
// directory's size and offset) at bytes 512-535, in the header's second
// sector, and the autoclear word at byte 88, in its first. One write of
// both can land torn: the first sector new (AUTOCLEAR_QNBD_INTENT clear,
// the record no longer trusted) beside the second old (the old directory,
// its tracked bitmaps in_use), and the bitmaps were lost as inconsistent.
// Written apart, a crash leaves the old header, or the new directory with
// the old autoclear word (recover_from_intent: a record beside a directory
// with nothing in_use finishes the switch), or the new header. A switch
// that drops the extension (no bitmap left) clears AUTOCLEAR_BITMAPS
// first instead, so that no sector mix shows a bitmaps extension QEMU
// refuses (zero bitmaps) while that bit still vouches for it.
// Live, the image's metadata mutex is taken only for phases 1, 3 and 5
// (allocation and refcounts, the header, the frees): the writes and the
// fsyncs run without it, so guest writes (which need it to look up or
// allocate clusters) are not held up behind the syncs (all but the one
// before a switch that drops the extension: removing the last bitmap). Data of an enabled
// bitmap may change meanwhile: a cluster that became dirty after phase 0 is
// stored as clean, which only an in_use bitmap can see (qcow2.txt
// "Bitmap directory", in_use: its stored contents mean nothing); disabled
// bitmaps only change in commit_live, which the caller's edit lock excludes, so
// they are stored exactly.
Result<void> rewrite_bitmap_directory(File& file, Header& header, Refcounts& refcounts,
                                      const std::vector<BitmapInfo>& old_directory, std::vector<BitmapUpdate>& updated,
                                      const LiveRewrite* live) {
  auto hold = [&] { return live ? live->lock() : std::unique_lock<std::mutex>(); };
  std::uint64_t cs;
  {
    auto lk = hold();
    if (header.version < 3) return make_error(ENOTSUP, "persistent bitmaps require a version 3 image (compat=1.1)");
    cs = header.cluster_size();
  }
  if (updated.size() > MAX_BITMAPS) return make_error(EFBIG, "too many bitmaps ({})", updated.size());

  // Phase 0: plan; the directory's size; the old clusters to free later.
  std::vector<TablePlan> plans;
  for (BitmapUpdate& u : updated) {
    if (!u.data) continue;
    TablePlan p;
    p.update = &u;
    const std::uint64_t data_bytes = u.data->byte_count();
    p.entries = std::max<std::uint64_t>(1, div_round_up(data_bytes, cs));
    if (p.entries > MAX_BITMAP_TABLE_SIZE || p.entries * cs > MAX_BITMAP_DATA_BYTES) {
      return make_error(EFBIG, "bitmap data of {} bytes is too large for qcow2", data_bytes);
    }
    // Clean clusters are not serialized: a sparse bitmap is stored in time
    // proportional to its dirty part.
    for (std::uint64_t i = 0; i < p.entries; ++i) {
      if (u.data->any_dirty_bytes(i * cs, cs)) p.dirty.push_back(i);
    }
    p.table_bytes = align_up(p.entries * 8, cs);
    plans.push_back(std::move(p));
  }
  std::uint64_t dir_size = 0;
  for (const BitmapUpdate& u : updated) {
    if (u.info.name.empty() || u.info.name.size() > MAX_BITMAP_NAME_SIZE) {
      return make_error(EINVAL, "invalid bitmap name '{}'", u.info.name);
    }
    dir_size += align_up(24 + u.info.name.size(), 8);
  }
  if (dir_size > MAX_BITMAP_DIRECTORY_SIZE) return make_error(EFBIG, "bitmap directory too large");
  std::vector<std::pair<std::uint64_t, std::uint64_t>> to_free;  // (offset, bytes)
  for (const BitmapInfo& old : old_directory) {
    bool kept = std::any_of(updated.begin(), updated.end(),
                            [&](const BitmapUpdate& u) { return !u.data && u.info.table_offset == old.table_offset; });
    if (kept) continue;
    // Nothing else writes a bitmap table (bitmap edits run one at a time),
    // so it reads the same now as at phase 5.
    auto data = table_data_clusters(file, old, cs);
    if (data) {
      for (std::uint64_t c : *data) to_free.emplace_back(c, cs);
    } else {
      log::warn("bitmap '{}': cannot read its old table ({}); its clusters leak", old.name, data.error().message);
    }
    to_free.emplace_back(old.table_offset, std::uint64_t{old.table_size} * 8);
  }

  // Until the header switch (phase 3) nothing points at the clusters
  // allocated here, so a failure before it gives them back: on a full disk
  // (the usual failure: the file cannot grow) each attempt would otherwise
  // leak what it allocated. Best effort; what is not given back leaks.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> allocated;  // (offset, bytes)
  auto give_back = [&](Error e) -> Error {
    auto lk = hold();
    for (auto [offset, bytes] : allocated) (void)refcounts.free(offset, bytes);
    (void)refcounts.block_cache().flush();
    return e;
  };
  auto allocate = [&](std::uint64_t n) -> Result<std::uint64_t> {
    const std::uint64_t at = QNBD_TRY(refcounts.allocate(n));
    allocated.emplace_back(at, n * cs);
    return at;
  };

  // Phase 1: allocate; write the refcount blocks back (synced in phase 2).
  std::uint64_t dir_offset = 0;
  const std::uint64_t dir_alloc = align_up(dir_size, cs);
  auto phase1 = [&]() -> Result<void> {
    auto lk = hold();
    for (TablePlan& p : plans) {
      for (std::size_t k = 0; k < p.dirty.size(); ++k) p.hosts.push_back(QNBD_TRY(allocate(1)));
      p.table_offset = QNBD_TRY(allocate(p.table_bytes / cs));
    }
    if (dir_alloc) dir_offset = QNBD_TRY(allocate(dir_alloc / cs));
    return refcounts.block_cache().flush();
  };
  if (auto r = phase1(); !r) return give_back(std::move(r).error());

  // Phase 2: data, tables, directory; then sync (data, tables, directory
  // and the refcount blocks of phase 1) before any pointer to them.
  std::vector<std::byte> dir_bytes;
  if (auto r = write_new_directory(file, cs, plans, updated, dir_offset, dir_alloc, dir_size, dir_bytes); !r) {
    return give_back(std::move(r).error());
  }
  // A live edit with a write-intent record arms the next record for this
  // directory now (it is durable), so the switch can keep the record bit.
  const bool keep_intent = live && live->before_switch && dir_alloc && live->before_switch(dir_offset, dir_bytes);

  // Phase 3: switch the header (from the current in-memory one: a refcount
  // table move or any other header change made meanwhile is kept).
  std::optional<std::uint64_t> autoclear_after;  // phase 4 writes it
  {
    auto lk = hold();
    if (live && header.corrupt()) {
      lk.unlock();
      return give_back(make_error(EIO, "image is marked corrupt; writes are refused"));
    }
    Header h = header;
    h.refcount_table_offset = refcounts.table_offset();
    h.refcount_table_clusters = refcounts.table_clusters();
    h.autoclear_features &= AUTOCLEAR_MASK;
    if (keep_intent) h.autoclear_features |= AUTOCLEAR_QNBD_INTENT;
    if (updated.empty()) {
      h.bitmaps.reset();
      h.autoclear_features &= ~AUTOCLEAR_BITMAPS;
    } else {
      h.bitmaps = BitmapsExtension{static_cast<std::uint32_t>(updated.size()), dir_size, dir_offset};
      h.autoclear_features |= AUTOCLEAR_BITMAPS;
    }
    std::vector<std::byte> c0 = QNBD_TRY(serialize_header(h));
    std::byte word[8];
    QNBD_TRY(file.read_exact(word, kAutoclearFeaturesOffset, "header"));
    std::uint64_t on_disk = load_be64(word);
    if ((on_disk & AUTOCLEAR_BITMAPS) && !h.bitmaps) {
      // The extension goes: stop vouching for it first (see above).
      on_disk &= ~AUTOCLEAR_BITMAPS;
      store_be64(word, on_disk);
      QNBD_TRY(file.pwrite(word, kAutoclearFeaturesOffset));
      QNBD_TRY(file.flush());
    }
    store_be64(c0.data() + kAutoclearFeaturesOffset, on_disk);
    QNBD_TRY(file.pwrite(c0, 0));
    if (on_disk != h.autoclear_features) autoclear_after = h.autoclear_features;
    if (header.bitmaps)
      to_free.emplace_back(header.bitmaps->bitmap_directory_offset, header.bitmaps->bitmap_directory_size);
    header = std::move(h);
  }
  // Phase 4: the new header is durable before anything it replaced is freed,
  // then its autoclear word (see above).
  QNBD_TRY(file.flush());
  if (autoclear_after) {
    std::byte word[8];
    store_be64(word, *autoclear_after);
    QNBD_TRY(file.pwrite(word, kAutoclearFeaturesOffset));
    QNBD_TRY(file.flush());
  }

  // Phase 5: free what is no longer referenced.
  {
    auto lk = hold();
    if (live && live->switched) live->switched(updated);
    for (auto [offset, bytes] : to_free) {
      if (auto r = refcounts.free(offset, bytes); !r) {
        log::warn("cannot free bitmap clusters at {:#x}: {}; they leak", offset, r.error().message);
      }
    }
    // Live, the lowered refcounts are written back without a sync (the next
    // flush makes them durable; a crash before that leaks only).
    if (live) {
      QNBD_TRY(refcounts.block_cache().flush());
    } else {
      QNBD_TRY(refcounts.flush());
    }
  }
  return ok();
}

Result<void> set_in_use_flags(std::span<std::byte> dir, const std::vector<bool>& which, bool in_use) {
  // The directory was validated when read and only qnbd writes it; walk
  // the entries again to find each one's flags field.
  std::uint64_t pos = 0;
  for (std::size_t i = 0; i < which.size(); ++i) {
    if (pos + 24 > dir.size()) return make_error(EIO, "bitmap directory changed under us");
    std::byte* p = dir.data() + pos;
    const std::uint64_t len = align_up(24ull + load_be32(p + 20) + load_be16(p + 18), 8);
    if (which[i]) {
      const std::uint32_t flags = load_be32(p + 12);
      store_be32(p + 12, in_use ? flags | BME_FLAG_IN_USE : flags & ~BME_FLAG_IN_USE);
    }
    pos += len;
  }
  return ok();
}

Result<void> BitmapStore::store(Refcounts& refcounts, Header& header) {
  return write_directory(refcounts, header, /*closing=*/true);
}

BitmapStore::BitmapStore(File& file, const Header& header, std::vector<BitmapInfo> directory, std::uint64_t file_size,
                         bool writable, IntentAccess intent)
    : file_(file), header_(header), directory_(std::move(directory)), file_size_(file_size), writable_(writable),
      intent_(std::move(intent)) {
  entries_.resize(directory_.size());
  for (std::size_t i = 0; i < directory_.size(); ++i) entries_[i].info = directory_[i];
}

void BitmapStore::adopt(std::unique_ptr<IntentRecord> record, std::vector<std::unique_ptr<DirtyBitmap>> recovered) {
  std::lock_guard lock(load_mutex_);
  std::unique_lock live_lock(live_mu_);
  tracking_.clear();
  for (std::size_t i = 0; i < entries_.size() && i < recovered.size(); ++i) {
    if (!recovered[i]) continue;
    Entry& e = entries_[i];
    e.bits = std::move(recovered[i]);
    // in_use on disk, but these contents are complete: as a bitmap loaded
    // consistent and then marked in_use by this session's first write.
    e.info.in_use = false;
    tracking_.push_back(i);
  }
  record_ = std::move(record);
  marked_.store(true, std::memory_order_release);
}

void BitmapStore::adopt_read_only(std::vector<std::unique_ptr<DirtyBitmap>> recovered) {
  std::lock_guard lock(load_mutex_);
  if (writable_ || recovered.size() != entries_.size()) return;
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    if (!recovered[i] || !entries_[i].info.in_use) continue;
    entries_[i].bits = std::move(recovered[i]);
    entries_[i].info.in_use = false;
  }
}

Result<DirtyBitmap*> BitmapStore::load_locked(Entry& e) {
  if (!e.bits) {
    DirtyBitmap b = QNBD_TRY(load_bitmap_data(file_, header_.cluster_size(), header_.size, e.info, file_size_));
    e.bits = std::make_unique<DirtyBitmap>(std::move(b));
  }
  return e.bits.get();
}

Result<std::size_t> BitmapStore::export_bitmap(const std::string& name) {
  std::lock_guard lock(load_mutex_);
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = entries_[i];
    if (e.removed || e.info.name != name) continue;
    // qemu-nbd (nbd_export_create -> bdrv_dirty_bitmap_check): a bitmap
    // found in_use at open is inconsistent. The other refusal, an enabled
    // bitmap on a read-only export of a writable node, cannot happen here:
    // a qnbd export is read-only exactly when its image is opened read-only.
    if (e.info.in_use) return make_error(EINVAL, "Bitmap '{}' is inconsistent and cannot be used", name);
    QNBD_TRY(load_locked(e));
    return i;
  }
  return make_error(ENOENT, "Bitmap '{}' is not found", name);
}

Result<std::size_t> BitmapStore::status(std::size_t handle, std::uint64_t offset, std::uint64_t length,
                                        std::span<BitmapExtent> out) {
  std::shared_lock lock(live_mu_);
  if (handle >= entries_.size() || !entries_[handle].bits) {
    return make_error(ENOENT, "bitmap handle {} was not exported", handle);
  }
  return entries_[handle].bits->runs(offset, length, out);
}

Result<void> BitmapStore::before_write(std::uint64_t offset, std::uint64_t length) {
  if (!marked_.load(std::memory_order_acquire)) {
    std::lock_guard lock(load_mutex_);
    if (!marked_.load(std::memory_order_relaxed)) {
      if (!writable_) return make_error(EROFS, "bitmaps: image is open read-only");
      QNBD_TRY(mark_in_use_locked());
      marked_.store(true, std::memory_order_release);
    }
  }
  // Set before the write is issued (STYLE: a spurious bit costs a copy, a
  // missing one breaks the next incremental backup).
  std::shared_lock lock(live_mu_);
  for (std::size_t i : tracking_) entries_[i].bits->set_range(offset, length);
  // Crash safety: the chunk is durable in the record before the caller
  // issues anything for this request (docs/crash-safe-bitmaps.md, step 3);
  // during a live edit's switch in the next record too.
  if (record_) QNBD_TRY(record_->mark(offset, length));
  if (next_record_) QNBD_TRY(next_record_->mark(offset, length));
  return ok();
}

// Load every enabled, consistent bitmap, then set in_use for them in the file
// with the crash-safe in-place directory update (QEMU's
// update_ext_header_and_dir_in_place). Disabled bitmaps never change, so they
// stay consistent on disk (and usable after a crash).
Result<void> BitmapStore::mark_in_use_locked() {
  std::vector<std::size_t> tracking;
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = entries_[i];
    if (e.info.in_use || !e.info.auto_enabled) continue;
    QNBD_TRY(load_locked(e));
    tracking.push_back(i);
  }
  if (!tracking.empty()) {
    const BitmapsExtension& ext = *header_.bitmaps;  // entries exist only with the extension
    std::vector<std::byte> dir(static_cast<std::size_t>(ext.bitmap_directory_size));
    QNBD_TRY(file_.read_exact(dir, ext.bitmap_directory_offset, "bitmap directory"));
    const std::uint64_t checksum_before = fnv1a64(dir);
    std::vector<bool> tracked(entries_.size());
    for (std::size_t i : tracking) tracked[i] = true;
    QNBD_TRY(set_in_use_flags(dir, tracked, true));
    // Crash outcomes without a record: after step 1 the extension is
    // ignored (all bitmaps lost as inconsistent, clusters leak); after step
    // 2 the same; after step 3 the tracked bitmaps read as in_use
    // (inconsistent). Never a consistent-looking bitmap that missed a write.
    //
    // With the write-intent record (docs/crash-safe-bitmaps.md, arming): it
    // is written and synced first, naming this directory both as it is now
    // and as it is about to be; step 1 then sets AUTOCLEAR_QNBD_INTENT with
    // clearing AUTOCLEAR_BITMAPS, and step 3 keeps it. From step 1 on, a
    // crash leaves the bit set and a directory the record matches (old or
    // new: one sector, written whole), so recovery restores consistent
    // bitmaps; no guest write has been issued before step 3 returns. A
    // failure to arm only loses the feature for this open.
    std::unique_ptr<IntentRecord> record;
    if (intent_) {
      IntentIdentity id{header_.size,
                        ext.bitmap_directory_offset,
                        ext.bitmap_directory_size,
                        fnv1a64(dir),
                        checksum_before,
                        static_cast<std::uint32_t>(entries_.size())};
      // A next record left by a crash inside a live edit (recovered or
      // retired since) must not outlive this arming.
      if (intent_.remove_next) intent_.remove_next();
      auto armed = [&]() -> Result<std::unique_ptr<IntentRecord>> {
        std::unique_ptr<File> f = QNBD_TRY(intent_.open(true));
        return IntentRecord::arm(std::move(f), id, intent_.chunk_size, tracked);
      }();
      if (armed) {
        record = std::move(*armed);
      } else {
        log::warn("{}: cannot write the write-intent record {} ({}); after a crash the bitmaps will be "
                  "inconsistent",
                  file_.name(), intent_.name, armed.error().message);
      }
    }
    std::byte ac[8];
    const std::uint64_t intent_bit = record ? AUTOCLEAR_QNBD_INTENT : 0;
    store_be64(ac, (header_.autoclear_features & ~(AUTOCLEAR_BITMAPS | AUTOCLEAR_QNBD_INTENT)) | intent_bit);
    QNBD_TRY(file_.pwrite(ac, kAutoclearFeaturesOffset));
    QNBD_TRY(file_.flush());
    QNBD_TRY(file_.pwrite(dir, ext.bitmap_directory_offset));
    QNBD_TRY(file_.flush());
    store_be64(ac, (header_.autoclear_features & ~AUTOCLEAR_QNBD_INTENT) | AUTOCLEAR_BITMAPS | intent_bit);
    QNBD_TRY(file_.pwrite(ac, kAutoclearFeaturesOffset));
    QNBD_TRY(file_.flush());
    record_ = std::move(record);
  }
  tracking_ = std::move(tracking);
  return ok();
}

Result<IntentRecovery> recover_from_intent(File& file, Header& header, Refcounts* refcounts, std::uint64_t file_size,
                                           const IntentAccess& intent) {
  IntentRecovery out;
  if (!(header.autoclear_features & AUTOCLEAR_QNBD_INTENT)) {
    out.state = "none";
    return out;
  }
  // Each refusal below leaves the bitmaps as they are: in_use ones stay
  // inconsistent, exactly as if there had been no record.
  auto stale = [&](std::string why) {
    out.state = "stale";
    out.detail = std::move(why);
    return std::move(out);
  };
  if (!intent) {
    out.state = "off";
    out.detail = "recovery is turned off";
    return out;
  }
  // A crash inside the arming sequence (between its steps 1 and 3) leaves
  // AUTOCLEAR_BITMAPS clear with our bit set: only we did that, and the
  // record says which directory to expect, so read the extension anyway.
  Header h = header;
  if (!(h.autoclear_features & AUTOCLEAR_BITMAPS) && h.version >= 3) {
    std::vector<std::byte> c0(static_cast<std::size_t>(std::min<std::uint64_t>(file_size, 1ull << MAX_CLUSTER_BITS)));
    QNBD_TRY(file.read_exact(c0, 0, "header"));
    store_be64(c0.data() + kAutoclearFeaturesOffset,
               load_be64(c0.data() + kAutoclearFeaturesOffset) | AUTOCLEAR_BITMAPS);
    auto parsed = parse_header(c0, file_size);
    if (!parsed) return stale(fmt::format("bitmaps extension: {}", parsed.error().message));
    h = std::move(*parsed);
  }
  if (!h.bitmaps) return stale("the image has no bitmaps extension");
  auto directory = read_bitmap_directory(file, h, file_size);
  if (!directory) return stale(directory.error().message);
  // A store's header switch durable but not yet the autoclear word written
  // after it (rewrite_bitmap_directory, phase 4): the directory is the new
  // one, nothing in it is in_use, so every bitmap is consistent as stored;
  // only the word is left to write. Our bit set means no other writer has
  // touched the image since (it would have cleared the bit), and qnbd
  // issues no guest write while a tracked bitmap is not in_use, so this
  // holds whatever the record says: the record is not needed.
  const bool all_consistent =
      std::none_of(directory->begin(), directory->end(), [](const BitmapInfo& b) { return b.in_use; });
  auto finish_switch = [&](const std::string& why) -> Result<IntentRecovery> {
    if (!refcounts) {
      out.state = "pending";
      out.detail = fmt::format("no bitmap is in use ({}); the next writable open clears the record's bit", why);
      out.directory = *directory;
      return std::move(out);
    }
    h.autoclear_features = (h.autoclear_features | AUTOCLEAR_BITMAPS) & ~AUTOCLEAR_QNBD_INTENT;
    std::byte word[8];
    QNBD_TRY(file.read_exact(word, kAutoclearFeaturesOffset, "header"));
    store_be64(word, (load_be64(word) | AUTOCLEAR_BITMAPS) & ~AUTOCLEAR_QNBD_INTENT);
    QNBD_TRY(file.pwrite(word, kAutoclearFeaturesOffset));
    QNBD_TRY(file.flush());
    header = std::move(h);
    out.state = "recovered";
    out.detail = fmt::format("no bitmap is in use ({}): a store's header switch was finished", why);
    out.rewrote = true;
    if (intent.remove) intent.remove();
    if (intent.remove_next) intent.remove_next();
    return std::move(out);
  };
  const BitmapsExtension& ext = *h.bitmaps;
  std::vector<std::byte> dir(static_cast<std::size_t>(ext.bitmap_directory_size));
  QNBD_TRY(file.read_exact(dir, ext.bitmap_directory_offset, "bitmap directory"));
  IntentIdentity id{h.size,
                    ext.bitmap_directory_offset,
                    ext.bitmap_directory_size,
                    fnv1a64(dir),
                    0,
                    static_cast<std::uint32_t>(directory->size())};
  // The record, or (a crash inside a live edit, after its header switch and
  // before the rename: docs/crash-safe-bitmaps.md, "Live edits") the next
  // record: the one armed for the directory on disk.
  // Arming's in_use marking (mark_in_use_locked, step 3) rewrites the
  // directory in place, and a directory of more than one sector (about ten
  // bitmaps with checkpoint-style names) can land torn: some tracked
  // entries in_use, some not, matching neither checksum the record holds.
  // Such a mix, with every enabled entry set in_use, is the directory as
  // armed: recognised so, it recovers like it (no guest write was issued
  // before that step's sync returned).
  IntentIdentity id_armed = id;
  {
    std::vector<bool> enabled(directory->size());
    for (std::size_t i = 0; i < directory->size(); ++i) enabled[i] = (*directory)[i].auto_enabled;
    std::vector<std::byte> marked = dir;
    QNBD_TRY(set_in_use_flags(marked, enabled, true));
    id_armed.directory_checksum = fnv1a64(marked);
  }
  std::optional<IntentContents> rec;
  std::string why;
  bool found = false;
  bool torn_marking = false;
  int found_as = 0;
  for (int which = 0; which < 2 && !rec; ++which) {
    if (which == 1 && !intent.open_next) break;
    const std::string name = which == 0 ? intent.name : intent.name + ".next";
    auto f = which == 0 ? intent.open(false) : intent.open_next(false);
    if (!f) {
      if (why.empty()) why = fmt::format("cannot open {}: {}", name, f.error().message);
      continue;
    }
    if (!*f) continue;
    found = true;
    auto r = read_intent(**f, id);
    if (!r && id_armed.directory_checksum != id.directory_checksum) {
      if (auto t = read_intent(**f, id_armed); t && !t->before_marking) {
        r = std::move(t);
        torn_marking = true;
      }
    }
    if (r) {
      rec = std::move(*r);
      found_as = which;
    } else if (why.empty() || which == 0) {
      why = r.error().message;
    }
  }
  if (!rec && !found && why.empty()) {
    if (all_consistent) return finish_switch(fmt::format("{} does not exist", intent.name));
    out.state = "missing";
    out.detail = fmt::format("{} does not exist", intent.name);
    return out;
  }
  if (!rec) return all_consistent ? finish_switch(why) : stale(why);
  for (std::size_t i = 0; i < directory->size(); ++i) {
    // Tracked bitmaps were enabled and consistent when armed, and in_use
    // once the directory was switched; anything else means this is not the
    // directory the record was armed for.
    const BitmapInfo& b = (*directory)[i];
    if (rec->tracked[i] && (!b.auto_enabled || (!torn_marking && b.in_use == rec->before_marking))) {
      std::string why2 = fmt::format("bitmap '{}' is not in the state the record was armed for", b.name);
      return all_consistent ? finish_switch(why2) : stale(why2);
    }
  }
  // The tables still hold each bitmap's contents as last stored consistent
  // (in_use is set in place; contents only ever go to new clusters).
  std::vector<std::unique_ptr<DirtyBitmap>> data;
  std::vector<BitmapUpdate> updated;
  unsigned n = 0;
  for (std::size_t i = 0; i < directory->size(); ++i) {
    const BitmapInfo& b = (*directory)[i];
    BitmapUpdate u{b, nullptr};
    if (rec->tracked[i]) {
      auto bits = load_bitmap_data(file, h.cluster_size(), h.size, b, file_size);
      if (!bits) return stale(fmt::format("bitmap '{}': {}", b.name, bits.error().message));
      for (std::uint64_t c : rec->chunks) bits->set_range(c * rec->chunk_size, rec->chunk_size);
      data.push_back(std::make_unique<DirtyBitmap>(std::move(*bits)));
      u.data = data.back().get();
      u.info.in_use = false;
      ++n;
    }
    updated.push_back(std::move(u));
  }
  auto held = [&] {
    out.recovered.resize(directory->size());
    for (std::size_t i = 0, k = 0; i < directory->size(); ++i) {
      if (rec->tracked[i]) out.recovered[i] = std::move(data[k++]);
    }
    out.contents = std::move(*rec);
    out.from_next = found_as == 1;
    out.directory_offset = ext.bitmap_directory_offset;
    out.directory_size = ext.bitmap_directory_size;
    out.directory = *directory;
    return std::move(out);
  };
  if (!refcounts) {
    out.state = "pending";
    out.detail =
        fmt::format("{} is valid: {} chunk(s) of {} bytes marked; the next writable open recovers {} bitmap(s)",
                    intent.name, rec->chunks.size(), rec->chunk_size, n);
    return held();
  }
  // One header switch stores them consistent, sets AUTOCLEAR_BITMAPS and
  // clears AUTOCLEAR_QNBD_INTENT; a crash before it leaves the record valid.
  if (auto stored = rewrite_bitmap_directory(file, h, *refcounts, *directory, updated); !stored) {
    out.state = "unstored";
    out.detail = fmt::format("cannot store the {} recovered bitmap(s): {}", n, stored.error().message);
    out.error_code = stored.error().code;
    return held();
  }
  header = std::move(h);
  out.state = "recovered";
  out.detail = fmt::format("{} bitmap(s) recovered from {} ({} chunk(s) of {} bytes marked)", n, intent.name,
                           rec->chunks.size(), rec->chunk_size);
  out.rewrote = true;
  if (intent.remove) intent.remove();
  return out;
}

}  // namespace qnbd::image::qcow2
