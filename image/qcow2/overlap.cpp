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

void MetadataMap::add(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes) {
  if (bytes == 0) return;
  const std::uint64_t first = offset >> cluster_bits_;
  const std::uint64_t last = (offset + bytes - 1) >> cluster_bits_;
  for (std::uint64_t c = first; c <= last; ++c) {
    const std::uint64_t key = make_key(c, kind);
    keys_.insert(std::upper_bound(keys_.begin(), keys_.end(), key), key);
  }
}

void MetadataMap::remove(MetadataKind kind, std::uint64_t offset, std::uint64_t bytes) {
  if (bytes == 0) return;
  const std::uint64_t first = offset >> cluster_bits_;
  const std::uint64_t last = (offset + bytes - 1) >> cluster_bits_;
  for (std::uint64_t c = first; c <= last; ++c) {
    auto it = std::lower_bound(keys_.begin(), keys_.end(), make_key(c, kind));
    if (it != keys_.end() && *it == make_key(c, kind)) keys_.erase(it);
  }
}

void MetadataMap::remove_all(MetadataKind kind) {
  std::erase_if(keys_, [&](std::uint64_t k) { return (k & ((1u << kKindBits) - 1)) == static_cast<std::uint64_t>(kind); });
}

std::optional<MetadataHit> MetadataMap::find(std::uint64_t offset, std::uint64_t bytes, KindMask ignore) const {
  if (bytes == 0) return std::nullopt;
  const std::uint64_t first = offset >> cluster_bits_;
  // An end past 2^64 is clipped: no cluster lies there.
  const std::uint64_t last = (bytes - 1 > UINT64_MAX - offset ? UINT64_MAX : offset + bytes - 1) >> cluster_bits_;
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
  std::string why = fmt::format("Preventing invalid write on metadata (overlaps with the {} at {:#x}): host range {:#x}+{}",
                                metadata_kind_name(hit->kind), hit->cluster_offset, offset, bytes);
  if (on_overlap_) return on_overlap_(why);
  return make_error(EIO, "{}", why);
}

}  // namespace qnbd::image::qcow2
