#include "image/qcow2/overlap.hpp"

#include <algorithm>
#include <bit>

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

std::pair<std::uint64_t, std::uint64_t> MetadataMap::cluster_range(std::uint64_t offset, std::uint64_t bytes) const {
  // An end past 2^64 is clipped: no cluster lies there.
  const std::uint64_t end = bytes - 1 > UINT64_MAX - offset ? UINT64_MAX : offset + bytes - 1;
  return {offset >> cluster_bits_, end >> cluster_bits_};
}

void MetadataMap::stage(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes, std::vector<Span>& spans) {
  const auto [first, last] = cluster_range(offset, bytes);
  if (first == last)
    keys_.push_back(make_key(first, kind));  // merged in by add_keys
  else
    spans.push_back({first, last});  // a table of several clusters (or an unaligned one)
}

void MetadataMap::update_max_last(SpanList& list, std::size_t from) {
  list.max_last.resize(list.spans.size());
  for (std::size_t i = from; i < list.spans.size(); ++i) {
    list.max_last[i] = i == 0 ? list.spans[i].last : std::max(list.max_last[i - 1], list.spans[i].last);
  }
}

void MetadataMap::add(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes) {
  const std::pair<std::uint64_t, std::uint64_t> range{offset, bytes};
  add_ranges(kind, std::span(&range, 1));
}

void MetadataMap::add_clusters(MetadataKind kind, std::span<const std::uint64_t> offsets, std::uint64_t bytes) {
  if (bytes == 0 || offsets.empty()) return;
  // The new keys are appended, sorted, and merged into the sorted ones in
  // one pass. Inserting them one at a time moved the tail of the vector
  // for each: quadratic in the number of tables, so that opening a crafted
  // image whose L1 table names a million scattered L2 tables took hours
  // (fuzz/corpus/qcow2_write/slow-open-scattered-l2-tables).
  const std::size_t old_size = keys_.size();
  std::vector<Span> spans;
  for (std::uint64_t offset : offsets) stage(kind, offset, bytes, spans);
  add_keys(old_size);
  add_spans(kind, spans);
}

void MetadataMap::add_ranges(MetadataKind kind, std::span<const std::pair<std::uint64_t, std::uint64_t>> ranges) {
  const std::size_t old_size = keys_.size();
  std::vector<Span> spans;
  for (const auto& [offset, bytes] : ranges) {
    if (bytes != 0) stage(kind, offset, bytes, spans);
  }
  add_keys(old_size);
  add_spans(kind, spans);
}

void MetadataMap::add_keys(std::size_t old_size) {
  if (keys_.size() == old_size) return;
  const auto mid = keys_.begin() + static_cast<std::ptrdiff_t>(old_size);
  if ((std::uint64_t{keys_.size()} << 6) <= (std::uint64_t{1} << filter_bits_log2_) && !filter_.empty()) {
    for (auto it = mid; it != keys_.end(); ++it) filter_set(*it >> kKindBits);
  }
  if (!std::is_sorted(mid, keys_.end())) std::sort(mid, keys_.end());
  const auto sorted_mid = keys_.begin() + static_cast<std::ptrdiff_t>(old_size);
  if (old_size != 0 && *(sorted_mid - 1) > *sorted_mid) std::inplace_merge(keys_.begin(), sorted_mid, keys_.end());
  if ((std::uint64_t{keys_.size()} << 6) > (std::uint64_t{1} << filter_bits_log2_) || filter_.empty()) {
    rebuild_filter();  // doubles it: amortized O(1) per registration
  }
}

void MetadataMap::add_spans(MetadataKind kind, std::vector<Span>& spans) {
  if (spans.empty()) return;
  SpanList& list = spans_[static_cast<std::size_t>(kind)];
  const auto by_first = [](const Span& a, const Span& b) { return a.first < b.first; };
  std::sort(spans.begin(), spans.end(), by_first);
  // Merged in, and the running maximum redone from the first position that
  // changed: appending in order (the usual case) costs only the new spans.
  std::size_t from = list.spans.size();
  if (from != 0 && spans.front().first < list.spans.back().first) {
    from = static_cast<std::size_t>(std::upper_bound(list.spans.begin(), list.spans.end(), spans.front(), by_first) -
                                    list.spans.begin());
  }
  const std::size_t old_size = list.spans.size();
  list.spans.insert(list.spans.end(), spans.begin(), spans.end());
  std::inplace_merge(list.spans.begin(), list.spans.begin() + static_cast<std::ptrdiff_t>(old_size), list.spans.end(),
                     by_first);
  update_max_last(list, from);
  for (const Span& sp : spans) span_clusters_ += sp.last - sp.first + 1;
  span_kinds_ |= kind_bit(kind);
}

