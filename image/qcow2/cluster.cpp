// L1/L2 entries (qcow2.txt "Cluster mapping", "Extended L2 Entries"): decoding,
// and the image's cluster layer: lookup, allocation and L2 updates (QEMU's
// qcow2-cluster.c). See cluster.hpp.
#include "image/qcow2/cluster.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"
#include "common/zero.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image/qcow2/refcount.hpp"

namespace qnbd::image::qcow2 {

const char* to_string(SubclusterType type) {
  switch (type) {
    case SubclusterType::normal: return "normal";
    case SubclusterType::compressed: return "compressed";
    case SubclusterType::zero_plain: return "zero";
    case SubclusterType::zero_alloc: return "zero (allocated)";
    case SubclusterType::unallocated_plain: return "unallocated";
    case SubclusterType::unallocated_alloc: return "unallocated (allocated)";
  }
  return "?";
}

CompressedDescriptor parse_compressed_descriptor(std::uint64_t entry, std::uint32_t cluster_bits) {
  // qcow2.txt "Cluster mapping": x = 62 - (cluster_bits - 8) splits the
  // compressed descriptor into offset and sector count.
  const unsigned csize_shift = 62 - (cluster_bits - 8);
  const std::uint64_t offset_mask = (1ull << csize_shift) - 1;
  const std::uint64_t size_mask = (1ull << (cluster_bits - 8)) - 1;
  CompressedDescriptor d;
  d.host_offset = entry & offset_mask;
  d.nb_sectors = ((entry >> csize_shift) & size_mask) + 1;
  d.bytes = d.nb_sectors * 512 - (d.host_offset & 511);
  return d;
}

Result<SubclusterType> get_subcluster_type(const L2Geometry& g, L2Entry e, unsigned sc_index,
                                           std::uint64_t guest_cluster_offset) {
  const std::uint64_t entry = e.entry;
  if (entry & QCOW_OFLAG_COMPRESSED) {
    // qcow2.txt "Header" bit 2, "Cluster mapping", "Extended L2 Entries": no
    // external data file, COPIED clear, subcluster bitmap zero.
    if (g.external_data_file) {
      return make_error(EIO, "compressed cluster entry found in image with external data file (guest offset {:#x})",
                        guest_cluster_offset);
    }
    if (entry & QCOW_OFLAG_COPIED) {
      return make_error(EIO, "compressed cluster entry {:#018x} has the COPIED bit set (guest offset {:#x})", entry,
                        guest_cluster_offset);
    }
    if (g.extended_l2 && e.bitmap != 0) {
      return make_error(EIO, "compressed cluster entry has a non-zero subcluster bitmap (guest offset {:#x})",
                        guest_cluster_offset);
    }
    CompressedDescriptor d = parse_compressed_descriptor(entry, g.cluster_bits);
    if (d.host_offset & ~L2E_OFFSET_MASK & ~0x1ffull) {
      return make_error(EIO, "compressed cluster offset {:#x} is beyond 56 bits (guest offset {:#x})", d.host_offset,
                        guest_cluster_offset);
    }
    if (d.host_offset == 0) {
      return make_error(EIO, "compressed cluster at host offset 0 (guest offset {:#x})", guest_cluster_offset);
    }
    return SubclusterType::compressed;
  }

  if (entry & L2E_STD_RESERVED_MASK & ~QCOW_OFLAG_ZERO) {
    return make_error(EIO, "L2 entry {:#018x} has reserved bits set (guest offset {:#x})", entry, guest_cluster_offset);
  }
  const std::uint64_t host = entry & L2E_OFFSET_MASK;
  if (!is_aligned(host, g.cluster_size())) {
    return make_error(EIO, "cluster allocation offset {:#x} unaligned (guest offset {:#x})", host,
                      guest_cluster_offset);
  }
  // Offset 0 is a real cluster only in an external data file (qcow2.txt
  // "Cluster mapping").
  const bool has_host = host != 0 || (g.external_data_file && (entry & QCOW_OFLAG_COPIED));
  if (has_host && g.external_data_file && host != guest_cluster_offset) {
    return make_error(EIO, "external data file host cluster offset {:#x} does not match guest cluster offset {:#x}",
                      host, guest_cluster_offset);
  }

  if (!g.extended_l2) {
    if (entry & QCOW_OFLAG_ZERO) {
      if (g.version < 3) {
        return make_error(EIO, "zero cluster entry found in pre-v3 image (guest offset {:#x})", guest_cluster_offset);
      }
      return has_host ? SubclusterType::zero_alloc : SubclusterType::zero_plain;
    }
    return has_host ? SubclusterType::normal : SubclusterType::unallocated_plain;
  }

  // qcow2.txt "Extended L2 Entries": word 0 bit 0 is unused with extended L2 entries.
  if (entry & QCOW_OFLAG_ZERO) {
    return make_error(EIO, "extended L2 entry {:#018x} has the zero flag set (guest offset {:#x})", entry,
                      guest_cluster_offset);
  }
  const std::uint64_t bm = e.bitmap;
  const std::uint32_t alloc = static_cast<std::uint32_t>(bm);
  const std::uint32_t zero = static_cast<std::uint32_t>(bm >> 32);
  if (has_host) {
    if (alloc & zero) {
      return make_error(EIO,
                        "subcluster bitmap {:#018x} marks subclusters both allocated and zero (guest offset {:#x})", bm,
                        guest_cluster_offset);
    }
    if (zero & (1u << sc_index)) return SubclusterType::zero_alloc;
    if (alloc & (1u << sc_index)) return SubclusterType::normal;
    return SubclusterType::unallocated_alloc;
  }
  if (alloc != 0) {
    return make_error(
        EIO, "subcluster bitmap {:#018x} marks subclusters allocated in an unallocated cluster (guest offset {:#x})",
        bm, guest_cluster_offset);
  }
  if (zero & (1u << sc_index)) return SubclusterType::zero_plain;
  return SubclusterType::unallocated_plain;
}

Result<std::uint64_t> l1_entry_l2_offset(std::uint64_t l1_entry, std::uint32_t cluster_bits, std::uint64_t file_size) {
  if (l1_entry & L1E_RESERVED_MASK) {
    return make_error(EIO, "L1 entry {:#018x} has reserved bits set", l1_entry);
  }
  std::uint64_t l2 = l1_entry & L1E_OFFSET_MASK;
  if (l2 == 0) return std::uint64_t{0};
  if (!is_aligned(l2, 1ull << cluster_bits)) {
    return make_error(EIO, "L2 table offset {:#x} unaligned", l2);
  }
  if (!range_within(l2, 1ull << cluster_bits, file_size)) {
    return make_error(EIO, "L2 table at offset {:#x} is beyond the end of the image file", l2);
  }
  return l2;
}

// ---------------------------------------------------------------------------
// Qcow2Image's cluster layer (QEMU's qcow2-cluster.c). Every function below
// runs under the metadata mutex (mutex_) except get_host_offset, which takes
// it.
//
// Crash ordering (QEMU's: refcounts and data before the L2 entry, L2 before L1)
// of the steps here, without a flush per request:
//  * a new cluster gets its refcount in Refcounts' cache
//    (allocate_cluster_locked); the guest data goes to the data file; the
//    L2 entry changes only in the L2 cache (set_l2_entry_locked), which
//    is told it depends on a flush. The L2 cache depends on the refcount
//    block cache (cache.hpp), so the refcount blocks are written and the
//    files synced before any L2 table is written back;
//  * a new L2 table (or a copy of a shared one) is written and synced
//    before the L1 entry pointing to it is written (l2_for_write_locked);
//  * a reference an update drops (copy-on-write, zeroing, discard, a copied
//    L2 table) is only queued (queue_free_locked); write.cpp's flush_locked
//    applies it once the L2/L1 updates that removed the pointer are on
//    disk, with in-place writers excluded.
// A crash therefore leaks clusters at worst, never leaves a pointer to a
// cluster whose refcount or data did not reach the disk.

namespace {

Result<void> write_be64_at(File& f, std::uint64_t offset, std::uint64_t value) {
  std::byte raw[8];
  store_be64(raw, value);
  return f.pwrite(raw, offset);
}

// The host range whose refcounts an L2 entry holds a reference to (in the
// image file; nothing for an external data file): the sectors of a
// compressed cluster, or the host cluster. bytes is 0 if there is none.
struct HostRange {
  std::uint64_t offset = 0, bytes = 0;
};
// How many entries from index `from` on (before `end`) are all zero bytes.
std::uint64_t count_zero_entries(const std::byte* table, std::uint64_t from, std::uint64_t end,
                                 std::uint32_t entry_size) {
  const std::uint64_t words_per_entry = entry_size / 8;
  const std::byte* p = table + from * entry_size;
  const std::byte* const stop = table + end * entry_size;
  auto word = [](const std::byte* q) {
    std::uint64_t w;
    std::memcpy(&w, q, sizeof w);
    return w;
  };
  // Whole 512-byte blocks while they are all zero (is_zero, at memcmp
  // speed), then word by word up to the first nonzero one.
  constexpr std::ptrdiff_t kBlock = 512;
  while (stop - p >= kBlock && is_zero({p, static_cast<std::size_t>(kBlock)})) p += kBlock;
  while (p < stop && word(p) == 0) p += 8;
  // p is at the first nonzero word (or the end); the entries before the
  // one that holds it are zero.
  return static_cast<std::uint64_t>(p - (table + from * entry_size)) / 8 / words_per_entry;
}

HostRange referenced_range(std::uint64_t l2_entry, std::uint32_t cluster_bits) {
  if (l2_entry & QCOW_OFLAG_COMPRESSED) {
    const CompressedDescriptor d = parse_compressed_descriptor(l2_entry, cluster_bits);
    return {align_down(d.host_offset, 512), d.nb_sectors * 512};
  }
  const std::uint64_t host = l2_entry & L2E_OFFSET_MASK;
  return {host, host ? std::uint64_t{1} << cluster_bits : 0};
}

// A whole-cluster write of this mapping goes to its own host cluster (an
// allocated, COPIED one); any other needs a new host cluster (unallocated,
// zero without a host cluster, compressed, or shared with a snapshot).
bool written_in_place(const Mapping& m) {
  const bool has_host = m.type == SubclusterType::normal || m.type == SubclusterType::zero_alloc;
  return has_host && (m.l2_entry & QCOW_OFLAG_COPIED);
}

}  // namespace

Result<Mapping> Qcow2Image::get_host_offset(std::uint64_t offset, std::uint64_t max_bytes) {
  std::lock_guard lock(mutex_);
  return get_host_offset_locked(offset, max_bytes);
}

Result<Mapping> Qcow2Image::get_host_offset_locked(std::uint64_t offset, std::uint64_t max_bytes) {
  const L2Geometry& g = geometry_;
  const unsigned cluster_bits = g.cluster_bits;
  const std::uint64_t cluster_size = g.cluster_size();
  const unsigned l2_bits = header_.l2_bits();
  const std::uint64_t l2_entries = 1ull << l2_bits;
  const unsigned sc_bits = g.subcluster_bits();
  const unsigned spc = g.subclusters_per_cluster();

  // A run never crosses an L2 table.
  const std::uint64_t l1_index = offset >> (cluster_bits + l2_bits);
  const std::uint64_t table_end = (l1_index + 1) << (cluster_bits + l2_bits);
  const std::uint64_t limit = std::min(max_bytes, table_end - offset);
  Mapping m;
  if (limit == 0) return make_error(EINVAL, "empty mapping request at {:#x}", offset);

  if (l1_index >= l1_.size()) {
    m.bytes = limit;
    return m;
  }
  std::uint64_t l2_offset = 0;
  {
    auto r = l1_entry_l2_offset(l1_[l1_index], cluster_bits, file_size_);
    if (!r) return make_error(EIO, "image is corrupt: {} (L1 index {})", r.error().message, l1_index);
    l2_offset = *r;
  }
  if (l2_offset == 0) {
    m.bytes = limit;
    return m;
  }
  TableCache::Handle table = QNBD_TRY(l2_cache_->get(l2_offset));
  const std::byte* t = table.data().data();
  auto entry_at = [&](std::uint64_t idx) {
    L2Entry e;
    e.entry = load_be64(t + idx * g.l2_entry_size());
    if (g.extended_l2) e.bitmap = load_be64(t + idx * g.l2_entry_size() + 8);
    return e;
  };

  std::uint64_t l2_index = (offset >> cluster_bits) & (l2_entries - 1);
  unsigned sc_index = static_cast<unsigned>((offset >> sc_bits) & (spc - 1));
  const std::uint64_t guest_cluster = align_down(offset, cluster_size);
  L2Entry first = entry_at(l2_index);
  auto type_r = get_subcluster_type(g, first, sc_index, guest_cluster);
  if (!type_r) return make_error(EIO, "image is corrupt: {}", type_r.error().message);
  m.type = *type_r;
  m.l2_entry = first.entry;
  // COPIED (bit 63, qcow2.txt "Cluster mapping") on both levels: the L2 table
  // and the host cluster have refcount 1, so the writer may change them without
  // copying.
  m.copied = (l1_[l1_index] & QCOW_OFLAG_COPIED) && (first.entry & QCOW_OFLAG_COPIED);

  const bool has_host = has_host_cluster(m.type);
  std::uint64_t host_cluster = 0;
  if (has_host) {
    host_cluster = first.entry & L2E_OFFSET_MASK;
    // A data cluster past the end of the image file is corrupt (an external
    // data file may legitimately be sparse or short).
    if (m.type == SubclusterType::normal && !data_file_ && host_cluster >= file_size_) {
      return make_error(EIO,
                        "image is corrupt: data cluster at {:#x} (guest offset {:#x}) is beyond the end of the file",
                        host_cluster, guest_cluster);
    }
    m.host_offset = host_cluster + (offset & (cluster_size - 1));
  }
  if (m.type == SubclusterType::compressed) {
    // Compressed clusters are handled one at a time.
    m.bytes = std::min(limit, guest_cluster + cluster_size - offset);
    return m;
  }

  // Extend the run over following subclusters of the same type (and, with a
  // host cluster, contiguous host offsets), as count_contiguous_subclusters.
  std::uint64_t run_end = guest_cluster + (std::uint64_t{sc_index} + 1) * (cluster_size / spc);
  std::uint64_t expect_host = host_cluster;
  std::uint64_t idx = l2_index;
  unsigned sc = sc_index + 1;
  L2Entry cur = first;
  while (run_end - offset < limit) {
    if (sc == spc && m.type == SubclusterType::unallocated_plain) {
      // An entry of all zero bytes (both words with extended L2) is an
      // unallocated cluster: skip such entries a word at a time instead
      // of decoding each. A map of a large sparse image is mostly these
      // (nbdinfo --map of 1 TiB walks 16 million), so this is its cost.
      const std::uint64_t wanted = (limit - (run_end - offset) + cluster_size - 1) >> cluster_bits;
      const std::uint64_t end = std::min(l2_entries, idx + 1 + wanted);
      const std::uint64_t zero = count_zero_entries(t, idx + 1, end, g.l2_entry_size());
      idx += zero;
      run_end += zero << cluster_bits;
      if (run_end - offset >= limit) break;
    }
    if (sc == spc) {
      ++idx;
      if (idx >= l2_entries) break;
      sc = 0;
      cur = entry_at(idx);
      expect_host += cluster_size;
      if (has_host && (cur.entry & L2E_OFFSET_MASK) != expect_host) break;
    }
    std::uint64_t cluster_guest = guest_cluster + ((idx - l2_index) << cluster_bits);
    auto t2 = get_subcluster_type(g, cur, sc, cluster_guest);
    if (!t2 || *t2 != m.type) break;  // a corrupt entry is reported when it is reached
    if (has_host && (cur.entry & L2E_OFFSET_MASK) != expect_host) break;
    if (m.type == SubclusterType::normal && !data_file_ && expect_host >= file_size_) break;
    run_end += cluster_size / spc;
    ++sc;
  }
  m.bytes = std::min(limit, run_end - offset);
  return m;
}

Result<std::uint64_t> Qcow2Image::allocate_cluster_locked() {
  std::uint64_t host = QNBD_TRY(refcounts_->allocate(1));
  l2_cache_->depends_on_flush();
  file_size_ = std::max(file_size_.load(), host + header_.cluster_size());
  return host;
}

// QEMU's qcow2_alloc_cluster_abort: a data write that fails (ENOSPC on a
// full host file system or past the end of a fixed-size range, EIO, an
// overlap refusal) would otherwise leave its new clusters counted but
// unreferenced, a leak in every later check. Nothing points at them, so
// the refcount can drop at once (in the cache; whichever value reaches the
// disk, the image is consistent: 1 is a leak, 0 is free).
void Qcow2Image::abort_allocation_locked(std::uint64_t host, std::uint64_t bytes, std::uint64_t old_file_size) {
  if (auto r = refcounts_->free(host, bytes); !r) {
    log::warn("{}: could not give back {} bytes at {:#x} after a failed write ({}); they stay allocated (a leak)",
              path_, bytes, host, r.error().message);
    return;
  }
  if (file_size_ == host + bytes) file_size_ = old_file_size;
}

void Qcow2Image::queue_free_locked(std::uint64_t l2_entry, bool by_request) {
  if (data_file_) return;  // no refcounts for the external data file
  const HostRange r = referenced_range(l2_entry, header_.cluster_bits);
  if (r.bytes) pending_free_.push_back({r.offset, r.bytes, false, by_request});
}

Result<TableCache::Handle> Qcow2Image::l2_for_write_locked(std::uint64_t l1_index) {
  const std::uint64_t cs = header_.cluster_size();
  if (l1_index >= l1_.size()) {
    return make_error(EIO, "{}: guest offset needs L1 index {} but the L1 table has {} entries", path_, l1_index,
                      l1_.size());
  }
  auto old_r = l1_entry_l2_offset(l1_[l1_index], header_.cluster_bits, file_size_);
  if (!old_r) return set_corrupt_locked(fmt::format("{} (L1 index {})", old_r.error().message, l1_index));
  const std::uint64_t old = *old_r;
  if (old && (l1_[l1_index] & QCOW_OFLAG_COPIED)) {
    // It will be changed and written back: refuse before touching it if it
    // is also another structure.
    QNBD_TRY(metadata_->check(old, cs, kind_bit(MetadataKind::active_l2)));
    return l2_cache_->get(old);
  }
  // A new table, or a copy of one shared with a snapshot (refcount > 1).
  std::vector<std::byte> table(static_cast<std::size_t>(cs));
  if (old) {
    TableCache::Handle h = QNBD_TRY(l2_cache_->get(old));
    std::memcpy(table.data(), h.data().data(), table.size());
  }
  const std::uint64_t old_file_size = file_size_;
  const std::uint64_t host = QNBD_TRY(allocate_cluster_locked());
  // The table's refcount (and every dirty dependency) first, then the table,
  // then the L1 entry. Until the L1 entry names it, a failure gives the
  // cluster back (abort_allocation_locked).
  auto placed = [&]() -> Result<void> {
    QNBD_TRY(sync_dependencies_locked());
    QNBD_TRY(metadata_->check(host, cs, kind_bit(MetadataKind::active_l2)));
    QNBD_TRY(file_->pwrite(table, host));
    return file_->flush();
  }();
  if (!placed) {
    abort_allocation_locked(host, cs, old_file_size);
    return placed.error();
  }
  metadata_->add(MetadataKind::active_l2, host, cs);
  QNBD_TRY(metadata_->check(header_.l1_table_offset + l1_index * 8, 8, kind_bit(MetadataKind::active_l1)));
  l1_[l1_index] = host | QCOW_OFLAG_COPIED;
  QNBD_TRY(write_be64_at(*file_, header_.l1_table_offset + l1_index * 8, l1_[l1_index]));
  if (old) pending_free_.push_back({old, cs, true});
  return l2_cache_->get(host);
}

Result<Qcow2Image::L2Slot> Qcow2Image::l2_slot_for_write_locked(std::uint64_t gc) {
  const L2Geometry& g = geometry_;
  const unsigned l2_bits = header_.l2_bits();
  L2Slot s;
  s.table = QNBD_TRY(l2_for_write_locked(gc >> (g.cluster_bits + l2_bits)));
  const std::uint64_t idx = (gc >> g.cluster_bits) & ((1ull << l2_bits) - 1);
  s.slot = s.table.mutable_data().data() + idx * g.l2_entry_size();
  s.entry = L2Entry{load_be64(s.slot), g.extended_l2 ? load_be64(s.slot + 8) : 0};
  // An entry about to be rewritten must make sense first: a corrupt one
  // (what QEMU's qcow2_get_host_offset rejects) stops all writing rather than
  // being built upon.
  if (auto t = get_subcluster_type(g, s.entry, 0, gc); !t) return set_corrupt_locked(t.error().message);
  return s;
}

void Qcow2Image::set_l2_entry_locked(L2Slot& s, std::uint64_t entry, std::uint64_t bitmap) {
  store_be64(s.slot, entry);
  if (geometry_.extended_l2) store_be64(s.slot + 8, bitmap);
  s.entry = L2Entry{entry, geometry_.extended_l2 ? bitmap : 0};
  l2_cache_->mark_dirty(s.table);
  // The new entry may point at a cluster whose refcount or data is still
  // only cached: they go to disk before this table does.
  l2_cache_->depends_on_flush();
}

Result<void> Qcow2Image::read_guest_locked(std::span<std::byte> buf, std::uint64_t offset) {
  // Bytes past the virtual size (the tail of the last cluster) read as zero.
  const std::size_t visible =
      offset >= size_ ? 0 : static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), size_ - offset));
  std::memset(buf.data() + visible, 0, buf.size() - visible);
  buf = buf.first(visible);
  while (!buf.empty()) {
    Mapping m = QNBD_TRY(get_host_offset_locked(offset, buf.size()));
    std::span<std::byte> part = buf.first(static_cast<std::size_t>(m.bytes));
    QNBD_TRY(read_mapped(part, offset, m));
    buf = buf.subspan(part.size());
    offset += part.size();
  }
  return ok();
}

