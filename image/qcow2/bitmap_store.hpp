// BitmapStore: the persistent dirty bitmaps of one open qcow2 image (qcow2.txt
// "Bitmaps"; exported as QEMU's nbd/server.c does, docs/interop/nbd.rst
// "qemu namespace"): loads bitmap data on demand, answers
// qemu:dirty-bitmap:NAME status, records guest writes in the enabled bitmaps
// and marks them in_use on disk before the first change.
//
// Thread-safety: export_bitmap/status/before_write may be called from any
// thread. load_mutex_ serializes loading and the one-time in_use update (it
// is held over file I/O, but only until the first write has been prepared);
// each DirtyBitmap has its own lock for the hot path. The image's metadata
// mutex must NOT be held when calling before_write (it does file I/O the
// first time).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/bitmap/dirty_bitmap.hpp"
#include "image/block_device.hpp"
#include "image/info.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/header.hpp"

namespace qnbd::image::qcow2 {

// qcow2.txt "Bitmap table", "Bitmap data": read bitmap `info`'s table and data
// clusters into a new DirtyBitmap of `disk_size` bytes. Every table entry is
// checked again (reserved bits, alignment, inside the file); all-ones entries
// (bit 0 with no offset) set their whole cluster of data. Unused tail bits are
// ignored, as QEMU does.
[[nodiscard]] Result<DirtyBitmap> load_bitmap_data(File& file, std::uint64_t cluster_size, std::uint64_t disk_size,
                                                   const BitmapInfo& info, std::uint64_t file_size);

class Refcounts;

// One entry of a bitmap directory to write (qcow2.txt "Bitmap directory"):
// `info` gives name, granularity and flags (in_use, auto). With `data`, its
// contents are written to newly allocated clusters and a new table replaces the
// old one; without, the existing table at info.table_offset/table_size is kept.
struct BitmapUpdate {
  BitmapInfo info;
  const DirtyBitmap* data = nullptr;
};

// How rewrite_bitmap_directory runs beside guest writes (a live edit):
// `lock` takes the image's metadata mutex, which guards `header` and the
// refcounts; it is held only around allocation, the header switch and the
// frees, never over a sync. `switched` runs under it once the new header is
// on disk and before the old clusters are freed (the image registers the
// new directory and tables for overlap checks: a freed cluster reused by a
// guest write must not still be registered as a bitmap table).
struct LiveRewrite {
  std::function<std::unique_lock<std::mutex>()> lock;
  std::function<void(const std::vector<BitmapUpdate>&)> switched;
  // Called once the new directory is durable and before the header switch,
  // with the directory's offset and bytes: true keeps AUTOCLEAR_QNBD_INTENT
  // set in the switch (a write-intent record for the new directory is
  // armed; docs/crash-safe-bitmaps.md, "Live edits").
  std::function<bool(std::uint64_t offset, std::span<const std::byte> directory)> before_switch;
};

// Replace the image's bitmap directory by `updated` (any order, may be
// empty), as QEMU's full directory replacement (update_ext_header_and_dir):
//   1. write new bitmap data (all-zero clusters become table entry 0) and
//      tables into newly allocated clusters, then the new directory;
//   2. flush refcounts and the file (the clusters are referenced by nothing
//      yet: a crash here only leaks them);
//   3. rewrite the header (bitmaps extension, autoclear bit 0 set; with no
//      bitmaps left the extension is dropped and the bit cleared; unknown
//      autoclear bits are cleared as qcow2.txt "Header" requires of a writer)
//      and flush;
//   4. free the old directory and the tables and data clusters no longer
//      referenced, and flush the refcounts (a failure here leaks only).
// (bitmap_store.cpp gives the crash-ordering argument phase by phase.)
// `header` is updated in memory (also refcount_table_* if the refcount
// table moved). `old_directory` is the directory currently on disk.
// Without `live` the caller holds whatever guards `header` and `refcounts`
// throughout (close, recovery at open, an image at rest); with it, see
// LiveRewrite (the last refcount write-back is then not synced).
[[nodiscard]] Result<void> rewrite_bitmap_directory(File& file, Header& header, Refcounts& refcounts,
                                                    const std::vector<BitmapInfo>& old_directory,
                                                    std::vector<BitmapUpdate>& updated,
                                                    const LiveRewrite* live = nullptr);

// Crash recovery at a writable open (docs/crash-safe-bitmaps.md): if the
// header has AUTOCLEAR_QNBD_INTENT and `intent` finds a record that matches
// the image, every bitmap the record tracked gets its stored contents OR
// the record's chunks and is stored consistent (in_use cleared) with
// rewrite_bitmap_directory, which also clears the autoclear bit. Without a
// trusted record nothing is written (the caller clears the bit; bitmaps
// found in_use stay inconsistent, as without the feature). Returns a line
// for logs and `info`: what was found and done ("" if the bit was clear).
struct IntentRecovery {
  // "none", "off", "recovered", "pending", "unstored", "stale", "missing"
  std::string state;
  std::string detail;    // why stale or unstored, or what was recovered
  bool rewrote = false;  // the directory was rewritten
  int error_code = 0;    // "unstored": the rewrite's errno
  // "pending" and "unstored" (a trusted record, nothing stored): per
  // directory entry the recovered contents of each tracked bitmap (null
  // for the others), the record as read, and whether it was found under
  // the next record's name.
  std::vector<std::unique_ptr<DirtyBitmap>> recovered;
  IntentContents contents;
  bool from_next = false;
  // Where the directory the record matches is (the header's extension,
  // read even while AUTOCLEAR_BITMAPS is clear: a crash inside arming).
  std::uint64_t directory_offset = 0;
  std::uint64_t directory_size = 0;
  // "pending": that directory's entries as read. While AUTOCLEAR_BITMAPS is
  // clear the image's own header hides them (QEMU ignores the extension);
  // a read-only open exports these instead (Qcow2Image::open).
  std::vector<BitmapInfo> directory;
};
// With refcounts null (a read-only open) nothing is written: a trusted
// record is reported as "pending". "unstored": the rewrite failed (a full
// disk, an I/O error) part-way; the file then holds what a crash at that
// point would leave, and the caller's in-memory header and refcounts may
// not match it (Qcow2Image reloads them).
[[nodiscard]] Result<IntentRecovery> recover_from_intent(File& file, Header& header, Refcounts* refcounts,
                                                         std::uint64_t file_size, const IntentAccess& intent);

// Set or clear in_use (qcow2.txt "Bitmap directory", flags bit 0) in
// `dir`, the bytes of a bitmap directory, for each entry i with which[i].
[[nodiscard]] Result<void> set_in_use_flags(std::span<std::byte> dir, const std::vector<bool>& which, bool in_use);

class BitmapStore {
 public:
  // `header` must outlive the store (the image's own header); `writable`
  // says whether the image is open read-write. With `intent`, the first
  // write arms a write-intent record and every write marks it first.
  BitmapStore(File& file, const Header& header, std::vector<BitmapInfo> directory, std::uint64_t file_size,
              bool writable, IntentAccess intent = {});

