// Metadata context names and query matching (proto.md "Metadata querying";
// qemu's nbd/server.c nbd_negotiate_meta_queries), matching qemu-nbd: fixed
// order (base, allocation-depth, bitmaps), stable ids, duplicates collapse,
// unknown namespaces and leaves are ignored.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/catalog.hpp"

namespace qnbd::protocol {

enum class ContextKind : std::uint8_t { base_allocation, allocation_depth, dirty_bitmap };

struct MetaContext {
  ContextKind kind = ContextKind::base_allocation;
  std::uint32_t id = 0;      // kContextId*; bitmaps: kContextIdFirstBitmap + index
  std::uint32_t bitmap = 0;  // index into ExportInfo::bitmaps for dirty_bitmap
  std::string name;          // full name, e.g. "qemu:dirty-bitmap:b0"
};

// Which contexts of an export a set of queries designates. `list` = true for
// NBD_OPT_LIST_META_CONTEXT (wildcards expand), false for SET (only exact
// names select). No queries: LIST returns everything, SET nothing.
// Result order is fixed (base, allocation-depth, bitmaps in export order).
std::vector<MetaContext> match_meta_contexts(const ExportInfo& exp, const std::vector<std::string_view>& queries,
                                             bool list);

}  // namespace qnbd::protocol
