// The cluster layer of the qcow2 engine, QEMU's qcow2-cluster.c counterpart.
//
// This header: L1/L2 entry decoding (qcow2.txt "Cluster mapping",
// "Extended L2 Entries") as pure functions, no I/O, so every rule is
// unit-testable on its own, and Mapping, the answer of the lookup.
//
// cluster.cpp also holds the Qcow2Image members that walk and change the
// tables (declared in qcow2_image.hpp, private): the one L1/L2 lookup
// (get_host_offset_locked) that read, block status and the write path all
// use; cluster allocation (allocate_cluster_locked, a write's contiguous run
// of write_allocation_locked) and queued frees; the L2 updates (new or
// copied L2 tables, l2_slot_for_write_locked / set_l2_entry_locked, data
// clusters with copy-on-write, zero clusters and subclusters), with the
// crash-ordering rules they follow. The request loops (write, write_zeroes,
// discard), flush and close stay in write.cpp, the read path in
// qcow2_image.cpp, the refcounts in refcount.cpp.
#pragma once

#include <cstdint>

#include "common/result.hpp"
#include "image/qcow2/format.hpp"

namespace qnbd::image::qcow2 {

// QEMU's QCow2SubclusterType. With standard (64-bit) L2 entries a cluster is
// one subcluster.
enum class SubclusterType {
  normal,             // data at host offset
  compressed,         // whole cluster compressed
  zero_plain,         // reads as zeroes, no host cluster
  zero_alloc,         // reads as zeroes, host cluster reserved
  unallocated_plain,  // backing file / zeroes, no host cluster
  unallocated_alloc,  // backing file / zeroes, host cluster reserved (extended L2)
};

const char* to_string(SubclusterType type);

// Whether the L2 entry names a host cluster (data, reserved zeroes, or an
// extended-L2 cluster with reserved unallocated subclusters): the types
// for which QEMU's qcow2_get_host_offset returns an offset. Compressed
// clusters have a host range of their own, not a cluster.
inline bool has_host_cluster(SubclusterType t) {
  return t == SubclusterType::normal || t == SubclusterType::zero_alloc || t == SubclusterType::unallocated_alloc;
}

// What the decoder needs to know about the image.
struct L2Geometry {
  std::uint32_t cluster_bits = 16;
  std::uint32_t version = 3;
  bool extended_l2 = false;
  bool external_data_file = false;

  std::uint64_t cluster_size() const { return 1ull << cluster_bits; }
  std::uint32_t l2_entry_size() const { return extended_l2 ? 16 : 8; }
  std::uint32_t subcluster_bits() const { return extended_l2 ? cluster_bits - 5 : cluster_bits; }
  unsigned subclusters_per_cluster() const { return extended_l2 ? SUBCLUSTERS_PER_CLUSTER : 1; }
};

// One L2 entry: word 0 and (extended L2 only) the subcluster bitmap.
struct L2Entry {
  std::uint64_t entry = 0;
  std::uint64_t bitmap = 0;
};

// Host cluster offset of a standard entry (0 = none; qcow2.txt "Cluster mapping").
inline std::uint64_t l2_entry_host_offset(std::uint64_t entry) { return entry & L2E_OFFSET_MASK; }

// Compressed cluster descriptor (qcow2.txt "Cluster mapping").
struct CompressedDescriptor {
  std::uint64_t host_offset = 0;  // coffset: byte offset of the compressed data
  std::uint64_t nb_sectors = 0;   // 512-byte sectors spanned, counting the first
  std::uint64_t bytes = 0;        // csize: bytes to read from host_offset
};
CompressedDescriptor parse_compressed_descriptor(std::uint64_t entry, std::uint32_t cluster_bits);

// Decode and validate the entry for subcluster sc_index (qcow2.txt
// "Cluster mapping", "Extended L2 Entries"; what QEMU's qcow2_get_host_offset
// reports as corruption) of guest cluster starting at guest_cluster_offset.
// Errors are EIO with a message naming the defect (the image is corrupt).
[[nodiscard]] Result<SubclusterType> get_subcluster_type(const L2Geometry& g, L2Entry e, unsigned sc_index,
                                                         std::uint64_t guest_cluster_offset);

// Where a guest range lives (QEMU's qcow2_get_host_offset result).
struct Mapping {
  std::uint64_t bytes = 0;  // length of the run from the queried offset
  SubclusterType type = SubclusterType::unallocated_plain;
  std::uint64_t host_offset = 0;  // normal/zero_alloc/unallocated_alloc: host byte of the queried offset
  std::uint64_t l2_entry = 0;  // word 0 of the queried offset's L2 entry (0: no L2 table); compressed: the descriptor
  // The L1 and the L2 entry are both COPIED (bit 63, qcow2.txt
  // "Cluster mapping"): the L2 table and the host cluster have refcount 1, so
  // the data may be overwritten in place (the write path's fast path).
  bool copied = false;
};

// Validate an L1 entry (qcow2.txt "Cluster mapping": reserved bits zero, L2
// offset aligned); returns the L2 table offset (0 = unallocated). file_size
// bounds the L2 table.
[[nodiscard]] Result<std::uint64_t> l1_entry_l2_offset(std::uint64_t l1_entry, std::uint32_t cluster_bits,
                                                       std::uint64_t file_size);

}  // namespace qnbd::image::qcow2
