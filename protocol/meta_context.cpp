#include "protocol/meta_context.hpp"

#include "protocol/constants.hpp"

namespace qnbd::protocol {

namespace {

constexpr std::string_view kBaseAllocation = "base:allocation";
constexpr std::string_view kAllocationDepth = "qemu:allocation-depth";
constexpr std::string_view kDirtyBitmapPrefix = "qemu:dirty-bitmap:";

struct Wanted {
  bool base = false;
  bool depth = false;
  std::vector<bool> bitmaps;
};

void apply_query(const ExportInfo& exp, std::string_view q, bool list, Wanted& w) {
  if (q.size() > kMaxString) return;  // qemu skips over-long queries silently
  if (q.starts_with("base:")) {
    auto leaf = q.substr(5);
    // An empty leaf is a wildcard in LIST and MUST be ignored in SET.
    if ((leaf.empty() && list) || q == kBaseAllocation) w.base = true;
    return;
  }
  if (!q.starts_with("qemu:")) return;  // unknown namespace: ignore
  if (q == "qemu:") {
    if (!list) return;
    w.depth = exp.allocation_depth;
    w.bitmaps.assign(exp.bitmaps.size(), true);
    return;
  }
  if (q == kAllocationDepth) {
    if (exp.allocation_depth) w.depth = true;
    return;
  }
  if (q.starts_with(kDirtyBitmapPrefix)) {
    auto name = q.substr(kDirtyBitmapPrefix.size());
    if (name.empty()) {
      if (list) w.bitmaps.assign(exp.bitmaps.size(), true);
      return;
    }
    for (std::size_t i = 0; i < exp.bitmaps.size(); ++i)
      if (exp.bitmaps[i] == name) w.bitmaps[i] = true;
  }
}

}  // namespace

std::vector<MetaContext> match_meta_contexts(const ExportInfo& exp, const std::vector<std::string_view>& queries,
                                             bool list) {
  Wanted w;
  w.bitmaps.assign(exp.bitmaps.size(), false);
  if (queries.empty()) {
    if (list) {
      w.base = true;
      w.depth = exp.allocation_depth;
      w.bitmaps.assign(exp.bitmaps.size(), true);
    }
  } else {
    for (auto q : queries) apply_query(exp, q, list, w);
  }
  std::vector<MetaContext> out;
  if (w.base) out.push_back({ContextKind::base_allocation, kContextIdBaseAllocation, 0, std::string(kBaseAllocation)});
  if (w.depth)
    out.push_back({ContextKind::allocation_depth, kContextIdAllocationDepth, 0, std::string(kAllocationDepth)});
  for (std::size_t i = 0; i < w.bitmaps.size(); ++i)
    if (w.bitmaps[i])
      out.push_back({ContextKind::dirty_bitmap, kContextIdFirstBitmap + static_cast<std::uint32_t>(i),
                     static_cast<std::uint32_t>(i), std::string(kDirtyBitmapPrefix) + exp.bitmaps[i]});
  return out;
}

}  // namespace qnbd::protocol
