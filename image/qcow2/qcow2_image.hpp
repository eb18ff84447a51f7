// Qcow2Image: the qcow2 BlockDevice (open, read path, block status, info).
//
// Thread-safety: one metadata mutex (mutex_) guards the L1 table, the L2
// table cache, the refcounts and every other piece of metadata state. Reads
// hold it only while looking up a mapping (get_host_offset) and release it
// around guest data I/O, so reads of different clusters run in parallel.
// The one field read without it is file_size_ (atomic; read_compressed).
//
// Writes (write.cpp): every allocating, copy-on-write, zeroing or discarding
// step runs under mutex_, including its data copy. An overwrite of an
// allocated COPIED cluster only looks up the mapping under mutex_, then
// takes data_lock_ shared, drops mutex_ and writes the data. Applying queued
// frees (flush) takes data_lock_ exclusive (under mutex_), so no such write
// can land in a cluster after it was freed and reused.
// Locking order: mutex_, then data_lock_; bitmap locks are taken by
// bitmaps_before_write() with neither held.
//
// lazy_refcounts: refcounts are always written back before the L2 entries
// that need them (the ordered path: the L2 cache depends on the refcount
// block cache), so the dirty bit is never set by this
// writer; a writable open of an image left dirty by another writer rebuilds
// its refcounts (check_qcow2 repair all) and clears the bit first.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "image/block_device.hpp"
#include "image/qcow2/bitmap_store.hpp"
#include "image/qcow2/cache.hpp"
#include "image/qcow2/cluster.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/overlap.hpp"
#include "image/qcow2/refcount.hpp"
#include "image/write_gate.hpp"

namespace qnbd::image::qcow2 {

// Opens the backing image named in the header: (name as stored, format
// from the extension or "") -> device. Resolution against the overlay's
// directory, loop and depth checks live in open.cpp.
using BackingOpener =
    std::function<Result<std::unique_ptr<BlockDevice>>(const std::string& name, const std::string& format)>;

class Qcow2Image final : public BlockDevice {
 public:
  struct Parts {
    std::unique_ptr<File> file;
    std::string path;                   // as given (for messages and info)
    std::unique_ptr<File> data_file;    // optional: overrides the external data file name
    BackingOpener open_backing;         // optional: without it a backing file is an error
    std::string full_backing_filename;  // filled in by the opener's caller for info
    // The write-intent record beside the image (bitmap_intent.hpp): empty
    // turns crash recovery of bitmaps off (writes then track as before).
    IntentAccess intent;
  };

  [[nodiscard]] static Result<std::unique_ptr<Qcow2Image>> open(Parts parts, const OpenOptions& options);
  ~Qcow2Image() override;

  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  const char* format() const override { return "qcow2"; }

  Result<void> read(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  Result<void> discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) override;
  Result<void> flush() override;
  Result<void> close() override;
  Result<std::size_t> block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) override;
  Result<LayerStatus> layer_status(std::uint64_t offset, std::uint64_t max_length) override;
  // Plain data clusters of an image opened read-only (nothing can free and
  // reuse a cluster then); everything else goes through read().
  Result<HostRun> host_run(std::uint64_t offset, std::uint64_t max_length) override;
  BlockDevice* backing() const override { return backing_.get(); }
  ImageInfo info() const override;