// Zero (sub)clusters, and unallocated ones over no backing file, past its
// end, or over backing ranges whose block status says zero. Data, and
// compressed clusters, are not looked into.
Result<bool> Qcow2Image::reads_zero_fast_locked(std::uint64_t offset, std::uint64_t length) {
  while (length > 0) {
    const Mapping m = QNBD_TRY(get_host_offset_locked(offset, length));
    const std::uint64_t n = std::min(m.bytes, length);
    if (n == 0) return false;
    switch (m.type) {
      case SubclusterType::zero_plain:
      case SubclusterType::zero_alloc: break;
      case SubclusterType::unallocated_plain:
      case SubclusterType::unallocated_alloc:
        // Past the backing file's end nothing shows through.
        if (backing_ && offset < backing_->size() &&
            !QNBD_TRY(chain_reads_zero(*backing_, offset, std::min(offset + n, backing_->size()) - offset))) {
          return false;
        }
        break;
      default: return false;
    }
    offset += n;
    length -= n;
  }
  return true;
}

// qcow2_image.hpp says what; mutex_ held.
Result<std::size_t> Qcow2Image::allocation_run_locked(std::uint64_t offset, std::uint64_t end) {
  const L2Geometry& g = geometry_;
  // Extended L2 (per-subcluster allocation) and external data files keep
  // the cluster path.
  if (g.extended_l2 || data_file_) return std::size_t{0};
  const std::uint64_t cs = g.cluster_size();
  const unsigned table_bits = g.cluster_bits + header_.l2_bits();
  const std::uint64_t first = align_down(offset, cs);
  const std::uint64_t l1_index = first >> table_bits;
  if (l1_index >= l1_.size()) return std::size_t{0};
  constexpr std::uint64_t kMaxRun = 1024;  // bounds the time mutex_ is held
  std::size_t run = 0;
  for (std::uint64_t gc = first; gc < end && run < kMaxRun; gc += cs, ++run) {
    if ((gc >> table_bits) != l1_index) break;
    // A corrupt L1 or L2 entry: the cluster path reports it (and sets the
    // corrupt bit).
    auto m = get_host_offset_locked(gc, cs);
    if (!m || written_in_place(*m)) break;
  }
  return run;
}