  // The armed record, if any (for info and tests).
  const IntentRecord* intent_record() const { return record_.get(); }

  const std::vector<BitmapInfo>& directory() const { return directory_; }

  // BlockDevice::export_bitmap with qemu-nbd's refusals and wording.
  [[nodiscard]] Result<std::size_t> export_bitmap(const std::string& name);
  // BlockDevice::bitmap_status for a handle from export_bitmap; `offset` +
  // `length` must already be clipped to the export size by the caller.
  [[nodiscard]] Result<std::size_t> status(std::size_t handle, std::uint64_t offset, std::uint64_t length,
                                           std::span<BitmapExtent> out);

  // Record a guest change of [offset, offset+length) in every enabled,
  // consistent bitmap. The first call (only) loads those bitmaps and sets
  // in_use for them on disk (QEMU's in-place directory update,
  // update_ext_header_and_dir_in_place) before returning; a failure there fails
  // this write and the next call tries again.
  [[nodiscard]] Result<void> before_write(std::uint64_t offset, std::uint64_t length);

  // True once before_write has set in_use on disk (close must store them).
  bool marked_in_use() const { return marked_.load(std::memory_order_acquire); }

  // Clean close (as QEMU's qcow2_store_persistent_dirty_bitmaps): if
  // before_write marked bitmaps in_use, store their contents with
  // rewrite_bitmap_directory and clear in_use; otherwise no I/O. Call with no
  // write in flight, after guest data, L2 tables and refcounts are flushed,
  // under the image's metadata mutex. `header` is the image's header (updated
  // in place).
  [[nodiscard]] Result<void> store(Refcounts& refcounts, Header& header);

