// qcow2 write path (qcow2.txt "Host cluster management", "Cluster mapping",
// "Extended L2 Entries", the external data file; QEMU's writer rules): writer
// setup, the request loops (write, write_zeroes, discard), flush and close, and
// the crash-safe ordering of metadata updates. The per-cluster steps (lookup,
// allocation, copy-on-write, L2 updates) are the cluster layer in cluster.cpp.
// Locking is documented in qcow2_image.hpp.
//
// Ordering (QEMU's: refcounts before pointers) without a flush per request
// (each rule is spelled out where it is enforced):
//  * new clusters get their refcount in Refcounts' cache; new data goes to
//    the data file; the L2 entry changes only in the L2 cache (cluster.cpp).
//    Before any L2 table is written back (cache flush or eviction), the
//    L2 cache writes back its dependency, the refcount block cache, and
//    syncs the image and data files (TableCache::set_dependency and
//    depends_on_flush, set up in init_writer; sync_dependencies_locked);
//  * a new L2 table is written and synced before the L1 entry pointing to
//    it is written (cluster.cpp, l2_for_write_locked);
//  * references dropped by COW, zeroing or discard are queued in
//    pending_free_ and applied only after the L2/L1 updates that removed the
//    pointers are on disk (flush_locked), with in-place writers excluded;
//    with --discard=unmap, clusters a guest's request left unreferenced are
//    then discarded in the image file, after their refcounts are on disk.
// A crash therefore leaks clusters at worst.
#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <shared_mutex>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"
#include "image/qcow2/bitmap.hpp"
#include "image/qcow2/check.hpp"
#include "image/qcow2/compress.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image/qcow2/refcount.hpp"