Result<bool> Qcow2Image::allocation_cow_zero_locked(std::uint64_t offset, std::uint64_t end) {
  const std::uint64_t cs = geometry_.cluster_size();
  const std::uint64_t first = align_down(offset, cs), stop = align_up(end, cs);
  // Head first, as QEMU asks; a tail past the image end has no block
  // status (write_cluster_locked says why).
  if (offset > first && !QNBD_TRY(reads_zero_fast_locked(first, offset - first))) return false;
  if (end < stop && (stop > size_ || !QNBD_TRY(reads_zero_fast_locked(end, stop - end)))) return false;
  return true;
}

// Write guest bytes [offset, offset+length) inside one cluster (data null:
// zeroes), allocating or copying the cluster as needed. mutex_ held.
Result<void> Qcow2Image::write_cluster_locked(const std::byte* data, std::uint64_t offset, std::uint64_t length) {
  const L2Geometry& g = geometry_;
  const std::uint64_t cs = g.cluster_size();
  const std::uint64_t gc = align_down(offset, cs);
  const std::uint64_t in = offset - gc;
  L2Slot s = QNBD_TRY(l2_slot_for_write_locked(gc));
  const L2Entry e = s.entry;

  const bool compressed = e.entry & QCOW_OFLAG_COMPRESSED;
  const std::uint64_t old_host = compressed ? 0 : e.entry & L2E_OFFSET_MASK;
  const bool in_place = old_host && ((e.entry & QCOW_OFLAG_COPIED) || data_file_);

  // The host range [ws, we) of the cluster that must be written.
  std::uint64_t ws = 0, we = cs;
  std::uint64_t bitmap = 0;
  // Whether [in, in + length) covers subclusters that hold data now (a
  // kept extended-L2 cluster): those must not be zeroed before the write.
  bool rewrites_data = false;
  const bool ext = g.extended_l2;
  if (ext) {
    const std::uint64_t sc = cs / SUBCLUSTERS_PER_CLUSTER;
    const unsigned first = static_cast<unsigned>(in / sc), last = static_cast<unsigned>((in + length - 1) / sc);
    const std::uint64_t touched = ((last == 31 ? 0xffffffffull : (1ull << (last + 1)) - 1) >> first) << first;
    const std::uint64_t alloc = compressed ? QCOW_L2_BITMAP_ALL_ALLOC : e.bitmap & QCOW_L2_BITMAP_ALL_ALLOC;
    const std::uint64_t zero = compressed ? 0 : e.bitmap >> 32;
    bitmap = (alloc | touched) | ((zero & ~touched & 0xffffffffull) << 32);
    if (in_place && (alloc & touched) == touched && (zero & touched) == 0) {
      ws = in;
      we = in + length;
    } else if (in_place) {
      rewrites_data = (alloc & ~zero & touched & 0xffffffffull) != 0;
      // Only unallocated/zero edge subclusters are filled from the old view;
      // allocated ones get just the request's bytes, so a concurrent
      // in-place write elsewhere in the same subcluster is not overwritten
      // with stale data.
      auto data_sc = [&](unsigned s) { return ((alloc >> s) & 1) && !((zero >> s) & 1); };
      ws = data_sc(first) ? in : first * sc;
      we = data_sc(last) ? in + length : (last + 1) * sc;
    } else if (!(compressed || old_host)) {
      // A new cluster: only the touched subclusters; the others stay
      // unallocated or zero.
      ws = first * sc;
      we = (last + 1) * sc;
    }
  } else if (in_place && !(e.entry & QCOW_OFLAG_ZERO)) {
    ws = in;
    we = in + length;
  }

  const bool fresh = !in_place && !data_file_;
  const std::uint64_t old_file_size = file_size_;
  const std::uint64_t host = in_place ? old_host : data_file_ ? gc : QNBD_TRY(allocate_cluster_locked());
  auto placed = [&]() -> Result<void> {
    std::vector<std::byte> buf;
    std::span<const std::byte> out;
    // QEMU's handle_alloc_space: when what the guest sees around the new
    // bytes reads as zeroes anyway, the host range is zeroed by the file
    // system (no data written; ZERO_RANGE leaves unwritten extents) and
    // only the new bytes are written, instead of a whole cluster of
    // copied zeroes (2 MiB for one 4 KiB write on 2 MiB clusters). Crash
    // ordering is unchanged: the L2 entry still reaches the disk only after
    // this range is synced.
    const std::uint64_t after = in + length;
    // QEMU's is_zero_cow asks block status of the tail region too, and a
    // tail that runs past the image end gets none there (block/io.c
    // bdrv_co_block_status answers EOF for what lies beyond), so QEMU
    // copies zeroes into it rather than zeroing the range: the same here,
    // so that the host file has the same holes as qemu-nbd's.
    const bool tail_past_end = we > after && gc + we > size_;
    // A copy-on-write region: where QEMU's handle_alloc_space asks block
    // status (qcow2_image.cpp, metadata_preallocated), its refcounts
    // holding this allocation. A tail that starts at the image end is not
    // asked about (the EOF answer comes before the driver's).
    if (ws < in || (we > after && gc + after < size_)) metadata_preallocated_locked();
    const bool zero_around = data && (ws < in || we > after) && !tail_past_end &&
                             QNBD_TRY(reads_zero_fast_locked(gc + ws, in - ws)) &&
                             QNBD_TRY(reads_zero_fast_locked(gc + after, we - after));
    if (zero_around) {
      QNBD_TRY(check_guest_write_locked(host + ws, we - ws));
      // The whole range is zeroed, as QEMU's handle_alloc_space does,
      // where nothing in it is visible until the new L2 entry is: a new
      // cluster, a zero cluster kept with its host cluster, unallocated or
      // zero subclusters. But a write from such subclusters into ones of
      // the same kept cluster that hold data (extended L2) has only its two
      // edge regions zeroed, never [in, after): that data may be durable
      // (a FLUSH), and zeroing it before the new bytes are written would
      // leave zeroes there if the power failed between the two, where the
      // old or the new data must be. (QEMU zeroes from cow_start to the end
      // of cow_end there too; qnbd does not. Where the edges once held
      // written data, the file can then keep small data extents where
      // QEMU's has unwritten ones: ext4 writes zeroes rather than split a
      // written extent into small pieces. The data is the same.)
      auto zeroed = data_file().write_zeroes_fast(host + ws, (rewrites_data ? in : we) - ws, false);
      if (zeroed && rewrites_data) zeroed = data_file().write_zeroes_fast(host + after, we - after, false);
      if (zeroed) return data_file().pwrite(std::span(data, static_cast<std::size_t>(length)), host + in);
      if (zeroed.error().code != ENOTSUP) return zeroed.error();
      // The file system cannot: copy zeroes as below.
    }
    if (ws == in && we == in + length && data) {
      out = std::span(data, static_cast<std::size_t>(length));
    } else {
      buf.resize(static_cast<std::size_t>(we - ws));
      // Copy-on-write: what the guest sees now (backing file, compressed or
      // zero cluster, old shared cluster), then the new bytes.
      if (ws < in || we > in + length) QNBD_TRY(read_guest_locked(buf, gc + ws));
      if (data) {
        std::memcpy(buf.data() + (in - ws), data, static_cast<std::size_t>(length));
      } else {
        std::memset(buf.data() + (in - ws), 0, static_cast<std::size_t>(length));
      }
      out = buf;
    }
    // In place: the L2 entry may name a metadata cluster (a corrupt image);
    // new: the allocator checked it, the observer still sees the write.
    QNBD_TRY(check_guest_write_locked(host + ws, we - ws));
    return data_file().pwrite(out, host + ws);
  }();
  if (!placed) {
    if (fresh) abort_allocation_locked(host, cs, old_file_size);
    return placed;
  }
  if (!data_file_) file_size_ = std::max(file_size_.load(), host + cs);

  // The new entry: COPIED (refcount 1, or the external data file).
  if (!in_place) queue_free_locked(e.entry);
  set_l2_entry_locked(s, host | QCOW_OFLAG_COPIED, bitmap);
  return ok();
}