  // Persistent dirty bitmaps (qcow2.txt "Bitmaps"; implemented in bitmap_store.cpp).
  Result<std::size_t> export_bitmap(const std::string& name) override;
  Result<void> start_tracking() override;
  Result<std::size_t> bitmap_status(std::size_t handle, std::uint64_t offset, std::uint64_t length,
                                    std::span<BitmapExtent> out) override;
  // Live bitmap edits (bitmap_live.cpp): see BlockDevice. Every write,
  // write_zeroes and discard holds a pass of gate_ from before it marks
  // the bitmaps until its data is written.
  Result<std::vector<BitmapState>> bitmap_states() override;
  Result<std::unique_ptr<BitmapTransaction>> begin_bitmap_edit(const std::vector<LiveBitmapOp>& ops) override;
  WriteGate* write_gate() override { return &gate_; }
  // The write path MUST call this before changing anything for a guest
  // write, write_zeroes or discard of [offset, offset+length) (before the
  // data write, before any allocation or L2 update), WITHOUT mutex_ held,
  // and fail the request if it fails. It marks every touched granule in
  // every enabled bitmap; the first call also loads those bitmaps and sets
  // in_use for them on disk (QEMU's in-place directory update, flushed) — once
  // per open. Cheap afterwards (one bitmap lock per enabled bitmap).
  [[nodiscard]] Result<void> bitmaps_before_write(std::uint64_t offset, std::uint64_t length);
  // close() of a writable image MUST, once no write is in flight and guest
  // data, L2 tables and refcounts are flushed, with mutex_ held and before
  // clearing the dirty bit, call bitmap_store().store(refcounts, header_):
  // it writes the marked bitmaps to new clusters, switches the header and
  // clears in_use (no I/O if no write happened). Report its error from close().
  BitmapStore& bitmap_store() { return *bitmap_store_; }

  // The central lookup (cluster.cpp): the run of guest bytes starting at
  // offset (at most max_bytes, never crossing an L2 table) that share one
  // subcluster type and, where they have one, contiguous host offsets.
  [[nodiscard]] Result<Mapping> get_host_offset(std::uint64_t offset, std::uint64_t max_bytes);

  const Header& header() const { return header_; }
  const std::vector<BitmapInfo>& bitmaps() const { return bitmaps_; }
  // The write-intent record as found at open ("none", "pending",
  // "recovered", "kept", "stale", "missing") and why.
  const std::string& intent_state() const { return intent_state_; }
  const std::string& intent_detail() const { return intent_detail_; }
  const std::vector<SnapshotInfo>& snapshots() const { return snapshots_; }
  TableCache& l2_cache() { return *l2_cache_; }
  void set_full_backing_filename(std::string name) { full_backing_filename_ = std::move(name); }

  // Metadata overlap protection (overlap.hpp), writable opens only (null
  // read-only). Every guest data write to the image file, every metadata
  // write and every allocation is checked against it first; a hit fails
  // with EIO and sets the corrupt bit. For tests and fuzzers, with no
  // request in flight: metadata_map()->find(host, bytes) says whether a host
  // range holds metadata now.
  const MetadataMap* metadata_map() const { return metadata_.get(); }
  // For tests and fuzzers: called (under the metadata mutex) with the host
  // range of every guest data write to the image file, after the overlap
  // check passed and before the write is issued. A fuzzer asserts there
  // that metadata_map()->find(host, bytes) is empty: no guest data ever
  // lands on a metadata cluster. Set it before the first write.
  using GuestWriteObserver = std::function<void(std::uint64_t host, std::uint64_t bytes)>;
  void set_guest_write_observer(GuestWriteObserver f) { guest_write_observer_ = std::move(f); }

 private:
  Qcow2Image() = default;
  Result<Mapping> get_host_offset_locked(std::uint64_t offset, std::uint64_t max_bytes);
  // Whether guest bytes [offset, offset + length) read as zeroes, judged by
  // metadata alone (QEMU's bdrv_co_is_zero_fast in is_zero_cow). mutex_ held.
  Result<bool> reads_zero_fast_locked(std::uint64_t offset, std::uint64_t length);
  Result<void> read_compressed(std::span<std::byte> buf, std::uint64_t offset, std::uint64_t l2_entry);
  Result<void> read_unallocated(std::span<std::byte> buf, std::uint64_t offset);
  // Read `part` (guest bytes at offset) as mapping `m` says: data, compressed,
  // zero or whatever the backing chain shows.
  Result<void> read_mapped(std::span<std::byte> part, std::uint64_t offset, const Mapping& m);
  File& data_file() { return data_file_ ? *data_file_ : *file_; }
  // QEMU's metadata-preallocation guess (qcow2_image.cpp), made once, at
  // the first of the moments QEMU makes it: a block status query, a READ, a
  // write that allocates around a copy-on-write region, a zeroing that is
  // not subcluster-aligned. Each call makes it now unless it is made
  // already (then it is one atomic load, no lock). It cannot fail: a guess
  // that cannot be made is "no".
  bool metadata_preallocated() {
    if (metadata_prealloc_checked_.load(std::memory_order_acquire)) return metadata_prealloc_;
    std::lock_guard lock(mutex_);
    return metadata_preallocated_locked();
  }
  bool metadata_preallocated_locked();