  // Continue a crashed session's armed state (docs/crash-safe-bitmaps.md,
  // "When recovery cannot store"): the directory on disk has the tracked
  // bitmaps in_use and `record` covers every change since their last
  // store. `recovered` (one per directory entry, null where untracked)
  // holds their stored contents OR the record's chunks; they are exported
  // and marked as if loaded consistent, writes mark `record`, and store()
  // at close writes them and retires it. Call before any write.
  void adopt(std::unique_ptr<IntentRecord> record, std::vector<std::unique_ptr<DirtyBitmap>> recovered);
  // A read-only open of a crashed writer's image whose record is trusted
  // ("pending"): export `recovered` (one per directory entry, null where
  // untracked: what the next writable open will store) instead of refusing
  // those bitmaps as inconsistent. Nothing is written, now or at close.
  // Ignored unless `recovered` matches the directory entry for entry.
  void adopt_read_only(std::vector<std::unique_ptr<DirtyBitmap>> recovered);

  // ---- Live edits (bitmap_live.cpp) ----
  // A validated edit; holds edit_mutex_ so live edits of one image run one
  // at a time from prepare to the end of write_directory.
  struct LiveEdit {
    std::unique_lock<std::mutex> lock;
    std::vector<LiveBitmapOp> ops;
    std::vector<BitmapInfo> added;                      // one per add, in order
    std::vector<std::unique_ptr<DirtyBitmap>> created;  // their (clean) contents
  };
  // Check `ops` with check_bitmap_op (the at-rest rules and words), load
  // the bitmaps they read or enable, create the added ones, and mark the
  // enabled bitmaps in_use on disk if no write did yet. Writable only.
  [[nodiscard]] Result<LiveEdit> prepare_live(const std::vector<LiveBitmapOp>& ops);
  // Apply a prepared edit in memory. Call with no write in flight (the
  // device's write gate closed): writes that follow mark the new set of
  // enabled bitmaps. Cannot fail.
  void commit_live(LiveEdit& edit) noexcept;
  // Write the directory as the bitmaps are now (rewrite_bitmap_directory):
  // enabled bitmaps in_use (their data is written at close), the others
  // with their contents where they changed. `closing`: store() instead.
  // Without `live`, under the image's metadata mutex (close); with it
  // (after a live edit, holding its LiveEdit), without: the metadata mutex
  // is taken by rewrite_bitmap_directory for its short steps only, and
  // load_mutex_ is not held across them (close takes the metadata mutex,
  // then load_mutex_: that order is kept).
  [[nodiscard]] Result<void> write_directory(Refcounts& refcounts, Header& header, bool closing,
                                             const LiveRewrite* live = nullptr);
  [[nodiscard]] Result<std::vector<BitmapState>> states();

 private:
  struct Entry {
    BitmapInfo info;
    std::unique_ptr<DirtyBitmap> bits;  // null until loaded
    bool removed = false;               // removed live: kept so exported handles stay valid
    bool changed = false;               // contents differ from the table on disk
  };
  Result<DirtyBitmap*> load_locked(Entry& e);
  Result<void> mark_in_use_locked();
  bool arm_next_record(std::uint64_t disk_size, std::uint64_t dir_offset, std::span<const std::byte> dir,
                       const std::vector<BitmapUpdate>& updated);

  File& file_;
  const Header& header_;
  std::vector<BitmapInfo> directory_;
  std::uint64_t file_size_;
  bool writable_;

  std::mutex edit_mutex_;  // one live edit at a time (outermost)
  std::mutex load_mutex_;
  // entries_ and tracking_ change only in commit_live, which holds
  // load_mutex_ and live_mu_ exclusively; readers hold either.
  std::shared_mutex live_mu_;
  // One per directory entry at open, same order, then live additions;
  // entries are never erased (handles are indexes).
  std::vector<Entry> entries_;
  std::atomic<bool> marked_{false};
  // Enabled, consistent bitmaps (indexes into entries_), valid once marked_.
  std::vector<std::size_t> tracking_;
  IntentAccess intent_;
  std::unique_ptr<IntentRecord> record_;  // armed with marked_, under load_mutex_
  // During a live edit's switch: the record armed for the new directory,
  // marked by every write as record_ is, until it replaces record_. Set and
  // cleared under live_mu_ (exclusive).
  std::unique_ptr<IntentRecord> next_record_;
};

}  // namespace qnbd::image::qcow2
