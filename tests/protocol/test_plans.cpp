// ReadPlan (hole/data chunking of READ replies) and BlockStatusPlan
// (context ids, NBD_STATE_* mapping, REQ_ONE, merging, payload filters),
// checked against wire images written out field by field.
#include <doctest/doctest.h>

#include <string>

#include "protocol/constants.hpp"
#include "protocol/transmission.hpp"
#include "test_helpers.hpp"

using namespace qnbd;
using namespace qnbd::protocol;
using qnbd::test::Bytes;

namespace {

Command read_cmd(std::uint64_t offset, std::uint64_t length, std::uint16_t flags = 0) {
  Command c;
  c.type = NBD_CMD_READ;
  c.cookie = 42;
  c.offset = offset;
  c.length = length;
  c.flags = flags;
  return c;
}

std::vector<std::byte> chunk(const ReadPlan& p, std::size_t i) {
  ChunkPrefix buf;
  auto n = p.encode_chunk(i, buf);
  return {buf.begin(), buf.begin() + static_cast<long>(n)};
}

}  // namespace

TEST_CASE("ReadPlan: structured holes and data alternate, neighbours merge, the last chunk is DONE") {
  ReadPlan p;
  p.reset(read_cmd(1 << 20, 16384), ReplyMode::structured);
  REQUIRE(p.sparse());
  CHECK(p.add(4096, false));
  CHECK(p.add(4096, true));
  CHECK(p.add(2048, true));            // merges with the hole before it
  CHECK_FALSE(p.add(1 << 20, false));  // covers the rest; clipped to the request
  p.finish();
  REQUIRE(p.parts().size() == 3);
  CHECK(p.parts()[0].offset == 0);
  CHECK(p.parts()[0].length == 4096);
  CHECK_FALSE(p.parts()[0].hole);
  CHECK(p.parts()[1].offset == 4096);
  CHECK(p.parts()[1].length == 6144);
  CHECK(p.parts()[1].hole);
  CHECK(p.parts()[2].offset == 10240);
  CHECK(p.parts()[2].length == 6144);
  REQUIRE(p.chunk_count() == 3);
  const std::uint64_t base = 1 << 20;
  CHECK(
      chunk(p, 0) ==
      Bytes().u32(NBD_STRUCTURED_REPLY_MAGIC).u16(0).u16(NBD_REPLY_TYPE_OFFSET_DATA).u64(42).u32(8 + 4096).u64(base).v);
  CHECK(chunk(p, 1) == Bytes()
                           .u32(NBD_STRUCTURED_REPLY_MAGIC)
                           .u16(0)
                           .u16(NBD_REPLY_TYPE_OFFSET_HOLE)
                           .u64(42)
                           .u32(12)
                           .u64(base + 4096)
                           .u32(6144)
                           .v);
  CHECK(chunk(p, 2) == Bytes()
                           .u32(NBD_STRUCTURED_REPLY_MAGIC)
                           .u16(NBD_REPLY_FLAG_DONE)
                           .u16(NBD_REPLY_TYPE_OFFSET_DATA)
                           .u64(42)
                           .u32(8 + 6144)
                           .u64(base + 10240)
                           .v);
}

TEST_CASE("ReadPlan: extended chunks carry the request offset and 64-bit lengths") {
  ReadPlan p;
  p.reset(read_cmd(512, 8192), ReplyMode::extended);
  p.add(8192, true);
  p.finish();
  REQUIRE(p.chunk_count() == 1);
  CHECK(chunk(p, 0) == Bytes()
                           .u32(NBD_EXTENDED_REPLY_MAGIC)
                           .u16(NBD_REPLY_FLAG_DONE)
                           .u16(NBD_REPLY_TYPE_OFFSET_HOLE)
                           .u64(42)
                           .u64(512)
                           .u64(12)
                           .u64(512)
                           .u32(8192)
                           .v);
}

TEST_CASE("ReadPlan: what the device did not describe is data") {
  ReadPlan p;
  p.reset(read_cmd(0, 8192), ReplyMode::structured);
  p.add(4096, true);
  p.finish();
  REQUIRE(p.parts().size() == 2);
  CHECK(p.parts()[1].offset == 4096);
  CHECK(p.parts()[1].length == 4096);
  CHECK_FALSE(p.parts()[1].hole);
  // No extents at all (the device could not tell): one data chunk.
  p.reset(read_cmd(0, 8192), ReplyMode::structured);
  p.finish();
  REQUIRE(p.parts().size() == 1);
  CHECK_FALSE(p.parts()[0].hole);
}