  // Write path (write.cpp: setup, request loops, flush; cluster.cpp: the
  // cluster layer, see cluster.hpp); *_locked need mutex_ held.
  struct PendingFree {
    std::uint64_t host_offset, bytes;
    bool l2_table;
    // Dropped by a guest's TRIM or unmapping WRITE_ZEROES (QEMU's
    // QCOW2_DISCARD_REQUEST): a cluster it leaves unreferenced is discarded
    // in the image file when pass_discard_request_.
    bool by_request = false;
  };
  Result<void> init_writer();
  // init_writer, when recovery could not store the recovered bitmaps
  // ("unstored"): read the header, refcounts and bitmap directory again
  // and keep the crashed session's record armed if it still covers the
  // directory on disk (docs/crash-safe-bitmaps.md, "When recovery cannot
  // store"). Sets intent_state_ and logs. Returns whether the record is
  // kept (AUTOCLEAR_QNBD_INTENT must then stay set); an error fails the open.
  Result<bool> continue_unstored_recovery(const IntentRecovery& failed);
  // The writer's bitmap store anew from the directory header_ names, after
  // a rewrite at open changed it (the caller registers it for overlap
  // checks where the metadata map is current).
  Result<void> reopen_bitmap_store();
  Result<void> load_snapshot_l1(const SnapshotRef& ref);
  Result<void> repair_dirty_image(File& file);
  Result<void> check_writable(std::uint64_t offset, std::uint64_t length, const char* what);
  Result<void> sync_dependencies_locked();
  Error set_corrupt_locked(const std::string& why);
  // Build metadata_ from the header, tables and directories, and refuse
  // (one line) refcount blocks or a bitmap directory that overlap other
  // metadata (refcounts_ must be loaded).
  Result<void> build_metadata_map();
  // The pre-write check for guest data at host range [host, host + bytes)
  // of the image file (no-op for an external data file); calls the observer.
  Result<void> check_guest_write_locked(std::uint64_t host, std::uint64_t bytes);
  void register_bitmaps();
  // The bitmap directory and `directory`'s tables (header_'s extension
  // must already point at that directory), for overlap checks.
  void register_bitmaps(const std::vector<BitmapInfo>& directory);
  Result<std::uint64_t> allocate_cluster_locked();
  // Give back clusters that allocate handed out but no L2 entry names yet,
  // after the write meant for them failed; `old_file_size` is file_size_
  // from before the allocation.
  void abort_allocation_locked(std::uint64_t host, std::uint64_t bytes, std::uint64_t old_file_size);
  void queue_free_locked(std::uint64_t l2_entry, bool by_request = false);
  Result<TableCache::Handle> l2_for_write_locked(std::uint64_t l1_index);
  // The L2 entry of guest cluster gc, in a table the writer may change
  // (l2_for_write_locked), validated (a corrupt entry sets the corrupt bit).
  struct L2Slot {
    TableCache::Handle table;
    std::byte* slot = nullptr;
    L2Entry entry;
  };
  Result<L2Slot> l2_slot_for_write_locked(std::uint64_t gc);
  // Store entry (and, with extended L2, bitmap) in the slot, mark the table
  // dirty and its dependencies (refcounts, data) as to be synced first.
  void set_l2_entry_locked(L2Slot& s, std::uint64_t entry, std::uint64_t bitmap);
  Result<void> read_guest_locked(std::span<std::byte> buf, std::uint64_t offset);
  Result<void> write_cluster_locked(const std::byte* data, std::uint64_t offset, std::uint64_t length);
  // The clusters from the one holding `offset`, up to `end`, that need a new
  // host cluster (not overwritten in place) and lie in its L2 table: the
  // run QEMU's handle_alloc allocates at once. 0 with extended L2 or an
  // external data file (the cluster path allocates those).
  Result<std::size_t> allocation_run_locked(std::uint64_t offset, std::uint64_t end);
  // QEMU's is_zero_cow for such a run written with [offset, end): whether
  // its copy-on-write regions (before offset in its first cluster, after
  // end in its last) read as zeroes, so that the file system may zero the
  // whole run (handle_alloc_space) instead of copies of zeroes.
  Result<bool> allocation_cow_zero_locked(std::uint64_t offset, std::uint64_t end);
  // Write [offset, offset + buf.size()), an allocation run of two or more
  // clusters: allocated at once, so that a refcount block or table the
  // allocation needs lands after the run, not inside it, as QEMU's; the
  // new bytes in one pwrite, the copy-on-write regions zeroed with the run
  // (cow_zero) or copied.
  Result<void> write_allocation_locked(std::span<const std::byte> buf, std::uint64_t offset, bool cow_zero);
  Result<void> zero_cluster_locked(std::uint64_t guest_cluster, bool may_unmap, bool unallocate);
  Result<void> zero_subclusters_locked(std::uint64_t guest_cluster, unsigned first, unsigned last, bool may_unmap);
  Result<void> flush_locked();
  Result<void> maybe_flush_frees_locked();

  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_;  // external data file, or null
  std::string path_;
  std::string data_file_name_;
  std::string full_backing_filename_;
  Header header_;
  L2Geometry geometry_;
  std::uint64_t size_ = 0;  // virtual size exposed (rounded down to 512 as QEMU)
  // The image file's size as the engine knows it: read at open, grown by
  // allocations (stores under mutex_). Atomic because read_compressed checks
  // a descriptor against it without mutex_ while a writer allocates.
  std::atomic<std::uint64_t> file_size_{0};
  std::unique_ptr<BlockDevice> backing_;
  std::vector<SnapshotInfo> snapshots_;
  std::uint64_t snapshots_size_ = 0;  // snapshot table bytes
  std::vector<BitmapInfo> bitmaps_;
  std::unique_ptr<BitmapStore> bitmap_store_;  // always set after open
  IntentAccess intent_;
  // What the open found about the write-intent record: "none", "pending"
  // (read-only open of a crashed image), "recovered", "kept" (recovery
  // could not store; the record stays armed), "stale", "missing".
  std::string intent_state_ = "none";
  std::string intent_detail_;
  WriteGate gate_;
  class LiveBitmapEdit;
  // Write the bitmap directory after a live edit (takes mutex_ for short
  // steps only: bitmap_live.cpp).
  Result<void> persist_bitmaps();

