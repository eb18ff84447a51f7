#include "image/qcow2/overlap.hpp"

#include <algorithm>

namespace qnbd::image::qcow2 {
namespace {

constexpr unsigned kKindBits = 8;

std::uint64_t make_key(std::uint64_t cluster, MetadataKind kind) {
  return cluster << kKindBits | static_cast<std::uint64_t>(kind);
}

}  // namespace

const char* metadata_kind_name(MetadataKind k) {
  switch (k) {
    case MetadataKind::header: return "qcow2 header";
    case MetadataKind::active_l1: return "active L1 table";
    case MetadataKind::active_l2: return "active L2 table";
    case MetadataKind::refcount_table: return "refcount table";
    case MetadataKind::refcount_block: return "refcount block";
    case MetadataKind::snapshot_table: return "snapshot table";
    case MetadataKind::inactive_l1: return "inactive L1 table";
    case MetadataKind::bitmap_directory: return "bitmap directory";
    case MetadataKind::bitmap_table: return "bitmap table";
    case MetadataKind::count_: break;
  }
  return "metadata";
}

bool MetadataMap::maybe_registered(std::uint64_t cluster) const {
  if (filter_.empty()) return false;
  // Fibonacci hashing: the top bits of cluster * 2^64/phi.
  const std::uint64_t h = (cluster * 0x9E3779B97F4A7C15ull) >> (64 - filter_bits_log2_);
  return (filter_[h >> 6] >> (h & 63)) & 1;
}

void MetadataMap::filter_set(std::uint64_t cluster) {
  const std::uint64_t h = (cluster * 0x9E3779B97F4A7C15ull) >> (64 - filter_bits_log2_);
  filter_[h >> 6] |= 1ull << (h & 63);
}

void MetadataMap::rebuild_filter() {
  // At least 64 bits per registered cluster (false positives <= 1/64).
  filter_bits_log2_ = 12;
  while ((std::uint64_t{1} << filter_bits_log2_) < 128 * std::max<std::size_t>(keys_.size(), 1)) ++filter_bits_log2_;
  filter_.assign(std::size_t{1} << (filter_bits_log2_ - 6), 0);
  for (std::uint64_t k : keys_) filter_set(k >> kKindBits);
  removed_since_rebuild_ = 0;
}

void MetadataMap::add(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes) {
  add_clusters(kind, std::span<const std::uint64_t>(&offset, 1), bytes);
}

void MetadataMap::add_clusters(MetadataKind kind, std::span<const std::uint64_t> offsets, std::uint64_t bytes) {
  if (bytes == 0 || offsets.empty()) return;
  // The new keys are appended, sorted, and merged into the sorted ones in
  // one pass. Inserting them one at a time moved the tail of the vector
  // for each: quadratic in the number of tables, so that opening a crafted
  // image whose L1 table names a million scattered L2 tables took hours
  // (fuzz/corpus/qcow2_write/slow-open-scattered-l2-tables).
  const std::size_t old_size = keys_.size();
  for (std::uint64_t offset : offsets) {
    const std::uint64_t first = offset >> cluster_bits_;
    const std::uint64_t last = (offset + bytes - 1) >> cluster_bits_;
    for (std::uint64_t c = first; c <= last; ++c) keys_.push_back(make_key(c, kind));
  }
  const auto mid = keys_.begin() + static_cast<std::ptrdiff_t>(old_size);
  if (!std::is_sorted(mid, keys_.end())) std::sort(mid, keys_.end());
  if (old_size != 0 && *(mid - 1) > *mid) std::inplace_merge(keys_.begin(), mid, keys_.end());
  if ((std::uint64_t{keys_.size()} << 6) > (std::uint64_t{1} << filter_bits_log2_) || filter_.empty()) {
    rebuild_filter();  // doubles it: amortized O(1) per registration
  } else {
    for (std::uint64_t offset : offsets) {
      const std::uint64_t first = offset >> cluster_bits_;
      const std::uint64_t last = (offset + bytes - 1) >> cluster_bits_;
      for (std::uint64_t c = first; c <= last; ++c) filter_set(c);
    }
  }
}

void MetadataMap::remove(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes) {
  if (bytes == 0) return;
  const std::uint64_t first = offset >> cluster_bits_;
  const std::uint64_t last = (offset + bytes - 1) >> cluster_bits_;
  for (std::uint64_t c = first; c <= last; ++c) {
    auto it = std::lower_bound(keys_.begin(), keys_.end(), make_key(c, kind));
    if (it != keys_.end() && *it == make_key(c, kind)) {
      keys_.erase(it);
      ++removed_since_rebuild_;
    }
  }
  if (removed_since_rebuild_ > keys_.size() + 64) rebuild_filter();
}

void MetadataMap::remove_all(MetadataKind kind) {
  std::erase_if(keys_,
                [&](std::uint64_t k) { return (k & ((1u << kKindBits) - 1)) == static_cast<std::uint64_t>(kind); });
  rebuild_filter();
}

std::optional<MetadataHit> MetadataMap::find(std::uint64_t offset, std::uint64_t bytes, KindMask ignore) const {
  if (bytes == 0) return std::nullopt;
  const std::uint64_t first = offset >> cluster_bits_;
  // An end past 2^64 is clipped: no cluster lies there.
  const std::uint64_t last = (bytes - 1 > UINT64_MAX - offset ? UINT64_MAX : offset + bytes - 1) >> cluster_bits_;
  if (last - first < 4) {
    // The guest write case: a few bit tests say "not metadata" almost always.
    bool maybe = false;
    for (std::uint64_t c = first; c <= last && !maybe; ++c) maybe = maybe_registered(c);
    if (!maybe) return std::nullopt;
  }
  for (auto it = std::lower_bound(keys_.begin(), keys_.end(), make_key(first, MetadataKind{0}));
       it != keys_.end() && (*it >> kKindBits) <= last; ++it) {
    const auto kind = static_cast<MetadataKind>(*it & ((1u << kKindBits) - 1));
    if (!(ignore & kind_bit(kind))) return MetadataHit{kind, (*it >> kKindBits) << cluster_bits_};
  }
  return std::nullopt;
}

Result<void> MetadataMap::check(std::uint64_t offset, std::uint64_t bytes, KindMask ignore) const {
  auto hit = find(offset, bytes, ignore);
  if (!hit) return ok();
  std::string why =
      fmt::format("Preventing invalid write on metadata (overlaps with the {} at {:#x}): host range {:#x}+{}",
                  metadata_kind_name(hit->kind), hit->cluster_offset, offset, bytes);
  if (on_overlap_) return on_overlap_(why);
  return make_error(EIO, "{}", why);
}

}  // namespace qnbd::image::qcow2