void MetadataMap::remove(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes) {
  if (bytes == 0) return;
  const auto [first, last] = cluster_range(offset, bytes);
  if (first != last) {
    SpanList& list = spans_[static_cast<std::size_t>(kind)];
    for (auto it = std::lower_bound(list.spans.begin(), list.spans.end(), first,
                                    [](const Span&a, std::uint64_t f) { return a.first < f; });
         it != list.spans.end() && it->first == first; ++it) {
      if (it->last != last) continue;
      const auto i = static_cast<std::size_t>(it - list.spans.begin());
      list.spans.erase(it);
      update_max_last(list, i);
      span_clusters_ -= last - first + 1;
      if (list.spans.empty()) span_kinds_ &= ~kind_bit(kind);
      return;
    }
    return;
  }
  auto it = std::lower_bound(keys_.begin(), keys_.end(), make_key(first, kind));
  if (it != keys_.end() && *it == make_key(first, kind)) {
    keys_.erase(it);
    ++removed_since_rebuild_;
  }
  if (removed_since_rebuild_ > keys_.size() + 64) rebuild_filter();
}

void MetadataMap::remove_all(MetadataKind kind) {
  std::erase_if(keys_,
                [&](std::uint64_t k) { return (k & ((1u << kKindBits) - 1)) == static_cast<std::uint64_t>(kind); });
  rebuild_filter();
  SpanList& list = spans_[static_cast<std::size_t>(kind)];
  for (const Span& sp : list.spans) span_clusters_ -= sp.last - sp.first + 1;
  list = SpanList{};
  span_kinds_ &= ~kind_bit(kind);
}

std::optional<MetadataHit> MetadataMap::find(std::uint64_t offset, std::uint64_t bytes, KindMask ignore) const {
  if (bytes == 0) return std::nullopt;
  const auto [first, last] = cluster_range(offset, bytes);
  // The lowest (cluster, kind) key registered in [first, last] and not
  // ignored, from the single clusters and from the spans.
  std::optional<std::uint64_t> best;
  // The guest write case: a few bit tests say "not metadata" almost always.
  bool maybe = last - first >= 4;
  for (std::uint64_t c = first; c <= last && !maybe; ++c) maybe = maybe_registered(c);
  if (maybe) {
    for (auto it = std::lower_bound(keys_.begin(), keys_.end(), make_key(first, MetadataKind{0}));
         it != keys_.end() && (*it >> kKindBits) <= last; ++it) {
      if (!(ignore & kind_bit(static_cast<MetadataKind>(*it & ((1u << kKindBits) - 1))))) {
        best = *it;
        break;
      }
    }
  }
  for (KindMask kinds = span_kinds_ & ~ignore; kinds != 0; kinds &= kinds - 1) {
    const auto k = static_cast<unsigned>(std::countr_zero(kinds));
    const SpanList& list = spans_[k];
    // The first span (by first cluster) that reaches `first`: no span
    // before it overlaps, and none after it starts earlier.
    const auto i = static_cast<std::size_t>(std::lower_bound(list.max_last.begin(), list.max_last.end(), first) -
                                            list.max_last.begin());
    if (i == list.spans.size() || list.spans[i].first > last) continue;
    const std::uint64_t key = make_key(std::max(list.spans[i].first, first), static_cast<MetadataKind>(k));
    if (!best || key < *best) best = key;
  }
  if (!best) return std::nullopt;
  return MetadataHit{static_cast<MetadataKind>(*best & ((1u << kKindBits) - 1)), (*best >> kKindBits) << cluster_bits_};
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
