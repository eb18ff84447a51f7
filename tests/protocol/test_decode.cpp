// protocol::decode: one test per rejection it adds to validate_request (the
// BLOCK_STATUS payload form, zero-length status, context masks), errors as
// errnos that map to the NBD_E* values, and the one error -> reply path.
#include <doctest/doctest.h>

#include <cerrno>
#include <string>

#include "protocol/constants.hpp"
#include "protocol/transmission.hpp"
#include "test_helpers.hpp"

using namespace qnbd;
using namespace qnbd::protocol;
using qnbd::test::Bytes;

namespace {

const std::vector<ContextSlot> kContexts = {
    {ContextKind::base_allocation, kContextIdBaseAllocation},
    {ContextKind::allocation_depth, kContextIdAllocationDepth},
    {ContextKind::dirty_bitmap, kContextIdFirstBitmap + 3},
};

ValidationContext extended_ctx() {
  ValidationContext c;
  c.export_size = 1ull << 30;
  c.transmission_flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_DF |
                         NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_BLOCK_STATUS_PAYLOAD;
  c.mode = ReplyMode::extended;
  c.has_contexts = true;
  return c;
}

Request status_request(std::uint64_t offset, std::uint64_t length, std::size_t payload) {
  Request r;
  r.type = NBD_CMD_BLOCK_STATUS;
  r.flags = payload ? NBD_CMD_FLAG_PAYLOAD_LEN : 0;
  r.cookie = 77;
  r.offset = offset;
  r.length = payload ? payload : length;
  r.payload_length = payload;
  return r;
}

}  // namespace

TEST_CASE("decode: a valid request becomes a Command with the header's fields") {
  Request r;
  r.type = NBD_CMD_WRITE_ZEROES;
  r.flags = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE;
  r.cookie = 0xabcdef;
  r.offset = 4096;
  r.length = 1ull << 20;
  auto c = decode(r, {}, extended_ctx(), kContexts);
  REQUIRE(c);
  CHECK(c->type == NBD_CMD_WRITE_ZEROES);
  CHECK(c->cookie == 0xabcdef);
  CHECK(c->offset == 4096);
  CHECK(c->length == 1ull << 20);
  CHECK(c->fua());
  CHECK(c->fast_zero());
  CHECK(c->no_hole());
  CHECK_FALSE(c->df());
  CHECK_FALSE(c->req_one());
}

TEST_CASE("decode: validate_request's refusals come out as errnos equal to the NBD_E* values") {
  auto ctx = extended_ctx();
  Request r;
  r.type = NBD_CMD_READ;
  r.offset = ctx.export_size;
  r.length = 1;
  auto c = decode(r, {}, ctx, kContexts);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == EINVAL);
  CHECK(c.error().message == "request beyond end of export");
  r.type = NBD_CMD_WRITE;
  r.payload_length = 1;
  c = decode(r, Bytes().u8(0).v, ctx, kContexts);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == ENOSPC);
  ctx.transmission_flags |= NBD_FLAG_READ_ONLY;
  c = decode(r, Bytes().u8(0).v, ctx, kContexts);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == EPERM);
  Request big;
  big.type = NBD_CMD_READ;
  big.length = ctx.max_payload + 512ull;
  c = decode(big, {}, extended_ctx(), kContexts);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == EOVERFLOW);
}

TEST_CASE("decode: BLOCK_STATUS without a payload reports every selected context") {
  auto c = decode(status_request(0, 4096, 0), {}, extended_ctx(), kContexts);
  REQUIRE(c);
  CHECK(c->context_mask == 0b111);
  CHECK(c->length == 4096);
  std::vector<ContextSlot> many(kMaxContexts, {ContextKind::dirty_bitmap, 9});
  c = decode(status_request(0, 4096, 0), {}, extended_ctx(), many);
  REQUIRE(c);
  CHECK(c->context_mask == ~std::uint64_t{0});
}

TEST_CASE("decode: zero-length BLOCK_STATUS is refused in both forms") {
  auto c = decode(status_request(0, 0, 0), {}, extended_ctx(), kContexts);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == EINVAL);
  CHECK(c.error().message == "zero-length block status");
  auto p = Bytes().u64(0).u32(kContextIdBaseAllocation);
  c = decode(status_request(0, 0, p.v.size()), p.v, extended_ctx(), kContexts);
  REQUIRE_FALSE(c);
  CHECK(c.error().message == "zero-length block status");
}