TEST_CASE("ReadPlan: at most kMaxExtents device extents, then the rest as data") {
  ReadPlan p;
  const std::uint64_t n = 2 * ReadPlan::kMaxExtents;
  p.reset(read_cmd(0, n * 512), ReplyMode::structured);
  std::size_t used = 0;
  while (used < n && p.add(512, used % 2 == 1)) ++used;  // the last one a hole
  CHECK(used == ReadPlan::kMaxExtents);
  p.finish();
  CHECK(p.parts().size() == ReadPlan::kMaxExtents + 1);
  std::uint64_t sum = 0;
  for (auto part : p.parts()) sum += part.length;
  CHECK(sum == n * 512);
  CHECK_FALSE(p.parts().back().hole);
}

TEST_CASE("ReadPlan: simple mode, DF and zero length are not chunked") {
  ReadPlan p;
  p.reset(read_cmd(0, 4096), ReplyMode::simple);
  CHECK_FALSE(p.sparse());
  CHECK_FALSE(p.add(4096, true));
  p.finish();
  REQUIRE(p.parts().size() == 1);
  CHECK(chunk(p, 0) == Bytes().u32(NBD_SIMPLE_REPLY_MAGIC).u32(0).u64(42).v);

  p.reset(read_cmd(0, 4096, NBD_CMD_FLAG_DF), ReplyMode::structured);
  CHECK_FALSE(p.sparse());
  p.finish();
  REQUIRE(p.parts().size() == 1);
  CHECK(chunk(p, 0) == Bytes()
                           .u32(NBD_STRUCTURED_REPLY_MAGIC)
                           .u16(NBD_REPLY_FLAG_DONE)
                           .u16(NBD_REPLY_TYPE_OFFSET_DATA)
                           .u64(42)
                           .u32(8 + 4096)
                           .u64(0)
                           .v);

  p.reset(read_cmd(7, 0), ReplyMode::structured);
  p.finish();
  CHECK(p.parts().empty());
  REQUIRE(p.chunk_count() == 1);
  CHECK(chunk(p, 0) ==
        Bytes().u32(NBD_STRUCTURED_REPLY_MAGIC).u16(NBD_REPLY_FLAG_DONE).u16(NBD_REPLY_TYPE_NONE).u64(42).u32(0).v);
  p.reset(read_cmd(7, 0), ReplyMode::simple);
  p.finish();
  CHECK(chunk(p, 0) == Bytes().u32(NBD_SIMPLE_REPLY_MAGIC).u32(0).u64(42).v);
}

namespace {

const std::vector<ContextSlot> kCtx = {
    {ContextKind::base_allocation, kContextIdBaseAllocation},
    {ContextKind::allocation_depth, kContextIdAllocationDepth},
    {ContextKind::dirty_bitmap, kContextIdFirstBitmap + 1},
};

Command status_cmd(std::uint64_t length, std::uint64_t mask, std::uint16_t flags = 0) {
  Command c;
  c.type = NBD_CMD_BLOCK_STATUS;
  c.cookie = 3;
  c.offset = 1024;
  c.length = length;
  c.context_mask = mask;
  c.flags = flags;
  return c;
}

}  // namespace

TEST_CASE("BlockStatusPlan: flags per context kind, merged neighbours, ids, DONE on the last chunk") {
  BlockStatusPlan p;
  p.reset(status_cmd(16384, 0b111), ReplyMode::structured, kCtx);
  REQUIRE(p.allocation_open());
  CHECK(p.add_allocation(4096, true, false, 1));  // data in this image
  CHECK(p.add_allocation(4096, true, false, 1));  // merges
  CHECK(p.add_allocation(4096, false, true, 0));  // hole reading zero
  CHECK(p.allocation_pos() == 12288);
  CHECK_FALSE(p.add_allocation(1 << 20, true, true, 2));  // clipped; the request is covered
  CHECK_FALSE(p.allocation_open());
  REQUIRE(p.bitmap_open(2));
  CHECK_FALSE(p.bitmap_open(0));
  CHECK(p.add_bitmap(2, 512, true));
  CHECK(p.bitmap_pos(2) == 512);
  CHECK_FALSE(p.add_bitmap(2, 1 << 20, false));
  std::vector<std::byte> out;
  REQUIRE(p.append_chunks(out));
  auto want = Bytes()
                  .u32(NBD_STRUCTURED_REPLY_MAGIC)
                  .u16(0)
                  .u16(NBD_REPLY_TYPE_BLOCK_STATUS)
                  .u64(3)
                  .u32(4 + 3 * 8)
                  .u32(kContextIdBaseAllocation)
                  .u32(8192)
                  .u32(0)
                  .u32(4096)
                  .u32(NBD_STATE_HOLE | NBD_STATE_ZERO)
                  .u32(4096)
                  .u32(NBD_STATE_ZERO)
                  .u32(NBD_STRUCTURED_REPLY_MAGIC)
                  .u16(0)
                  .u16(NBD_REPLY_TYPE_BLOCK_STATUS)
                  .u64(3)
                  .u32(4 + 3 * 8)
                  .u32(kContextIdAllocationDepth)
                  .u32(8192)
                  .u32(1)
                  .u32(4096)
                  .u32(0)
                  .u32(4096)
                  .u32(2)
                  .u32(NBD_STRUCTURED_REPLY_MAGIC)
                  .u16(NBD_REPLY_FLAG_DONE)
                  .u16(NBD_REPLY_TYPE_BLOCK_STATUS)
                  .u64(3)
                  .u32(4 + 2 * 8)
                  .u32(kContextIdFirstBitmap + 1)
                  .u32(512)
                  .u32(NBD_STATE_DIRTY)
                  .u32(16384 - 512)
                  .u32(0);
  CHECK(out == want.v);
}

