// Refcounts (qcow2.txt "Host cluster management"): entry encoding for every
// refcount_order, the two-level table/block structure over the File seam, and
// the cluster allocator used by create, check -r and the write path.
//
// Thread-safety: none. A Refcounts object is owned by one image and used
// under that image's metadata mutex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/result.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/cache.hpp"
#include "image/qcow2/overlap.hpp"

namespace qnbd::image::qcow2 {

// Entry `index` of a refcount block of width 1 << refcount_order bits
// (qcow2.txt "Host cluster management", refcount block entry).
// Callers guarantee index < block.size() * 8 >> refcount_order and, for set,
// value <= max_refcount(refcount_order).
std::uint64_t get_refcount_entry(std::span<const std::byte> block, unsigned refcount_order, std::uint64_t index);
void set_refcount_entry(std::span<std::byte> block, unsigned refcount_order, std::uint64_t index, std::uint64_t value);
constexpr std::uint64_t max_refcount(unsigned refcount_order) {
  return refcount_order >= 6 ? UINT64_MAX : (1ull << (1u << refcount_order)) - 1;
}

struct RefcountGeometry {
  unsigned cluster_bits = 16;
  unsigned refcount_order = 4;

  std::uint64_t cluster_size() const { return 1ull << cluster_bits; }
  // Refcount entries per block = clusters described by one block.
  std::uint64_t block_entries() const { return 1ull << (cluster_bits + 3 - refcount_order); }
  unsigned block_entries_bits() const { return cluster_bits + 3 - refcount_order; }
  // 64-bit refcount table entries per cluster.
  std::uint64_t table_entries_per_cluster() const { return cluster_size() / 8; }
};

// The refcount structure of one open image.
//
// The table is held in memory (QEMU caps it at 8 MiB); refcount blocks go
// through a TableCache (cache.hpp, the class that also caches L2 tables)
// whose dirty blocks are written back by flush() or when evicted. An early
// write-back is safe: refcounts are raised before any pointer to the
// cluster is written, and lowered only after the pointer's removal is on
// disk, so a block on disk is never behind what a pointer there needs.
//
// Crash ordering (QEMU's: refcounts before pointers), enforced here:
//  * a new refcount block is written (and the file flushed) before the
//    table entry pointing to it; if it is not self-describing, the refcount
//    covering it is raised and flushed first;
//  * a moved table is written and flushed, then the header is switched
//    (refcount_table_offset and refcount_table_clusters in one 12-byte write
//    at byte 48), flushed, and only then are the old table's clusters freed;
//  * callers raise refcounts (alloc / increase), then flush(), and only then
//    write pointers to the clusters; they remove pointers before
//    free_clusters(). A crash leaks clusters at worst, never leaves a pointer
//    to a free cluster.
class Refcounts {
 public:
  struct Options {
    std::size_t max_cached_blocks = 32;
    // Flush the file between dependent metadata writes (table growth, new
    // blocks). Only tests that count writes turn this off.
    bool ordered_flushes = true;
  };

  // Load and validate the refcount table (qcow2.txt "Host cluster management":
  // reserved bits zero, block offsets aligned and inside the file). `file_size`
  // bounds offsets.
  [[nodiscard]] static Result<Refcounts> load(File& file, RefcountGeometry geometry,
                                              std::uint64_t refcount_table_offset,
                                              std::uint32_t refcount_table_clusters, Options options);
  [[nodiscard]] static Result<Refcounts> load(File& file, RefcountGeometry geometry,
                                              std::uint64_t refcount_table_offset,
                                              std::uint32_t refcount_table_clusters) {
    return load(file, geometry, refcount_table_offset, refcount_table_clusters, Options{});
  }

  const RefcountGeometry& geometry() const { return geometry_; }
  // Where the table is now. A table move rewrites header bytes 48-59 on
  // disk itself; an owner keeping a Header copy must refresh
  // refcount_table_offset/refcount_table_clusters from these before its
  // next serialize_header().
  std::uint64_t table_offset() const { return table_offset_; }
  std::uint32_t table_clusters() const { return table_clusters_; }
  const std::vector<std::uint64_t>& table() const { return table_; }