namespace qnbd::image::qcow2 {
namespace {

// Apply queued frees once this many are pending, so memory stays bounded
// between guest flushes.
constexpr std::size_t kMaxPendingFrees = 4096;

Result<void> write_be64_at(File& f, std::uint64_t offset, std::uint64_t value) {
  std::byte raw[8];
  store_be64(raw, value);
  return f.pwrite(raw, offset);
}

}  // namespace

Result<void> Qcow2Image::init_writer() {
  RefcountGeometry rg{header_.cluster_bits, header_.refcount_order};
  refcounts_ = std::make_unique<Refcounts>(
      QNBD_TRY(Refcounts::load(*file_, rg, header_.refcount_table_offset, header_.refcount_table_clusters)));
  QNBD_TRY(build_metadata_map());
  // Crash ordering through the caches (cache.hpp): an L2 table is written back
  // only after the refcount blocks (the dependency) and then the image file and
  // the data file are synced, so every cluster a written-back entry points at
  // has its refcount and its data on disk.
  l2_cache_->set_dependency(&refcounts_->block_cache());
  l2_cache_->set_sync([this]() -> Result<void> {
    QNBD_TRY(file_->flush());  // refcount blocks and guest data in the image file
    if (data_file_) QNBD_TRY(data_file_->flush());
    return ok();
  });
  // A crashed writer's write-intent record (docs/crash-safe-bitmaps.md,
  // recovery): before the unknown autoclear bits are cleared below, since
  // that bit is what says the record can be trusted.
  IntentRecovery rec = QNBD_TRY(recover_from_intent(*file_, header_, refcounts_.get(), file_size_, intent_));
  bool keep_intent = false;
  if (rec.state == "unstored") {
    keep_intent = QNBD_TRY(continue_unstored_recovery(rec));
  } else if (rec.state != "none") {
    intent_state_ = rec.state;
    intent_detail_ = rec.detail;
    if (rec.rewrote) {
      log::info("{}: {}", path_, rec.detail);
      file_size_ = QNBD_TRY(file_->size());
      QNBD_TRY(reopen_bitmap_store());
      register_bitmaps();
    } else if (rec.state == "off") {
      log::info("{}: write-intent record not used ({}); bitmaps in use stay inconsistent", path_, rec.detail);
    } else {
      log::warn("{}: write-intent record not used ({}); bitmaps in use stay inconsistent", path_, rec.detail);
    }
  }
  l2_cache_->set_writeback([this](std::uint64_t offset, std::span<const std::byte> table) -> Result<void> {
    QNBD_TRY(metadata_->check(offset, table.size(), kind_bit(MetadataKind::active_l2)));
    return file_->pwrite(table, offset);
  });
  // Unknown autoclear bits mean another writer's structures we do not
  // maintain: clear them (qcow2.txt "Header", as QEMU on a writable open).
  // A record kept armed is ours and stays trusted.
  const std::uint64_t known = AUTOCLEAR_MASK | (keep_intent ? AUTOCLEAR_QNBD_INTENT : 0);
  if (header_.version >= 3 && (header_.autoclear_features & ~known)) {
    header_.autoclear_features &= known;
    QNBD_TRY(write_be64_at(*file_, kAutoclearFeaturesOffset, header_.autoclear_features));
    QNBD_TRY(file_->flush());
  }
  writable_ = true;
  return ok();
}

Result<void> Qcow2Image::reopen_bitmap_store() {
  bitmaps_ = QNBD_TRY(read_bitmap_directory(*file_, header_, file_size_));
  bitmap_store_ = std::make_unique<BitmapStore>(*file_, header_, bitmaps_, file_size_, true, intent_);
  return ok();
}

Result<void> Qcow2Image::repair_dirty_image(File& file) {
  // qcow2.txt "Header" dirty bit / QEMU's qcow2_do_open: a dirty lazy-refcounts
  // image has stale refcounts; rebuild them before trusting the allocator.
  log::info("{}: dirty bit set, repairing refcounts", path_);
  // The checker's lines go to the debug log; with debug off, pass no sink,
  // so that none of them is formatted (a crafted dirty image can make the
  // repair report hundreds of thousands of defects at every open).
  CheckMessageSink to_debug_log;
  if (log::debug_enabled()) to_debug_log = [&](const std::string& line) { log::debug("{}: {}", path_, line); };
  CheckResult r = QNBD_TRY(check_qcow2(file, RepairMode::all, to_debug_log));
  if (r.corruptions > r.corruptions_fixed || r.check_errors) {
    return make_error(EIO, "{}: could not repair the dirty image ({} corruptions left)", path_,
                      r.corruptions - r.corruptions_fixed);
  }
  std::byte raw[8];
  QNBD_TRY(file.read_exact(raw, kIncompatibleFeaturesOffset, "header"));
  QNBD_TRY(write_be64_at(file, kIncompatibleFeaturesOffset, load_be64(raw) & ~INCOMPAT_DIRTY));
  return file.flush();
}

Result<void> Qcow2Image::sync_dependencies_locked() {
  // Dirty refcount blocks written, then the image file (holding them and
  // the guest data) and the data file synced, if anything is pending.
  return l2_cache_->flush_dependency();
}

Error Qcow2Image::set_corrupt_locked(const std::string& why) {
  log::error("{}: image is corrupt: {}; further writes are refused", path_, why);
  if (!header_.corrupt()) {
    header_.incompatible_features |= INCOMPAT_CORRUPT;
    if (header_.version >= 3) {
      (void)write_be64_at(*file_, kIncompatibleFeaturesOffset, header_.incompatible_features);
      (void)file_->flush();
    }
  }
  return make_error(EIO, "{}: image is corrupt: {}", path_, why);
}

Result<void> Qcow2Image::check_writable(std::uint64_t offset, std::uint64_t length, const char* what) {
  if (!writable_) return make_error(EROFS, "{}: image is opened read-only", path_);
  if (!range_within(offset, length, size_)) {
    return make_error(EINVAL, "{}: {} {:#x}+{} is outside the image ({} bytes)", path_, what, offset, length, size_);
  }
  // The corrupt bit is checked under mutex_ by each step.
  return ok();
}

Result<void> Qcow2Image::build_metadata_map() {
  const std::uint64_t cs = header_.cluster_size();
  metadata_ = std::make_unique<MetadataMap>(header_.cluster_bits);
  MetadataMap& m = *metadata_;
  m.add(MetadataKind::header, 0, cs);
  m.add(MetadataKind::active_l1, header_.l1_table_offset, std::uint64_t{header_.l1_size} * 8);
  m.add(MetadataKind::snapshot_table, header_.snapshots_offset, snapshots_size_);
  // One registration per snapshot, in one pass (as many as 65,536, each
  // up to 32 MiB: metadata_map keeps each as one span, not per cluster).
  std::vector<std::pair<std::uint64_t, std::uint64_t>> inactive_l1;
  inactive_l1.reserve(snapshots_.size());
  for (const SnapshotInfo& s : snapshots_) inactive_l1.emplace_back(s.l1_table_offset, std::uint64_t{s.l1_size} * 8);
  m.add_ranges(MetadataKind::inactive_l1, inactive_l1);
  // The L2 table of every active L1 entry, valid or not (an invalid entry
  // is reported, and the image marked corrupt, when a request reaches it).
  // As QEMU's overlap check, one past the end of the file counts too: once
  // the file grows there, guest data in that cluster would be read as the
  // L2 table.
  std::vector<std::uint64_t> l2_tables;
  for (std::uint64_t e : l1_) {
    if (std::uint64_t l2 = e & L1E_OFFSET_MASK) l2_tables.push_back(l2);
  }
  m.add_clusters(MetadataKind::active_l2, l2_tables, cs);
  register_bitmaps();
  // The bitmap directory is updated in place (in_use) outside the metadata
  // mutex, so it is checked here once rather than on that write.
  if (header_.bitmaps && header_.bitmaps->bitmap_directory_size) {
    const BitmapsExtension& b = *header_.bitmaps;
    if (auto hit =
            m.find(b.bitmap_directory_offset, b.bitmap_directory_size, kind_bit(MetadataKind::bitmap_directory))) {
      return make_error(EINVAL, "bitmap directory at {:#x} overlaps the {} at {:#x}", b.bitmap_directory_offset,
                        metadata_kind_name(hit->kind), hit->cluster_offset);
    }
  }
  // Refcount blocks overlapping anything above are refused (they would be
  // rewritten as refcounts); from here on the allocator checks every run.
  QNBD_TRY(refcounts_->attach_metadata_map(&m));
  m.set_on_overlap([this](const std::string& why) { return set_corrupt_locked(why); });
  return ok();
}

void Qcow2Image::register_bitmaps() { register_bitmaps(bitmap_store_->directory()); }

void Qcow2Image::register_bitmaps(const std::vector<BitmapInfo>& directory) {
  MetadataMap& m = *metadata_;
  m.remove_all(MetadataKind::bitmap_directory);
  m.remove_all(MetadataKind::bitmap_table);
  if (!header_.bitmaps) return;
  m.add(MetadataKind::bitmap_directory, header_.bitmaps->bitmap_directory_offset,
        header_.bitmaps->bitmap_directory_size);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> tables;
  tables.reserve(directory.size());
  for (const BitmapInfo& b : directory) tables.emplace_back(b.table_offset, std::uint64_t{b.table_size} * 8);
  m.add_ranges(MetadataKind::bitmap_table, tables);
}

Result<void> Qcow2Image::check_guest_write_locked(std::uint64_t host, std::uint64_t bytes) {
  if (data_file_) return ok();  // guest data lives in another file
  QNBD_TRY(metadata_->check(host, bytes));
  if (guest_write_observer_) guest_write_observer_(host, bytes);
  return ok();
}

Result<void> Qcow2Image::flush_locked() {
  if (!writable_) return ok();
  QNBD_TRY(sync_dependencies_locked());
  QNBD_TRY(l2_cache_->flush());
  QNBD_TRY(file_->flush());
  if (!pending_free_.empty()) {
    // The pointers are gone on disk; no in-place writer may still target a
    // cluster about to become free (and reusable).
    std::unique_lock data(data_lock_);
    std::vector<PendingFree> frees;
    frees.swap(pending_free_);
    // Host ranges whose last reference a guest's request dropped, coalesced.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> released;
    const std::uint64_t cs = header_.cluster_size();
    for (const PendingFree& f : frees) {
      if (f.l2_table) {
        l2_cache_->discard(f.host_offset);
        metadata_->remove(MetadataKind::active_l2, f.host_offset, f.bytes);
      }
      auto r = refcounts_->free(f.host_offset, f.bytes);
      if (!r) {
        if (r.error().code == EIO) {
          return set_corrupt_locked(fmt::format("freeing {:#x}+{}: {}", f.host_offset, f.bytes, r.error().message));
        }
        return r;
      }
      if (!f.by_request || !pass_discard_request_) continue;
      // A cluster an internal snapshot still shares keeps its data. One
      // that holds metadata (a corrupt image's L2 entry pointing at it) is
      // never discarded.
      for (std::uint64_t c = align_down(f.host_offset, cs); c < f.host_offset + f.bytes; c += cs) {
        if (QNBD_TRY(refcounts_->get(c / cs)) != 0) continue;
        if (metadata_->find(c, cs)) {
          log::warn("{}: freed cluster {:#x} holds metadata; not discarding it", path_, c);
          continue;
        }
        if (!released.empty() && released.back().first + released.back().second == c) {
          released.back().second += cs;
        } else {
          released.emplace_back(c, cs);
        }
      }
    }
    QNBD_TRY(refcounts_->flush());
    // As QEMU's pass-discard-request: give the freed space back to the host
    // file system. Crash ordering: no L2 entry names these clusters on disk
    // any more (the L2 flush above) and their refcount of 0 is durable, so
    // a crash before or after the discard leaves the same consistent image;
    // mutex_ is still held, so none of them has been handed out again. Best
    // effort, as in QEMU: a file system that cannot discard keeps the bytes.
    for (auto [off, len] : released) {
      if (auto d = file_->discard(off, len); !d) {
        log::debug("{}: discarding freed clusters {:#x}+{}: {}", path_, off, len, d.error().message);
      }
    }
  }
  if (data_file_) QNBD_TRY(data_file_->flush());
  return ok();
}

Result<void> Qcow2Image::maybe_flush_frees_locked() {
  if (pending_free_.size() >= kMaxPendingFrees) return flush_locked();
  return ok();
}

Result<void> Qcow2Image::write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) {
  QNBD_TRY(check_writable(offset, buf.size(), "write"));
  if (buf.empty()) return ok();
  const WriteGate::Pass pass = gate_.enter();  // held until the data is written
  QNBD_TRY(bitmaps_before_write(offset, buf.size()));
  const std::uint64_t cs = geometry_.cluster_size();
  if (!metadata_prealloc_checked_.load(std::memory_order_acquire)) {
    // QEMU allocates a run of clusters, then asks block status about its
    // copy-on-write regions before it writes any of it (cluster.cpp has the
    // head's case): a tail in a subcluster that is not overwritten in place
    // makes the guess now, before the whole clusters below are written.
    const std::uint64_t sc = cs / geometry_.subclusters_per_cluster();
    const std::uint64_t end = offset + buf.size();
    if (end % sc != 0 && end != size_) {
      std::lock_guard lock(mutex_);
      const std::uint64_t last = align_down(end - 1, sc);
      // A corrupt entry there is the loop's to report, as it would be.
      const auto m = get_host_offset_locked(last, sc);
      if (m && !(m->type == SubclusterType::normal && m->copied)) metadata_preallocated_locked();
    }
  }
  const std::uint64_t request_end = offset + buf.size();
  while (!buf.empty()) {
    const std::uint64_t gc = align_down(offset, cs);
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), gc + cs - offset));
    std::unique_lock lock(mutex_);
    if (header_.corrupt()) return make_error(EIO, "{}: image is marked corrupt; writes are refused", path_);
    // Fast path: an allocated COPIED cluster (all touched subclusters
    // allocated) is overwritten in place without the metadata mutex. The
    // lookup is read's; a corrupt entry takes the cluster path, which
    // reports it and sets the corrupt bit.
    std::optional<std::uint64_t> host;
    if (auto m = get_host_offset_locked(offset, n);
        m && m->type == SubclusterType::normal && m->copied && m->bytes >= n) {
      host = m->host_offset;
    }
    if (host) {
      // A COPIED entry naming a metadata cluster (a corrupt image) fails
      // here with EIO and sets the corrupt bit.
      QNBD_TRY(check_guest_write_locked(*host, n));
      std::shared_lock data(data_lock_);
      lock.unlock();
      QNBD_TRY(data_file().pwrite(buf.first(n), *host));
      buf = buf.subspan(n);
      offset += n;
      continue;
    }
    // New host clusters: a run of two or more allocated at once, as QEMU
    // allocates them (sequential writes into fresh space, the common case,
    // become one allocation and one data write instead of one per
    // cluster); a single one takes the cluster path.
    // (A request whose rest lies in this cluster has no run to look for:
    // the cluster path does its one lookup.)
    const std::size_t run = request_end > gc + cs ? QNBD_TRY(allocation_run_locked(offset, request_end)) : 0;
    if (run >= 2) {
      const std::size_t bytes = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), gc + run * cs - offset));
      const bool cow_zero = QNBD_TRY(allocation_cow_zero_locked(offset, offset + bytes));
      QNBD_TRY(write_allocation_locked(buf.first(bytes), offset, cow_zero));
      QNBD_TRY(maybe_flush_frees_locked());
      buf = buf.subspan(bytes);
      offset += bytes;
      continue;
    }
    QNBD_TRY(write_cluster_locked(buf.data(), offset, n));
    QNBD_TRY(maybe_flush_frees_locked());
    buf = buf.subspan(n);
    offset += n;
  }
  if (fua || writes_through_) QNBD_TRY(flush());
  return ok();
}