Result<void> Qcow2Image::write_allocation_locked(std::span<const std::byte> buf, std::uint64_t offset, bool cow_zero) {
  const std::uint64_t cs = geometry_.cluster_size();
  const std::uint64_t end = offset + buf.size();
  const std::uint64_t first = align_down(offset, cs), stop = align_up(end, cs);
  const std::uint64_t n = (stop - first) / cs;
  const std::uint64_t head = offset - first, tail = stop - end;  // copy-on-write regions
  // The L2 table first, then the data run, as QEMU (get_cluster_table, then
  // the run): written and synced before the L1 entry names it; the run's
  // entries change only in the cache, below.
  QNBD_TRY(l2_for_write_locked(first >> (geometry_.cluster_bits + header_.l2_bits())));
  const std::uint64_t old_file_size = file_size_;
  const std::uint64_t host = QNBD_TRY(refcounts_->allocate(n));
  l2_cache_->depends_on_flush();
  file_size_ = std::max(file_size_.load(), host + n * cs);
  // Where QEMU's handle_alloc_space asks block status of the copy-on-write
  // regions, its refcounts holding this run (write_cluster_locked has the
  // tail's exception).
  if (head || (tail && end < size_)) metadata_preallocated_locked();
  auto placed = [&]() -> Result<void> {
    QNBD_TRY(check_guest_write_locked(host, n * cs));
    if (cow_zero && (head || tail)) {
      // QEMU's handle_alloc_space: the whole run zeroed by the file system
      // (unwritten extents), then the new bytes. Nothing in it is visible
      // before the L2 entries are, so the order is free.
      auto zeroed = data_file().write_zeroes_fast(host, n * cs, false);
      if (zeroed) return data_file().pwrite(buf, host + head);
      if (zeroed.error().code != ENOTSUP) return zeroed.error();
    }
    // Copy-on-write: what the guest sees now around the new bytes (backing
    // file, compressed or zero cluster, old shared cluster; past the image
    // end, zeroes), in the same run.
    std::vector<std::byte> cow(static_cast<std::size_t>(std::max(head, tail)));  // empty without COW
    if (head) {
      QNBD_TRY(read_guest_locked(std::span(cow).first(static_cast<std::size_t>(head)), first));
      QNBD_TRY(data_file().pwrite(std::span(cow).first(static_cast<std::size_t>(head)), host));
    }
    QNBD_TRY(data_file().pwrite(buf, host + head));
    if (tail) {
      QNBD_TRY(read_guest_locked(std::span(cow).first(static_cast<std::size_t>(tail)), end));
      QNBD_TRY(data_file().pwrite(std::span(cow).first(static_cast<std::size_t>(tail)), host + head + buf.size()));
    }
    return ok();
  }();
  if (!placed) {
    abort_allocation_locked(host, n * cs, old_file_size);
    return placed;
  }
  for (std::uint64_t i = 0; i < n; ++i) {
    L2Slot s = QNBD_TRY(l2_slot_for_write_locked(first + i * cs));
    queue_free_locked(s.entry.entry);
    set_l2_entry_locked(s, (host + i * cs) | QCOW_OFLAG_COPIED, 0);
  }
  return ok();
}