  // Refcount of host cluster `cluster_index` (0 if no block covers it).
  [[nodiscard]] Result<std::uint64_t> get(std::uint64_t cluster_index);
  // Set a refcount, creating the covering block (and growing the table) if
  // needed. The change is cached until flush().
  [[nodiscard]] Result<void> set(std::uint64_t cluster_index, std::uint64_t value);
  // Add `addend` to the refcounts of every cluster overlapping
  // [host_offset, host_offset + length). Fails (changing nothing) with EIO if
  // a count would drop below 0 and with EOVERFLOW if it would pass the
  // maximum for refcount_bits.
  [[nodiscard]] Result<void> update(std::uint64_t host_offset, std::uint64_t length, std::int64_t addend);

  // Allocate `n` contiguous clusters (refcount 0 → 1), first fit from the
  // free-cluster hint. Returns the host offset of the first one.
  [[nodiscard]] Result<std::uint64_t> allocate(std::uint64_t n);
  // Drop one reference from each cluster of the range.
  [[nodiscard]] Result<void> free(std::uint64_t host_offset, std::uint64_t length) {
    return update(host_offset, length, -1);
  }

  // Clusters the allocator must never hand out even when their stored
  // refcount is 0 (check -r uses it: stored refcounts are not trusted while
  // repairing, the recomputed ones are).
  void set_reserved_predicate(std::function<bool(std::uint64_t cluster_index)> reserved) {
    reserved_ = std::move(reserved);
  }

  // Protect metadata (overlap.hpp): check the refcount table and every
  // refcount block against what `map` already holds (fails, changing
  // nothing, with one line naming the overlap: a refcount block that is also
  // another structure would be rewritten as refcounts), then register them.
  // From then on every run allocate() hands out, every new block or table
  // and every refcount write is checked against `map` (a hit fails with the
  // map's on_overlap error), and blocks and table moves are registered.
  [[nodiscard]] Result<void> attach_metadata_map(MetadataMap* map);

  // Write every dirty refcount block, then fdatasync.
  [[nodiscard]] Result<void> flush();
  // The refcount block cache, for an owner whose other caches must be
  // written back after it (TableCache::set_dependency).
  TableCache& block_cache() { return *cache_; }

  // End of the highest cluster with a non-zero refcount seen so far, or of
  // the file; allocations beyond it extend the file.
  std::uint64_t image_end_hint() const { return end_cluster_ << geometry_.cluster_bits; }

 private:
  Refcounts(File& file, RefcountGeometry geometry, Options options);

  // The cached block for table index `ti`, or an empty handle if none is
  // allocated.
  Result<TableCache::Handle> block(std::uint64_t ti);
  // Put a block just written to the file into the cache (clean).
  Result<void> cache_new_block(std::uint64_t offset, std::span<const std::byte> data);
  // Create the refcount block for table index `ti` (as QEMU's alloc_refcount_block).
  Result<void> create_block(std::uint64_t ti, unsigned depth);
  // Grow the table to at least `min_entries` entries by moving it (as QEMU's
  // qcow2_refcount_area).
  Result<void> grow_table(std::uint64_t min_entries);
  Result<void> write_table_entry(std::uint64_t ti);
  Result<void> set_internal(std::uint64_t cluster_index, std::uint64_t value, unsigned depth);
  Result<std::uint64_t> find_free(std::uint64_t n);
  Result<void> sync_if_ordered();

  File* file_;
  RefcountGeometry geometry_;
  Options options_;
  std::uint64_t table_offset_ = 0;
  std::uint32_t table_clusters_ = 0;
  std::vector<std::uint64_t> table_;   // host-endian copy of the on-disk table
  std::unique_ptr<TableCache> cache_;  // refcount blocks, by host offset
  std::uint64_t free_hint_ = 0;        // no free cluster below this index
  std::uint64_t end_cluster_ = 0;
  std::function<bool(std::uint64_t)> reserved_;
  MetadataMap* map_ = nullptr;  // optional (see attach_metadata_map)
  // Cluster runs (first index, count) being allocated right now: their
  // refcounts are not raised yet, so nested allocations must skip them.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> pending_;
};

}  // namespace qnbd::image::qcow2