// Zeroing and discard over a sparse image: from cluster gc to the end of its
// L2 table's span there is no L2 table (L1 entry 0), no backing file shows
// through and no raw data file needs zeroes, so every cluster there already
// reads as zeroes and stays unallocated: skip the span whole instead of
// cluster by cluster (a 1 PiB request over an empty image is ~2 M spans,
// not 16 G clusters). Only spans the request covers to their end (or to
// the image end) qualify. Discard without a backing file always skips
// them (QEMU would allocate an empty L2 table there: only the file's size
// differs). WRITE_ZEROES, and discard over a backing file, skip them only
// with skip_empty_spans (requests past 4 GiB, which QEMU 7.2 cannot
// receive): otherwise, as QEMU's zero_in_l2_slice and discard_in_l2_slice,
// they write zero flags into new L2 tables there, so qemu:allocation-depth
// says "local" as qemu-nbd's does.
std::uint64_t Qcow2Image::next_l2_span(std::uint64_t gc) const {
  const unsigned span_bits = geometry_.cluster_bits + header_.l2_bits();
  return ((gc >> span_bits) + 1) << span_bits;
}

bool Qcow2Image::skips_unallocated_span_locked(std::uint64_t gc, std::uint64_t end) const {
  const std::uint64_t l1_index = gc >> (geometry_.cluster_bits + header_.l2_bits());
  const std::uint64_t span_end = next_l2_span(gc);
  return !header_.data_file_raw() && (span_end <= end || end == size_) && l1_index < l1_.size() && l1_[l1_index] == 0 &&
         !(backing_ && gc < backing_->size());
}

