#include "image/qcow2/cluster.hpp"

#include "common/checked.hpp"

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
  // §6.5: x = 62 - (cluster_bits - 8) splits offset and sector count.
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
    // §13.3 #30/#31
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
    return make_error(EIO, "L2 entry {:#018x} has reserved bits set (guest offset {:#x})", entry,
                      guest_cluster_offset);
  }
  const std::uint64_t host = entry & L2E_OFFSET_MASK;
  if (!is_aligned(host, g.cluster_size())) {
    return make_error(EIO, "cluster allocation offset {:#x} unaligned (guest offset {:#x})", host,
                      guest_cluster_offset);
  }
  // Offset 0 is a real cluster only in an external data file (§6.4, §10).
  const bool has_host = host != 0 || (g.external_data_file && (entry & QCOW_OFLAG_COPIED));
  if (has_host && g.external_data_file && host != guest_cluster_offset) {
    return make_error(EIO,
                      "external data file host cluster offset {:#x} does not match guest cluster offset {:#x}", host,
                      guest_cluster_offset);
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

  // §7: word 0 bit 0 is unused with extended L2 entries.
  if (entry & QCOW_OFLAG_ZERO) {
    return make_error(EIO, "extended L2 entry {:#018x} has the zero flag set (guest offset {:#x})", entry,
                      guest_cluster_offset);
  }
  const std::uint64_t bm = e.bitmap;
  const std::uint32_t alloc = static_cast<std::uint32_t>(bm);
  const std::uint32_t zero = static_cast<std::uint32_t>(bm >> 32);
  if (has_host) {
    if (alloc & zero) {
      return make_error(EIO, "subcluster bitmap {:#018x} marks subclusters both allocated and zero (guest offset {:#x})",
                        bm, guest_cluster_offset);
    }
    if (zero & (1u << sc_index)) return SubclusterType::zero_alloc;
    if (alloc & (1u << sc_index)) return SubclusterType::normal;
    return SubclusterType::unallocated_alloc;
  }
  if (alloc != 0) {
    return make_error(EIO, "subcluster bitmap {:#018x} marks subclusters allocated in an unallocated cluster (guest offset {:#x})",
                      bm, guest_cluster_offset);
  }
  if (zero & (1u << sc_index)) return SubclusterType::zero_plain;
  return SubclusterType::unallocated_plain;
}

Result<std::uint64_t> l1_entry_l2_offset(std::uint64_t l1_entry, std::uint32_t cluster_bits,
                                         std::uint64_t file_size) {
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

}  // namespace qnbd::image::qcow2
