#include "image/qcow2/bitmap_store.hpp"

#include <algorithm>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"

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
  for (std::uint64_t i = 0; i < info.table_size; ++i) {
    const std::uint64_t e = load_be64(table.data() + i * 8);
    const std::uint64_t host = e & BME_TABLE_ENTRY_OFFSET_MASK;
    const std::uint64_t first = i * cluster_size;
    const std::uint64_t n = std::min(cluster_size, data_bytes - first);
    // §12.4, as QEMU's check_table_entry.
    if ((e & BME_TABLE_ENTRY_RESERVED_MASK) ||
        (host != 0 && ((e & BME_TABLE_ENTRY_FLAG_ALL_ONES) || !is_aligned(host, cluster_size) ||
                       !range_within(host, cluster_size, file_size)))) {
      return make_error(EINVAL, "bitmap '{}': invalid bitmap table entry {:#018x}", info.name, e);
    }
    if (host == 0) {
      // Freshly created bitmaps are all zeroes already.
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

BitmapStore::BitmapStore(File& file, const Header& header, std::vector<BitmapInfo> directory,
                         std::uint64_t file_size, bool writable)
    : file_(file), header_(header), directory_(std::move(directory)), file_size_(file_size), writable_(writable) {
  entries_.resize(directory_.size());
  for (std::size_t i = 0; i < directory_.size(); ++i) entries_[i].info = directory_[i];
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
    if (e.info.name != name) continue;
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
  for (std::size_t i : tracking_) entries_[i].bits->set_range(offset, length);
  return ok();
}

// §12.6: load every enabled, consistent bitmap, then set in_use for them in
// the file with the crash-safe in-place directory update. Disabled bitmaps
// never change, so they stay consistent on disk (and usable after a crash).
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
    // The directory was validated at open and only we write it; walk the
    // entries again to find each one's flags field.
    std::uint64_t pos = 0;
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      if (pos + 24 > dir.size()) return make_error(EIO, "bitmap directory changed under us");
      std::byte* p = dir.data() + pos;
      const std::uint64_t len = align_up(24ull + load_be32(p + 20) + load_be16(p + 18), 8);
      if (std::find(tracking.begin(), tracking.end(), i) != tracking.end()) {
        store_be32(p + 12, load_be32(p + 12) | BME_FLAG_IN_USE);
      }
      pos += len;
    }
    // Crash outcomes: after step 1 the extension is ignored (all bitmaps
    // lost as inconsistent, clusters leak); after step 2 the same; after
    // step 3 the tracked bitmaps read as in_use (inconsistent). Never a
    // consistent-looking bitmap that missed a write.
    std::byte ac[8];
    store_be64(ac, header_.autoclear_features & ~AUTOCLEAR_BITMAPS);
    QNBD_TRY(file_.pwrite(ac, 88));
    QNBD_TRY(file_.flush());
    QNBD_TRY(file_.pwrite(dir, ext.bitmap_directory_offset));
    QNBD_TRY(file_.flush());
    store_be64(ac, header_.autoclear_features | AUTOCLEAR_BITMAPS);
    QNBD_TRY(file_.pwrite(ac, 88));
    QNBD_TRY(file_.flush());
  }
  tracking_ = std::move(tracking);
  return ok();
}

}  // namespace qnbd::image::qcow2