Result<void> Qcow2Image::write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) {
  QNBD_TRY(check_writable(offset, length, "write zeroes"));
  if (length == 0) return ok();
  const L2Geometry& g = geometry_;
  const std::uint64_t cs = g.cluster_size();
  const std::uint64_t sc = cs / g.subclusters_per_cluster();
  const std::uint64_t end = offset + length;
  // QEMU's qcow2_co_pwrite_zeroes asks block status about an unaligned head
  // or tail (is_zero) before it changes anything: its metadata-preallocation
  // guess may be made there (qcow2_image.cpp, metadata_preallocated).
  if (offset % sc != 0 || (end % sc != 0 && end != size_)) metadata_preallocated();
  // A unit is whole if it is covered, or covered up to the end of the image.
  auto whole = [&](std::uint64_t start, std::uint64_t unit) {
    return offset <= start && (start + unit <= end || end == size_);
  };
  // A unit (a cluster, or a subcluster with extended L2) only partly
  // covered needs no data when the rest of it already reads as zeroes and
  // this layer stores nothing there: zeroing it whole changes no guest
  // byte, so it stays sparse, as QEMU's qcow2_co_pwrite_zeroes decides
  // (is_zero() on the head and tail, then the subcluster type under its
  // lock). The rest is looked at through the whole chain, without mutex_
  // (block status takes it).
  auto rest_reads_zero = [&](std::uint64_t u) -> Result<bool> {
    const std::uint64_t ue = std::min(u + sc, size_);
    for (auto [a, b] : {std::pair{u, std::max(u, offset)}, std::pair{std::min(end, ue), ue}}) {
      if (a < b && !QNBD_TRY(chain_reads_zero(*this, a, b - a))) return false;
    }
    return true;
  };
  // Under mutex_: does this layer store nothing in unit u? Without zero
  // flags (v2) only an image without a backing file can leave it alone.
  auto unit_empty_locked = [&](std::uint64_t u) -> Result<bool> {
    if (header_.version < 3 && backing_) return false;
    const Mapping m = QNBD_TRY(get_host_offset_locked(u, sc));
    return m.type == SubclusterType::unallocated_plain || m.type == SubclusterType::unallocated_alloc ||
           m.type == SubclusterType::zero_plain || m.type == SubclusterType::zero_alloc;
  };
  // Under mutex_: zero the partial unit u whole if that is allowed (see
  // above; rest_zero from rest_reads_zero), else refuse a fast zero.
  auto zero_partial_locked = [&](std::uint64_t u, bool rest_zero) -> Result<bool> {
    if (rest_zero && QNBD_TRY(unit_empty_locked(u))) {
      if (header_.version < 3) return true;  // unallocated, no backing: zeroes already (qemu discards)
      const std::uint64_t gc = align_down(u, cs);
      if (g.extended_l2) {
        const auto i = static_cast<unsigned>((u - gc) / sc);
        QNBD_TRY(zero_subclusters_locked(gc, i, i, flags.may_unmap));
      } else {
        QNBD_TRY(zero_cluster_locked(gc, flags.may_unmap, false));
      }
      return true;
    }
    if (flags.fast_only) return make_error(ENOTSUP, "fast zeroing needs whole clusters or ones reading as zeroes");
    return false;
  };
  // Extended L2: QEMU's block layer gives the driver the partly covered
  // subclusters at either end apart from the subcluster-aligned middle
  // [m_start, m_end), and qcow2_subcluster_zeroize does that middle all or
  // nothing: if the partly covered cluster at either end of it is
  // compressed (its subclusters cannot be zeroed one by one,
  // zero_l2_subclusters' ENOTSUP), the whole middle is written as zeroes,
  // as data. Decided when the loop reaches the middle, after the head
  // subcluster (which may have turned that cluster into a normal one).
  std::uint64_t m_start = end, m_end = end;
  if (g.extended_l2) {
    m_start = std::min(end, align_up(offset, sc));
    m_end = end == size_ ? end : std::max(m_start, align_down(end, sc));
  }
  auto middle_as_data_locked = [&]() -> Result<bool> {
    if (m_end <= m_start) return false;
    auto compressed = [&](std::uint64_t at) -> Result<bool> {
      const Mapping m = QNBD_TRY(get_host_offset_locked(align_down(at, cs), sc));
      return m.type == SubclusterType::compressed;
    };
    if (m_start % cs && QNBD_TRY(compressed(m_start))) return true;
    return m_end % cs && m_end != size_ && m_end > align_up(m_start, cs) && QNBD_TRY(compressed(m_end));
  };
  // The bitmaps are marked even for a fast zero refused below: QEMU's block
  // layer sets dirty bits for every write request it tracked, failed or
  // not (bdrv_co_write_req_finish), and a spurious bit costs a copy.
  const WriteGate::Pass pass = gate_.enter();  // held until the data is written
  QNBD_TRY(bitmaps_before_write(offset, length));
  if (flags.fast_only) {
    // Metadata only: v3 zero flags on whole clusters/subclusters (and,
    // with a raw data file, a cheap zeroing of its range, below).
    if (header_.version < 3) return make_error(ENOTSUP, "fast zeroing is not possible");
    for (std::uint64_t u : {align_down(offset, sc), align_down(end - 1, sc)}) {
      if (whole(u, sc)) continue;
      bool empty = QNBD_TRY(rest_reads_zero(u));
      if (empty) {
        std::lock_guard lock(mutex_);
        empty = QNBD_TRY(unit_empty_locked(u));
      }
      if (!empty) return make_error(ENOTSUP, "fast zeroing needs whole clusters or ones reading as zeroes");
    }
    std::lock_guard lock(mutex_);
    if (QNBD_TRY(middle_as_data_locked())) {
      return make_error(ENOTSUP, "fast zeroing cannot zero part of a compressed cluster");
    }
    if (header_.data_file_raw()) {
      // QEMU's qcow2_subcluster_zeroize zeroes a raw data file's range
      // first, with the request's NO_FALLBACK: the file system decides.
      // Nothing else has changed if it cannot.
      QNBD_TRY(data_file_->write_zeroes_fast(offset, length, flags.may_unmap));
    }
  }
  std::optional<bool> middle_as_data;
  std::uint64_t pos = offset;
  while (pos < end) {
    const std::uint64_t gc = align_down(pos, cs);
    const std::uint64_t n = std::min(end, gc + cs) - pos;
    const std::uint64_t head = align_down(pos, sc), tail = align_down(pos + n - 1, sc);
    const bool head_zero = !whole(head, sc) && QNBD_TRY(rest_reads_zero(head));
    const bool tail_zero = tail == head ? head_zero : !whole(tail, sc) && QNBD_TRY(rest_reads_zero(tail));
    std::lock_guard lock(mutex_);
    if (header_.corrupt()) return make_error(EIO, "{}: image is marked corrupt; writes are refused", path_);
    // A whole L2 span that stores nothing and shows no backing data already
    // reads as zeroes: skip it in one step when the caller asks (above).
    // Not for v2 with a backing file, where qemu writes zeroes as data even
    // past the backing file's end.
    if (flags.skip_empty_spans && pos == gc && !(header_.version < 3 && backing_) &&
        skips_unallocated_span_locked(gc, end)) {
      pos = std::min(end, next_l2_span(gc));
      continue;
    }
    if (g.extended_l2) {
      // This cluster's part of the head subcluster [pos, h_end), of the
      // middle [h_end, t_start) and of the tail subcluster [t_start, stop).
      // Partly covered subclusters are data unless already empty; the
      // middle is zero bits, or a zero cluster when it covers the cluster
      // (the subcluster past the image end counts as covered).
      const std::uint64_t stop = pos + n;
      const std::uint64_t h_end = std::min(stop, std::max(pos, m_start));
      const std::uint64_t t_start = std::max(h_end, std::min(stop, m_end));
      if (h_end > pos && !QNBD_TRY(zero_partial_locked(head, head_zero))) {
        QNBD_TRY(write_cluster_locked(nullptr, pos, h_end - pos));
      }
      if (t_start > h_end) {
        if (!middle_as_data) middle_as_data = QNBD_TRY(middle_as_data_locked());
        if (*middle_as_data) {
          QNBD_TRY(write_cluster_locked(nullptr, h_end, t_start - h_end));
        } else if (h_end == gc && (t_start == gc + cs || t_start == size_)) {
          QNBD_TRY(zero_cluster_locked(gc, flags.may_unmap, false));
        } else {
          QNBD_TRY(zero_subclusters_locked(gc, static_cast<unsigned>((h_end - gc) / sc),
                                           static_cast<unsigned>((t_start - 1 - gc) / sc), flags.may_unmap));
        }
      }
      if (stop > t_start && !QNBD_TRY(zero_partial_locked(tail, tail_zero))) {
        QNBD_TRY(write_cluster_locked(nullptr, t_start, stop - t_start));
      }
    } else if (pos == gc && whole(gc, cs)) {
      if (header_.version >= 3) {
        QNBD_TRY(zero_cluster_locked(gc, flags.may_unmap, false));
      } else if (!backing_) {
        // v2 has no zero flag: without a backing file unallocated reads as
        // zeroes; with one (even past its end) qemu writes zeroes as data.
        QNBD_TRY(zero_cluster_locked(gc, true, true));
      } else {
        QNBD_TRY(write_cluster_locked(nullptr, pos, n));
      }
    } else if (!QNBD_TRY(zero_partial_locked(gc, head_zero))) {
      QNBD_TRY(write_cluster_locked(nullptr, pos, n));
    }
    QNBD_TRY(maybe_flush_frees_locked());
    pos += n;
  }
  if (flags.fua || writes_through_) QNBD_TRY(flush());
  return ok();
}