TEST_CASE("BlockStatusPlan: REQ_ONE keeps one extent per context, as long as equal neighbours make it") {
  BlockStatusPlan p;
  p.reset(status_cmd(1 << 20, 0b001, NBD_CMD_FLAG_REQ_ONE), ReplyMode::extended, kCtx);
  CHECK(p.add_allocation(4096, true, false, 1));
  CHECK(p.add_allocation(4096, true, false, 1));
  CHECK_FALSE(p.add_allocation(4096, false, false, 0));  // a different extent ends it
  CHECK_FALSE(p.allocation_open());
  REQUIRE(p.extents(0).size() == 1);
  CHECK(p.extents(0)[0].length == 8192);
  std::vector<std::byte> out;
  REQUIRE(p.append_chunks(out));
  CHECK(out == Bytes()
                   .u32(NBD_EXTENDED_REPLY_MAGIC)
                   .u16(NBD_REPLY_FLAG_DONE)
                   .u16(NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
                   .u64(3)
                   .u64(1024)
                   .u64(8 + 16)
                   .u32(kContextIdBaseAllocation)
                   .u32(1)
                   .u64(8192)
                   .u64(0)
                   .v);
}

TEST_CASE("BlockStatusPlan: a payload filter reports only its contexts; nothing reported is EIO") {
  BlockStatusPlan p;
  p.reset(status_cmd(4096, 0b100), ReplyMode::structured, kCtx);
  CHECK_FALSE(p.allocation_open());  // no allocation context asked for: no walk
  REQUIRE(p.bitmap_open(2));
  std::vector<std::byte> out;
  auto none = p.append_chunks(out);
  REQUIRE_FALSE(none);
  CHECK(none.error().code == EIO);
  CHECK(out.empty());
  CHECK_FALSE(p.add_bitmap(2, 4096, false));
  REQUIRE(p.append_chunks(out));
  CHECK(out == Bytes()
                   .u32(NBD_STRUCTURED_REPLY_MAGIC)
                   .u16(NBD_REPLY_FLAG_DONE)
                   .u16(NBD_REPLY_TYPE_BLOCK_STATUS)
                   .u64(3)
                   .u32(4 + 8)
                   .u32(kContextIdFirstBitmap + 1)
                   .u32(4096)
                   .u32(0)
                   .v);
  // Context 1 only: the allocation walk runs, base:allocation is not reported.
  p.reset(status_cmd(4096, 0b010), ReplyMode::structured, kCtx);
  REQUIRE(p.allocation_open());
  p.add_allocation(4096, true, false, 1);
  CHECK(p.extents(0).empty());
  CHECK(p.extents(1).size() == 1);
}

TEST_CASE("BlockStatusPlan: compact descriptors split above 32 bits; empty extents stop the walk") {
  BlockStatusPlan p;
  p.reset(status_cmd(10ull << 30, 0b001), ReplyMode::structured, kCtx);
  CHECK_FALSE(p.add_allocation(0, true, false, 1));
  CHECK(p.allocation_pos() == 0);
  CHECK_FALSE(p.add_allocation(10ull << 30, false, true, 0));
  REQUIRE(p.extents(0).size() == 3);
  for (auto e : p.extents(0)) CHECK(e.length <= 0xffffffffull);
  p.reset(status_cmd(10ull << 30, 0b001), ReplyMode::extended, kCtx);
  p.add_allocation(10ull << 30, false, true, 0);
  CHECK(p.extents(0).size() == 1);
}
