// Metadata overlap protection: the host clusters that hold qcow2 metadata,
// and the check every metadata write, in-place guest write and allocation
// goes through before touching the image file (QEMU's pre-write overlap
// check, "cached" mode: header, active L1/L2, refcount table and blocks,
// snapshot table, inactive L1 tables, bitmap directory and bitmap tables).
//
// A corrupt image can claim that a metadata cluster is free (refcount 0) or
// is a guest data cluster (an L2 entry pointing at it). Writing guest data
// there would let a client rewrite the header (a backing file of its
// choosing) or the refcounts, so such a write fails with EIO and the image
// is marked corrupt (qcow2.txt section "Header", incompatible feature bit 1)
// instead.
//
// Cost: QEMU scans the L1 and refcount tables on every write; here the
// single-cluster structures (L2 tables, refcount blocks, the header, small
// tables) are kept in one sorted vector (cluster index and kind packed in a
// 64-bit key), so a check is at most one binary search (O(log n), n =
// metadata clusters) whatever the image size, and registering a cluster (a
// new L2 table or refcount block, rare) is one insertion. In front of it a
// one-hash Bloom filter of at least 64 bits per registered cluster answers
// "no metadata here" for a 1-4 cluster range with one or a few bit tests
// (false positives about 1/64, then the binary search), so a guest write
// pays a few nanoseconds. Memory: about 16 bytes per such cluster.
//
// A structure spanning several clusters (an L1 table, the refcount table,
// the snapshot table, an inactive L1 table, a bitmap table or directory)
// is kept as one cluster interval per registration, in a list per kind
// sorted by first cluster with the running maximum of last clusters beside
// it; a check is one binary search per kind that has any. Registering such
// structures cluster by cluster cost memory in proportion to the clusters
// they claim, which a crafted image sets: 65,536 snapshots each naming a
// 32 MiB L1 table at 512-byte clusters claimed 2^32 clusters (34 GiB), and
// 2,000 of them took 112 s and 3 GiB to open.
//
// Adding a structure: add a MetadataKind (and its name), add() its clusters
// when it is loaded or allocated, remove() them when it is freed.
//
// Thread-safety: none; the owning image uses it under its metadata mutex.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/result.hpp"

namespace qnbd::image::qcow2 {

enum class MetadataKind : std::uint8_t {
  header,
  active_l1,
  active_l2,
  refcount_table,
  refcount_block,
  snapshot_table,
  inactive_l1,
  bitmap_directory,
  bitmap_table,
  count_,  // keep last (at most 32 kinds: KindMask bits)
};

using KindMask = std::uint32_t;
constexpr KindMask kind_bit(MetadataKind k) { return KindMask{1} << static_cast<unsigned>(k); }
const char* metadata_kind_name(MetadataKind k);

struct MetadataHit {
  MetadataKind kind;
  std::uint64_t cluster_offset;  // host offset of the first overlapping metadata cluster
};

class MetadataMap {
 public:
  // Called on a hit by check() with a one-line description; returns the
  // error check() reports (the image sets its corrupt bit there).
  using OnOverlap = std::function<Error(const std::string& why)>;

  explicit MetadataMap(unsigned cluster_bits) : cluster_bits_(cluster_bits) {}

  // Register every cluster touched by [offset, offset + bytes) as `kind`
  // (a range reaching past 2^64 is clipped there). A cluster may be
  // registered more than once (as QEMU, nothing forbids a corrupt image
  // from naming it twice); remove() drops one registration.
  void add(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes);
  // add() for many ranges of `bytes` each, in one pass (in any order).
  void add_clusters(MetadataKind kind, std::span<const std::uint64_t> offsets, std::uint64_t bytes);
  // add() for many ranges (offset, bytes), in one pass (in any order).
  void add_ranges(MetadataKind kind, std::span<const std::pair<std::uint64_t, std::uint64_t>> ranges);
  // Drops one registration of exactly this range, as it was added.
  void remove(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes);
  void remove_all(MetadataKind kind);

  // The first metadata cluster touched by [offset, offset + bytes) whose
  // kind is not in `ignore`, if any.
  [[nodiscard]] std::optional<MetadataHit> find(std::uint64_t offset, std::uint64_t bytes, KindMask ignore = 0) const;

  // The pre-write check: ok, or (on a hit) the on_overlap error, EIO with
  // "Preventing invalid write on metadata (overlaps with KIND) ..." as QEMU.
  [[nodiscard]] Result<void> check(std::uint64_t offset, std::uint64_t bytes, KindMask ignore = 0) const;
  void set_on_overlap(OnOverlap f) { on_overlap_ = std::move(f); }

  // Clusters registered, counted once per registration.
  std::size_t registered_clusters() const { return keys_.size() + span_clusters_; }
  unsigned cluster_bits() const { return cluster_bits_; }

 private:
  // A multi-cluster registration: clusters first..last, inclusive.
  struct Span {
    std::uint64_t first, last;
  };
  // The spans of one kind, sorted by first, and max_last[i], the largest
  // last of spans[0..i] (non-decreasing): the first span reaching a cluster
  // c is at the first i with max_last[i] >= c, found by binary search.
  struct SpanList {
    std::vector<Span> spans;
    std::vector<std::uint64_t> max_last;
  };

  // The clusters [first, last] of [offset, offset + bytes), bytes > 0.
  std::pair<std::uint64_t, std::uint64_t> cluster_range(std::uint64_t offset, std::uint64_t bytes) const;
  // One range: a key appended to keys_ (one cluster) or a span to `spans`.
  void stage(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes, std::vector<Span>& spans);
  static void update_max_last(SpanList& list, std::size_t from);
  void add_keys(std::size_t old_size);
  void add_spans(MetadataKind kind, std::vector<Span>& spans);
  bool maybe_registered(std::uint64_t cluster) const;
  void filter_set(std::uint64_t cluster);
  void rebuild_filter();

  unsigned cluster_bits_;
  std::vector<std::uint64_t> keys_;  // sorted; cluster index << 8 | kind
  std::array<SpanList, static_cast<std::size_t>(MetadataKind::count_)> spans_;
  KindMask span_kinds_ = 0;  // kinds with a span registered
  std::size_t span_clusters_ = 0;
  // The Bloom filter: bit hash(cluster) is set for every registered cluster
  // (never cleared by remove(): stale bits only cost a binary search; it is
  // rebuilt when it gets too small or too stale).
  std::vector<std::uint64_t> filter_;
  unsigned filter_bits_log2_ = 0;
  std::size_t removed_since_rebuild_ = 0;
  OnOverlap on_overlap_;
};

}  // namespace qnbd::image::qcow2
