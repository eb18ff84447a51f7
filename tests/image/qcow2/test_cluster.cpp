// L2 entry decoding (qcow2.txt "Cluster mapping", "Extended L2 Entries"):
// standard, zero, unallocated, compressed descriptors for several cluster
// sizes, extended L2 subclusters.
#include <doctest/doctest.h>

#include "image/qcow2/cluster.hpp"

using namespace qnbd;
using namespace qnbd::image::qcow2;

namespace {
SubclusterType type_of(const L2Geometry& g, std::uint64_t entry, std::uint64_t bitmap = 0, unsigned sc = 0,
                       std::uint64_t guest = 0) {
  auto r = get_subcluster_type(g, L2Entry{entry, bitmap}, sc, guest);
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  return *r;
}
std::string error_of(const L2Geometry& g, std::uint64_t entry, std::uint64_t bitmap = 0, unsigned sc = 0,
                     std::uint64_t guest = 0) {
  auto r = get_subcluster_type(g, L2Entry{entry, bitmap}, sc, guest);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == EIO);
  return r.error().message;
}
}  // namespace

TEST_CASE("standard L2 entries") {
  L2Geometry g{16, 3, false, false};
  CHECK(type_of(g, 0) == SubclusterType::unallocated_plain);
  CHECK(type_of(g, QCOW_OFLAG_COPIED | 0x50000) == SubclusterType::normal);
  CHECK(type_of(g, 0x50000) == SubclusterType::normal);  // shared cluster (COPIED clear)
  CHECK(type_of(g, QCOW_OFLAG_ZERO) == SubclusterType::zero_plain);
  CHECK(type_of(g, QCOW_OFLAG_COPIED | 0x50000 | QCOW_OFLAG_ZERO) == SubclusterType::zero_alloc);
  CHECK(error_of(g, 0x50200).find("unaligned") != std::string::npos);
  CHECK(error_of(g, 0x50000 | 0x2).find("reserved") != std::string::npos);
  CHECK(error_of(g, 0x50000 | (1ull << 57)).find("reserved") != std::string::npos);
  L2Geometry v2{16, 2, false, false};
  CHECK(error_of(v2, QCOW_OFLAG_ZERO).find("pre-v3") != std::string::npos);
}

TEST_CASE("external data file: identity mapping, offset 0 with COPIED") {
  L2Geometry g{16, 3, false, true};
  CHECK(type_of(g, QCOW_OFLAG_COPIED, 0, 0, 0) == SubclusterType::normal);
  CHECK(type_of(g, 0, 0, 0, 0) == SubclusterType::unallocated_plain);
  CHECK(type_of(g, QCOW_OFLAG_COPIED | 0x30000, 0, 0, 0x30000) == SubclusterType::normal);
  CHECK(error_of(g, QCOW_OFLAG_COPIED | 0x30000, 0, 0, 0x40000).find("does not match") != std::string::npos);
  CHECK(error_of(g, QCOW_OFLAG_COMPRESSED | 0x1000).find("external data file") != std::string::npos);
}

TEST_CASE("compressed descriptors for every cluster size") {
  for (std::uint32_t bits = 9; bits <= 21; ++bits) {
    CAPTURE(bits);
    const unsigned x = 70 - bits;  // qcow2.txt "Cluster mapping"
    const std::uint64_t coffset = 0x123456789ull & ((1ull << (x < 56 ? x : 56)) - 1) & ~0ull;
    const std::uint64_t max_additional = (1ull << (bits - 8)) - 1;
    for (std::uint64_t additional : {std::uint64_t{0}, std::uint64_t{1}, max_additional}) {
      std::uint64_t entry = QCOW_OFLAG_COMPRESSED | (additional << x) | coffset;
      CompressedDescriptor d = parse_compressed_descriptor(entry, bits);
      CHECK(d.host_offset == coffset);
      CHECK(d.nb_sectors == additional + 1);
      CHECK(d.bytes == (additional + 1) * 512 - (coffset & 511));
      L2Geometry g{bits, 3, false, false};
      if (coffset != 0) CHECK(type_of(g, entry) == SubclusterType::compressed);
    }
    // Compressed entries never carry COPIED.
    L2Geometry g{bits, 3, false, false};
    CHECK(error_of(g, QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_COPIED | 0x1000).find("COPIED") != std::string::npos);
  }
}

TEST_CASE("compressed offset bits above 56 are refused for small clusters") {
  // cluster_bits 9: the offset field reaches bit 60; bits 56-60 must be 0.
  L2Geometry g{9, 3, false, false};
  CHECK(error_of(g, QCOW_OFLAG_COMPRESSED | (1ull << 57) | 0x1000).find("56 bits") != std::string::npos);
}

TEST_CASE("extended L2 subclusters (qcow2.txt \"Extended L2 Entries\")") {
  L2Geometry g{16, 3, true, false};
  const std::uint64_t host = QCOW_OFLAG_COPIED | 0x70000;
  // Allocated cluster: alloc bit 3, zero bit 4, neither for 5.
  const std::uint64_t bm = (1ull << 3) | (1ull << (32 + 4));
  CHECK(type_of(g, host, bm, 3) == SubclusterType::normal);
  CHECK(type_of(g, host, bm, 4) == SubclusterType::zero_alloc);
  CHECK(type_of(g, host, bm, 5) == SubclusterType::unallocated_alloc);
  // Unallocated cluster: zero bit only.
  CHECK(type_of(g, 0, 1ull << (32 + 7), 7) == SubclusterType::zero_plain);
  CHECK(type_of(g, 0, 1ull << (32 + 7), 6) == SubclusterType::unallocated_plain);
  CHECK(type_of(g, 0, QCOW_L2_BITMAP_ALL_ZEROES, 31) == SubclusterType::zero_plain);
  // Invalid combinations.
  CHECK(error_of(g, host, (1ull << 2) | (1ull << 34), 0).find("both allocated and zero") != std::string::npos);
  CHECK(error_of(g, 0, 1ull << 9, 9).find("unallocated cluster") != std::string::npos);
  CHECK(error_of(g, host | QCOW_OFLAG_ZERO, 1, 0).find("zero flag") != std::string::npos);
  CHECK(error_of(g, QCOW_OFLAG_COMPRESSED | 0x1000, 1).find("bitmap") != std::string::npos);
  CHECK(type_of(g, QCOW_OFLAG_COMPRESSED | 0x1000, 0) == SubclusterType::compressed);
}

TEST_CASE("L1 entries") {
  auto ok_r = l1_entry_l2_offset(QCOW_OFLAG_COPIED | 0x20000, 16, 1 << 20);
  REQUIRE(ok_r.has_value());
  CHECK(*ok_r == 0x20000);
  CHECK(*l1_entry_l2_offset(0, 16, 1 << 20) == 0);
  CHECK_FALSE(l1_entry_l2_offset(0x20000 | 1, 16, 1 << 20).has_value());
  CHECK(l1_entry_l2_offset(0x20200, 16, 1 << 20).error().message.find("unaligned") != std::string::npos);
  CHECK(l1_entry_l2_offset(0x200000, 16, 1 << 20).error().message.find("beyond") != std::string::npos);
}