Result<void> Qcow2Image::discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) {
  QNBD_TRY(check_writable(offset, length, "discard"));
  if (length == 0) return ok();
  const std::uint64_t cs = header_.cluster_size();
  const std::uint64_t end = offset + length;
  const WriteGate::Pass pass = gate_.enter();  // held until the data is written
  QNBD_TRY(bitmaps_before_write(offset, length));
  // Only whole clusters are discarded (NBD allows ignoring the rest). A
  // v2 image over a backing file has no zero flag to hide the backing file
  // with, so it keeps everything (QEMU's qcow2_co_pdiscard refuses those
  // with ENOTSUP, which its block layer turns into success). A raw
  // external data file is zeroed where its clusters become zero clusters
  // (QEMU discards the range; zeroing keeps the file the guest view even
  // where the file system cannot discard).
  if (!(header_.version < 3 && backing_)) {
    {
      std::lock_guard lock(mutex_);
      if (header_.corrupt()) return make_error(EIO, "{}: image is marked corrupt; writes are refused", path_);
    }
    for (std::uint64_t gc = align_up(offset, cs); gc < end && (gc + cs <= end || end == size_); gc += cs) {
      std::lock_guard lock(mutex_);
      if (header_.corrupt()) return make_error(EIO, "{}: image is marked corrupt; writes are refused", path_);
      // With a backing file QEMU writes zero flags over a whole span that
      // has no table, even past the backing file's end (so
      // qemu:allocation-depth says "local"): skip such spans only for the
      // requests QEMU could never receive. Without one it allocates an
      // empty table and leaves the clusters alone: only the file's size
      // differs from skipping.
      if ((!backing_ || flags.skip_empty_spans) && skips_unallocated_span_locked(gc, end)) {
        gc = next_l2_span(gc) - cs;  // the loop steps to the next span
        continue;
      }
      // As QEMU's discard_in_l2_slice for a discard request (full_discard
      // false): a cluster holding a host cluster, or any cluster of an image
      // with a backing file, becomes a zero cluster on v3 (zero bits with
      // extended L2), so it reads as zeroes and not as the backing file, and
      // its host cluster is freed; on v2 (no backing file here) it is
      // unallocated. A cluster with neither already reads as zeroes and is
      // left alone.
      const Mapping m = QNBD_TRY(get_host_offset_locked(gc, std::min(cs, size_ - gc)));
      if (!has_host_cluster(m.type) && m.type != SubclusterType::compressed && !backing_) continue;
      QNBD_TRY(zero_cluster_locked(gc, true, header_.version < 3));
      QNBD_TRY(maybe_flush_frees_locked());
    }
  }
  if (flags.fua || writes_through_) QNBD_TRY(flush());
  return ok();
}

Result<void> Qcow2Image::flush() {
  std::lock_guard lock(mutex_);
  if (!writable_) return ok();
  return flush_locked();
}

Result<void> Qcow2Image::close() {
  std::lock_guard lock(mutex_);
  if (!writable_ || closed_) return ok();
  closed_ = true;
  QNBD_TRY(flush_locked());
  // The bitmap store writes through a Header copy: refresh what a refcount
  // table move may have changed on disk.
  header_.refcount_table_offset = refcounts_->table_offset();
  header_.refcount_table_clusters = refcounts_->table_clusters();
  if (bitmaps_.empty()) return ok();  // nothing to store (and no directory to rewrite)
  QNBD_TRY(bitmap_store_->store(*refcounts_, header_));
  register_bitmaps();             // the store wrote a new directory and tables
  l2_cache_->depends_on_flush();  // the store may have changed refcounts: write them back too
  return flush_locked();
}

}  // namespace qnbd::image::qcow2
