// common/checked.hpp guards every size and offset taken from an image or a
// request; these cases pin its edges (the overflow boundary, the empty range
// at the limit, alignment of 0 and of the largest power of two).
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>

#include "common/checked.hpp"
#include "common/endian.hpp"

using namespace qnbd;

namespace {
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
}

TEST_CASE("checked_add is exact up to the boundary and empty past it") {
  CHECK(checked_add(0, 0) == 0u);
  CHECK(checked_add(kMax - 1, 1) == kMax);
  CHECK_FALSE(checked_add(kMax, 1).has_value());
  CHECK_FALSE(checked_add(1ull << 63, 1ull << 63).has_value());
  CHECK(checked_add((1ull << 63) - 1, 1ull << 63) == kMax);
}

TEST_CASE("checked_mul is exact up to the boundary and empty past it") {
  CHECK(checked_mul(0, kMax) == 0u);
  CHECK(checked_mul(kMax, 1) == kMax);
  CHECK(checked_mul(1ull << 32, (1ull << 32) - 1) == (1ull << 32) * ((1ull << 32) - 1));
  CHECK_FALSE(checked_mul(1ull << 32, 1ull << 32).has_value());
  CHECK_FALSE(checked_mul(3, kMax / 3 + 1).has_value());
}

TEST_CASE("range_within accepts exactly the ranges inside [0, limit)") {
  CHECK(range_within(0, 0, 0));  // an empty range at the limit
  CHECK(range_within(10, 0, 10));
  CHECK_FALSE(range_within(11, 0, 10));  // starts past the end
  CHECK(range_within(0, 10, 10));
  CHECK_FALSE(range_within(1, 10, 10));
  CHECK(range_within(4, 6, 10));
  // offset + length wraps around: must not be mistaken for a small end
  CHECK_FALSE(range_within(8, kMax - 3, 10));
  CHECK_FALSE(range_within(kMax, 2, kMax));
  CHECK(range_within(kMax - 1, 1, kMax));
}

TEST_CASE("power of two and alignment helpers") {
  CHECK_FALSE(is_power_of_2(0));
  CHECK(is_power_of_2(1));
  CHECK(is_power_of_2(1ull << 63));
  CHECK_FALSE(is_power_of_2((1ull << 63) + 1));
  CHECK_FALSE(is_power_of_2(3 * 512));

  CHECK(is_aligned(0, 512));
  CHECK(is_aligned(4096, 512));
  CHECK_FALSE(is_aligned(4097, 512));
  CHECK(is_aligned(12345, 1));

  CHECK(align_down(4097, 4096) == 4096u);
  CHECK(align_down(4095, 4096) == 0u);
  CHECK(align_up(4097, 4096) == 8192u);
  CHECK(align_up(4096, 4096) == 4096u);
  CHECK(align_up(0, 65536) == 0u);
  CHECK(align_up(kMax - 4095, 4096) == kMax - 4095);  // the largest value align_up allows

  CHECK(div_round_up(0, 512) == 0u);
  CHECK(div_round_up(1, 512) == 1u);
  CHECK(div_round_up(512, 512) == 1u);
  CHECK(div_round_up(513, 512) == 2u);
  CHECK(div_round_up(kMax, 2) == (kMax / 2) + 1);
}

TEST_CASE("big-endian loads and stores round-trip in wire order") {
  unsigned char b[8] = {};
  store_be16(b, 0x0102);
  CHECK(b[0] == 0x01);
  CHECK(b[1] == 0x02);
  CHECK(load_be16(b) == 0x0102);
  store_be32(b, 0x01020304);
  CHECK(b[0] == 0x01);
  CHECK(b[3] == 0x04);
  CHECK(load_be32(b) == 0x01020304u);
  store_be64(b, 0x0102030405060708ull);
  CHECK(b[0] == 0x01);
  CHECK(b[7] == 0x08);
  CHECK(load_be64(b) == 0x0102030405060708ull);
  // unaligned access is allowed (fields sit at odd offsets in headers)
  unsigned char u[9] = {0xff, 0x25, 0x85, 0x03, 0x68, 0, 0, 0, 0};
  CHECK(load_be32(u + 1) == 0x25850368u);  // NBD_REQUEST_MAGIC
}
