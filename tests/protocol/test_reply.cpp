#include <doctest/doctest.h>

#include <string>

#include "protocol/constants.hpp"
#include "protocol/reply.hpp"
#include "test_helpers.hpp"

using namespace qnbd::protocol;
using qnbd::test::Bytes;

namespace {
std::vector<std::byte> head(const ChunkPrefix& p, std::size_t n) {
  return {p.begin(), p.begin() + static_cast<long>(n)};
}
}  // namespace

TEST_CASE("simple reply golden bytes") {
  ChunkPrefix p;
  auto n = encode_simple_reply(p, NBD_EINVAL, 0xaabbccdd11223344ULL);
  CHECK(head(p, n) == Bytes().u32(0x67446698).u32(22).u64(0xaabbccdd11223344ULL).v);
}

TEST_CASE("structured and extended chunk headers") {
  ChunkPrefix p;
  auto n = encode_none(p, ReplyMode::structured, 7, 4096);
  CHECK(head(p, n) == Bytes().u32(0x668e33ef).u16(1).u16(0).u64(7).u32(0).v);
  n = encode_none(p, ReplyMode::extended, 7, 4096);
  CHECK(head(p, n) == Bytes().u32(0x6e8a278c).u16(1).u16(0).u64(7).u64(4096).u64(0).v);
  n = encode_offset_data(p, ReplyMode::structured, 0, 9, 100, 612, 3);
  CHECK(head(p, n) == Bytes().u32(0x668e33ef).u16(0).u16(1).u64(9).u32(11).u64(612).v);
  n = encode_offset_hole(p, ReplyMode::extended, 1, 9, 100, 200, 512);
  CHECK(head(p, n) == Bytes().u32(0x6e8a278c).u16(1).u16(2).u64(9).u64(100).u64(12).u64(200).u32(512).v);
}

TEST_CASE("error chunks carry the message (and the offset for ERROR_OFFSET)") {
  std::vector<std::byte> out;
  append_error_chunk(out, ReplyMode::structured, 1, 5, 0, NBD_EIO, "bad");
  CHECK(out == Bytes().u32(0x668e33ef).u16(1).u16(0x8001).u64(5).u32(9).u32(5).u16(3).str("bad").v);
  out.clear();
  std::uint64_t at = 4096;
  append_error_chunk(out, ReplyMode::extended, 1, 5, 512, NBD_EIO, "x", &at);
  CHECK(out == Bytes().u32(0x6e8a278c).u16(1).u16(0x8002).u64(5).u64(512).u64(15).u32(5).u16(1).str("x").u64(4096).v);
  out.clear();
  append_error_chunk(out, ReplyMode::structured, 1, 5, 0, NBD_EIO, std::string(10000, 'm'));
  CHECK(out.size() == 20 + 6 + 4096);
}

TEST_CASE("block status chunks: compact type 5, extended type 6") {
  std::vector<StatusExtent> e{{4096, 0}, {8192, 3}};
  std::vector<std::byte> out;
  append_block_status_chunk(out, ReplyMode::structured, 1, 3, 0, 0, e);
  CHECK(out == Bytes().u32(0x668e33ef).u16(1).u16(5).u64(3).u32(4 + 16).u32(0).u32(4096).u32(0).u32(8192).u32(3).v);
  out.clear();
  append_block_status_chunk(out, ReplyMode::extended, 0, 3, 1024, 1, e);
  CHECK(out == Bytes()
                   .u32(0x6e8a278c)
                   .u16(0)
                   .u16(6)
                   .u64(3)
                   .u64(1024)
                   .u64(8 + 32)
                   .u32(1)
                   .u32(2)
                   .u64(4096)
                   .u64(0)
                   .u64(8192)
                   .u64(3)
                   .v);
}

TEST_CASE("ExtentList merges equal neighbours, drops zero lengths, caps count and length") {
  ExtentList l(3, max_extent_length(ReplyMode::structured));
  CHECK(l.add(512, 0));
  CHECK(l.add(512, 0));
  CHECK(l.add(0, 3));
  CHECK(l.add(1024, 3));
  CHECK(l.add(512, 0));
  REQUIRE(l.extents().size() == 3);
  CHECK(l.extents()[0].length == 1024);
  CHECK(l.extents()[1].length == 1024);
  CHECK(l.extents()[1].flags == 3);
  CHECK_FALSE(l.add(512, 3));  // a fourth distinct extent does not fit
  CHECK(l.add(512, 0));        // but extending the last one does
  CHECK(l.total() == 3072);

  ExtentList one(1, max_extent_length(ReplyMode::structured));  // REQ_ONE
  CHECK(one.add(4096, 1));
  CHECK_FALSE(one.add(4096, 0));
  CHECK(one.extents().size() == 1);

  // compact descriptors stay within 32 bits (and 512-aligned)
  ExtentList big(4, max_extent_length(ReplyMode::structured));
  CHECK(big.add(10ull << 30, 2));
  REQUIRE(big.extents().size() == 3);
  for (auto x : big.extents()) CHECK(x.length <= 0xffffffffull);
  CHECK(big.extents()[0].length % 512 == 0);
  CHECK(big.total() == 10ull << 30);
  ExtentList wide(1, max_extent_length(ReplyMode::extended));
  CHECK(wide.add(10ull << 30, 2));
  CHECK(wide.extents().size() == 1);
}