// Make a whole cluster read as zeroes (v3 zero flag, or extended L2 zero
// bits), keeping its host cluster when !may_unmap. If `unallocate`, the
// entry becomes unallocated instead (no backing file shows through).
// As QEMU's zero_in_l2_slice, a host cluster is kept even when an internal
// snapshot shares it (no OFLAG_COPIED): the entry keeps that state, so a
// later write copies the cluster rather than writing the shared one.
Result<void> Qcow2Image::zero_cluster_locked(std::uint64_t gc, bool may_unmap, bool unallocate) {
  const L2Geometry& g = geometry_;
  const std::uint64_t l1_index = gc >> (g.cluster_bits + header_.l2_bits());
  if (unallocate && l1_index < l1_.size() && l1_[l1_index] == 0) return ok();  // nothing allocated
  L2Slot s = QNBD_TRY(l2_slot_for_write_locked(gc));
  const L2Entry e = s.entry;
  const bool compressed = e.entry & QCOW_OFLAG_COMPRESSED;
  const std::uint64_t old_host = compressed ? 0 : e.entry & L2E_OFFSET_MASK;
  // Offset 0 names a host cluster only in an external data file, with
  // OFLAG_COPIED set (qcow2.txt "Cluster mapping").
  const bool has_host = !compressed && (old_host || (data_file_ && (e.entry & QCOW_OFLAG_COPIED)));
  const bool keep = !may_unmap && has_host;
  if (!keep && !data_file_) {
    // A corrupt image's L2 entry may name a metadata cluster: dropping the
    // reference would free it (and, with --discard=unmap, discard it), so
    // it is refused as a write on it would be.
    const HostRange r = referenced_range(e.entry, g.cluster_bits);
    if (auto hit = r.bytes ? metadata_->find(r.offset, r.bytes) : std::nullopt) {
      return set_corrupt_locked(
          fmt::format("Preventing invalid free of metadata (overlaps with the {} at {:#x}): host range {:#x}+{}",
                      metadata_kind_name(hit->kind), hit->cluster_offset, r.offset, r.bytes));
    }
  }

  std::uint64_t entry = 0, bitmap = 0;
  if (keep) {
    const std::uint64_t copied = data_file_ ? QCOW_OFLAG_COPIED : e.entry & QCOW_OFLAG_COPIED;
    entry = old_host | copied | (g.extended_l2 ? 0 : QCOW_OFLAG_ZERO);
    bitmap = g.extended_l2 ? QCOW_L2_BITMAP_ALL_ZEROES : 0;
  } else if (!unallocate) {
    entry = g.extended_l2 ? 0 : QCOW_OFLAG_ZERO;
    bitmap = g.extended_l2 ? QCOW_L2_BITMAP_ALL_ZEROES : 0;
  }
  if (header_.data_file_raw()) {
    // The raw data file must read the same as the image. As for a raw
    // image, a zero that may unmap punches it whatever --discard says
    // (QEMU's data-file child is opened with discard=unmap).
    QNBD_TRY(data_file_->write_zeroes(gc, g.cluster_size(), may_unmap));
  }
  if (e.entry == entry && e.bitmap == bitmap) return ok();
  if (!keep && has_host && data_file_ && !header_.data_file_raw() && pass_discard_request_) {
    // QEMU's qcow2_free_any_cluster with an external data file: there are
    // no refcounts to wait for, so the range is discarded now (best effort).
    // Not deferred: a data-file cluster sits at its guest offset, so a
    // later write to this guest cluster reuses the range at once, and a
    // deferred discard would erase it. A crash before the L2 change is on
    // disk leaves the old entry reading zeroes, which this request allows.
    if (auto d = data_file_->discard(old_host, g.cluster_size()); !d) {
      log::debug("{}: discarding {:#x}+{} in the data file: {}", path_, old_host, g.cluster_size(), d.error().message);
    }
  }
  if (!keep) queue_free_locked(e.entry, true);
  set_l2_entry_locked(s, entry, bitmap);
  return ok();
}

// Zero whole subclusters [first, last] of an extended-L2 cluster in place.
Result<void> Qcow2Image::zero_subclusters_locked(std::uint64_t gc, unsigned first, unsigned last, bool may_unmap) {
  const L2Geometry& g = geometry_;
  L2Slot s = QNBD_TRY(l2_slot_for_write_locked(gc));
  const L2Entry e = s.entry;
  const std::uint64_t sc = g.cluster_size() / SUBCLUSTERS_PER_CLUSTER;
  if (e.entry & QCOW_OFLAG_COMPRESSED) {
    // Per-subcluster bits do not exist for a compressed cluster: copy it.
    s.table.reset();
    return write_cluster_locked(nullptr, gc + first * sc, (last - first + 1) * sc);
  }
  const std::uint64_t touched = ((last == 31 ? 0xffffffffull : (1ull << (last + 1)) - 1) >> first) << first;
  std::uint64_t bitmap = (e.bitmap & ~touched) | (touched << 32);
  if (header_.data_file_raw()) QNBD_TRY(data_file_->write_zeroes(gc + first * sc, (last - first + 1) * sc, may_unmap));
  set_l2_entry_locked(s, e.entry, bitmap);
  return ok();
}

}  // namespace qnbd::image::qcow2