TEST_CASE("decode: the BLOCK_STATUS payload form (effect length, then context ids)") {
  const auto ctx = extended_ctx();
  SUBCASE("a filter selects those contexts, and the payload's length is the effect length") {
    auto p = Bytes().u64(8192).u32(kContextIdFirstBitmap + 3).u32(kContextIdBaseAllocation);
    auto c = decode(status_request(512, 0, p.v.size()), p.v, ctx, kContexts);
    REQUIRE(c);
    CHECK(c->context_mask == 0b101);
    CHECK(c->length == 8192);
    CHECK(c->offset == 512);
  }
  struct Bad {
    const char* what;
    Bytes payload;
    const char* message;
  };
  const std::vector<Bad> bad = {
      {"shorter than the effect length", Bytes().u32(0), "malformed block status payload"},
      {"no context id", Bytes().u64(4096), "malformed block status payload"},
      {"a partial id", Bytes().u64(4096).u32(0).u16(1), "malformed block status payload"},
      {"more ids than selected contexts", Bytes().u64(4096).u32(0).u32(1).u32(5).u32(0),
       "malformed block status payload"},
      {"an id not selected", Bytes().u64(4096).u32(kContextIdFirstBitmap), "unknown or duplicate context id"},
      {"an id twice", Bytes().u64(4096).u32(1).u32(1), "unknown or duplicate context id"},
      {"past the end of the export", Bytes().u64(ctx.export_size).u32(0), "request beyond end of export"},
      {"length wraps", Bytes().u64(~0ull).u32(0), "request beyond end of export"},
  };
  for (const auto& b : bad) {
    std::string what = b.what;
    CAPTURE(what);
    auto c = decode(status_request(512, 0, b.payload.v.size()), b.payload.v, ctx, kContexts);
    REQUIRE_FALSE(c);
    CHECK(c.error().code == EINVAL);
    CHECK(c.error().message == b.message);
  }
  SUBCASE("the payload form needs BLOCK_STATUS_PAYLOAD negotiated") {
    auto no = ctx;
    no.transmission_flags &= ~NBD_FLAG_BLOCK_STATUS_PAYLOAD;
    auto p = Bytes().u64(4096).u32(0);
    CHECK_FALSE(decode(status_request(0, 0, p.v.size()), p.v, no, kContexts));
  }
}

TEST_CASE("the error path: simple replies carry the code, structured ones a DONE error chunk") {
  Request r;
  r.type = NBD_CMD_READ;
  r.cookie = 0x1122;
  r.offset = 4096;
  std::vector<std::byte> out;
  append_error_reply(out, ReplyMode::simple, r, Error{EROFS, "read-only"});
  CHECK(out == Bytes().u32(NBD_SIMPLE_REPLY_MAGIC).u32(NBD_EPERM).u64(0x1122).v);
  out.clear();
  append_error_reply(out, ReplyMode::structured, r, Error{EIO, "bad sector"});
  CHECK(out == Bytes()
                   .u32(NBD_STRUCTURED_REPLY_MAGIC)
                   .u16(NBD_REPLY_FLAG_DONE)
                   .u16(NBD_REPLY_TYPE_ERROR)
                   .u64(0x1122)
                   .u32(6 + 10)
                   .u32(NBD_EIO)
                   .u16(10)
                   .str("bad sector")
                   .v);
  out.clear();
  append_error_reply(out, ReplyMode::extended, r, Error{EDQUOT, "q"});
  CHECK(out == Bytes()
                   .u32(NBD_EXTENDED_REPLY_MAGIC)
                   .u16(NBD_REPLY_FLAG_DONE)
                   .u16(NBD_REPLY_TYPE_ERROR)
                   .u64(0x1122)
                   .u64(4096)
                   .u64(7)
                   .u32(NBD_ENOSPC)
                   .u16(1)
                   .str("q")
                   .v);
  // ENOTSUP goes out only to a FAST_ZERO request
  out.clear();
  append_error_reply(out, ReplyMode::simple, r, Error{ENOTSUP, "slow"});
  CHECK(out == Bytes().u32(NBD_SIMPLE_REPLY_MAGIC).u32(NBD_EINVAL).u64(0x1122).v);
  out.clear();
  r.type = NBD_CMD_WRITE_ZEROES;
  r.flags = NBD_CMD_FLAG_FAST_ZERO;
  append_error_reply(out, ReplyMode::simple, r, Error{ENOTSUP, "slow"});
  CHECK(out == Bytes().u32(NBD_SIMPLE_REPLY_MAGIC).u32(NBD_ENOTSUP).u64(0x1122).v);
  // a decode refusal goes through the same path with its message
  Request bad;
  bad.type = 99;
  bad.cookie = 5;
  auto c = decode(bad, {}, extended_ctx(), kContexts);
  REQUIRE_FALSE(c);
  out.clear();
  append_error_reply(out, ReplyMode::structured, bad, c.error());
  CHECK(out == Bytes()
                   .u32(NBD_STRUCTURED_REPLY_MAGIC)
                   .u16(NBD_REPLY_FLAG_DONE)
                   .u16(NBD_REPLY_TYPE_ERROR)
                   .u64(5)
                   .u32(6 + 15)
                   .u32(NBD_EINVAL)
                   .u16(15)
                   .str("unknown command")
                   .v);
}

TEST_CASE("the ok reply: simple in simple and structured mode, NONE in extended") {
  ChunkPrefix p;
  auto n = encode_ok_reply(p, ReplyMode::structured, 9, 4096);
  CHECK(std::vector<std::byte>(p.begin(), p.begin() + static_cast<long>(n)) ==
        Bytes().u32(NBD_SIMPLE_REPLY_MAGIC).u32(0).u64(9).v);
  n = encode_ok_reply(p, ReplyMode::extended, 9, 4096);
  CHECK(std::vector<std::byte>(p.begin(), p.begin() + static_cast<long>(n)) == Bytes()
                                                                                   .u32(NBD_EXTENDED_REPLY_MAGIC)
                                                                                   .u16(NBD_REPLY_FLAG_DONE)
                                                                                   .u16(NBD_REPLY_TYPE_NONE)
                                                                                   .u64(9)
                                                                                   .u64(4096)
                                                                                   .u64(0)
                                                                                   .v);
}