  // Long zeroing/discard: skip L2 spans that hold nothing (write.cpp).
  std::uint64_t next_l2_span(std::uint64_t gc) const;
  bool skips_unallocated_span_locked(std::uint64_t gc, std::uint64_t end) const;
  std::mutex mutex_;               // metadata: l1_, l2_cache_
  std::vector<std::uint64_t> l1_;  // active L1 table, host byte order
  // L2 tables; writable: depends on refcounts_'s block cache (cache.hpp).
  std::unique_ptr<TableCache> l2_cache_;
  std::atomic<bool> metadata_prealloc_checked_{false};  // set under mutex_
  // Writer state (all under mutex_).
  bool writable_ = false;
  bool closed_ = false;
  // cache=writethrough/directsync (file.hpp): every write, zeroing and
  // discard ends with flush(), which writes the cached metadata back and
  // syncs, as QEMU's FUA emulation with the write cache off.
  bool writes_through_ = false;
  std::unique_ptr<Refcounts> refcounts_;
  std::vector<PendingFree> pending_free_;  // references dropped, applied after the pointers are on disk
  // Give the space of clusters a guest's TRIM or WRITE_ZEROES freed back to
  // the host file system (QEMU's pass-discard-request, on with
  // --discard=unmap). Off, they stay in the file for reuse.
  bool pass_discard_request_ = false;
  std::shared_mutex data_lock_;  // shared: in-place data writes; exclusive: applying frees
  bool metadata_prealloc_ = false;
  std::unique_ptr<MetadataMap> metadata_;  // writable only
  GuestWriteObserver guest_write_observer_;
};

}  // namespace qnbd::image::qcow2
