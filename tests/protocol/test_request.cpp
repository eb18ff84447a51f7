#include <doctest/doctest.h>

#include <cerrno>
#include <string>

#include "protocol/constants.hpp"
#include "protocol/request.hpp"
#include "test_helpers.hpp"

using namespace qnbd::protocol;
using qnbd::test::Bytes;

TEST_CASE("compact and extended request headers parse field by field") {
  Request r;
  auto c = Bytes()
               .u32(NBD_REQUEST_MAGIC)
               .u16(NBD_CMD_FLAG_FUA)
               .u16(NBD_CMD_WRITE)
               .u64(0x0102030405060708ULL)
               .u64(4096)
               .u32(512);
  REQUIRE(parse_request_header(c.v, ReplyMode::simple, kMaxPayload, r) == ParseStatus::ok);
  CHECK(r.flags == NBD_CMD_FLAG_FUA);
  CHECK(r.type == NBD_CMD_WRITE);
  CHECK(r.cookie == 0x0102030405060708ULL);
  CHECK(r.offset == 4096);
  CHECK(r.length == 512);
  CHECK(r.payload_length == 512);

  auto e = Bytes().u32(NBD_EXTENDED_REQUEST_MAGIC).u16(0).u16(NBD_CMD_READ).u64(9).u64(1).u64(1ull << 40);
  REQUIRE(parse_request_header(e.v, ReplyMode::extended, kMaxPayload, r) == ParseStatus::ok);
  CHECK(r.length == (1ull << 40));
  CHECK(r.payload_length == 0);

  // a compact header in extended mode is a framing error
  CHECK(parse_request_header(Bytes().add(c).u32(0).v, ReplyMode::extended, kMaxPayload, r) == ParseStatus::bad_magic);
  auto big = Bytes().u32(NBD_REQUEST_MAGIC).u16(0).u16(NBD_CMD_WRITE).u64(1).u64(0).u32(kMaxPayload + 1);
  CHECK(parse_request_header(big.v, ReplyMode::simple, kMaxPayload, r) == ParseStatus::payload_too_large);
  // READ lengths are not payloads
  auto rd = Bytes().u32(NBD_REQUEST_MAGIC).u16(0).u16(NBD_CMD_READ).u64(1).u64(0).u32(0xffffffff);
  CHECK(parse_request_header(rd.v, ReplyMode::simple, kMaxPayload, r) == ParseStatus::ok);
  // extended: PAYLOAD_LEN on BLOCK_STATUS makes a payload
  auto bs = Bytes()
                .u32(NBD_EXTENDED_REQUEST_MAGIC)
                .u16(NBD_CMD_FLAG_PAYLOAD_LEN)
                .u16(NBD_CMD_BLOCK_STATUS)
                .u64(1)
                .u64(0)
                .u64(12);
  REQUIRE(parse_request_header(bs.v, ReplyMode::extended, kMaxPayload, r) == ParseStatus::ok);
  CHECK(r.payload_length == 12);
}

TEST_CASE("validate_request: errors exactly per proto.md \"Request message\" and the command sections") {
  const std::uint16_t rw_flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
                                 NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_CACHE;
  ValidationContext rw{1ull << 30, rw_flags, ReplyMode::simple, false, false, 1, kMaxPayload};
  ValidationContext st = rw;
  st.mode = ReplyMode::structured;
  st.transmission_flags |= NBD_FLAG_SEND_DF;
  st.has_contexts = true;
  ValidationContext ro = st;
  ro.transmission_flags =
      NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_DF;
  ValidationContext aligned = rw;
  aligned.block_size_committed = true;
  aligned.min_block = 512;
  ValidationContext ext = st;
  ext.mode = ReplyMode::extended;

  struct Row {
    const char* what;
    const ValidationContext* ctx;
    std::uint16_t type, flags;
    std::uint64_t offset, length, payload;
    std::uint32_t expect;
  };
  const std::uint64_t S = 1ull << 30;
  const std::vector<Row> rows = {
      {"read ok", &rw, NBD_CMD_READ, 0, 0, 4096, 0, 0},
      {"read to the end", &rw, NBD_CMD_READ, 0, S - 1, 1, 0, 0},
      {"read past end", &rw, NBD_CMD_READ, 0, S - 1, 2, 0, NBD_EINVAL},
      {"read offset overflow", &rw, NBD_CMD_READ, 0, ~0ull - 10, 100, 0, NBD_EINVAL},
      {"write past end", &rw, NBD_CMD_WRITE, 0, S, 1, 1, NBD_ENOSPC},
      {"zeroes past end", &rw, NBD_CMD_WRITE_ZEROES, 0, S, 1, 0, NBD_ENOSPC},
      {"trim past end", &rw, NBD_CMD_TRIM, 0, S, 1, 0, NBD_EINVAL},
      {"cache past end", &rw, NBD_CMD_CACHE, 0, S, 1, 0, NBD_EINVAL},
      {"status past end", &st, NBD_CMD_BLOCK_STATUS, 0, S, 1, 0, NBD_EINVAL},
      {"unknown command", &rw, 42, 0, 0, 0, 0, NBD_EINVAL},
      {"unknown flag", &rw, NBD_CMD_READ, 1 << 9, 0, 1, 0, NBD_EINVAL},
      {"FUA accepted on any command", &rw, NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0, 0, 0},
      {"DF in simple mode", &rw, NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1, 0, NBD_EINVAL},
      {"DF in structured mode", &st, NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1, 0, 0},
      {"DF on write", &st, NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 1, 1, NBD_EINVAL},
      {"REQ_ONE on read", &st, NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 1, 0, NBD_EINVAL},
      {"REQ_ONE on status", &st, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 1, 0, 0},
      {"NO_HOLE on write", &rw, NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1, 1, NBD_EINVAL},
      {"FAST_ZERO ok", &rw, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE, 0, 1, 0, 0},
      {"PAYLOAD_LEN in compact mode", &st, NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1, 1, NBD_EINVAL},
      {"PAYLOAD_LEN write extended", &ext, NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1, 1, 0},
      {"status payload not negotiated", &ext, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 12, 12, NBD_EINVAL},
      {"flush", &rw, NBD_CMD_FLUSH, 0, 0, 0, 0, 0},
      {"flush with an offset", &rw, NBD_CMD_FLUSH, 0, 512, 0, 0, NBD_EINVAL},
      {"flush with a length", &rw, NBD_CMD_FLUSH, 0, 0, 4096, 0, NBD_EINVAL},
      {"flush past the end", &ext, NBD_CMD_FLUSH, 0, S, 1ull << 40, 0, NBD_EINVAL},
      {"payload on flush", &ext, NBD_CMD_FLUSH, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 8, 8, NBD_EINVAL},
      {"write on read-only (before range)", &ro, NBD_CMD_WRITE, 0, S * 4, 1, 1, NBD_EPERM},
      {"trim on read-only", &ro, NBD_CMD_TRIM, 0, 0, 1, 0, NBD_EPERM},
      {"zeroes on read-only", &ro, NBD_CMD_WRITE_ZEROES, 0, 0, 1, 0, NBD_EPERM},
      {"FAST_ZERO not advertised", &ro, NBD_CMD_READ, NBD_CMD_FLAG_FAST_ZERO, 0, 1, 0, NBD_EINVAL},
      {"status in simple mode", &rw, NBD_CMD_BLOCK_STATUS, 0, 0, 1, 0, NBD_EINVAL},
      {"status without contexts", &ro, NBD_CMD_BLOCK_STATUS, 0, 0, 1, 0, 0},
      {"misaligned offset, committed", &aligned, NBD_CMD_READ, 0, 1, 512, 0, NBD_EINVAL},
      {"misaligned length, committed", &aligned, NBD_CMD_WRITE, 0, 0, 100, 100, NBD_EINVAL},
      {"aligned, committed", &aligned, NBD_CMD_WRITE, 0, 512, 512, 512, 0},
      {"misaligned, not committed", &rw, NBD_CMD_READ, 0, 1, 100, 0, 0},
      {"simple read above max payload", &rw, NBD_CMD_READ, 0, 0, kMaxPayload + 512ull, 0, NBD_EINVAL},
      {"structured read above max payload", &st, NBD_CMD_READ, 0, 0, kMaxPayload + 512ull, 0, NBD_EOVERFLOW},
      {"zero-length read", &rw, NBD_CMD_READ, 0, 0, 0, 0, 0},
      {"big trim is fine", &rw, NBD_CMD_TRIM, 0, 0, S, 0, 0},
      {"disc with junk", &rw, NBD_CMD_DISC, 0xffff, 99, 99, 0, 0},
  };
  ValidationContext ro_noctx = ro;
  ro_noctx.has_contexts = false;
  for (const auto& r : rows) {
    std::string what = r.what;
    CAPTURE(what);
    Request q;
    q.type = r.type;
    q.flags = r.flags;
    q.offset = r.offset;
    q.length = r.length;
    q.payload_length = r.payload;
    CHECK(validate_request(q, *r.ctx).error == r.expect);
  }
  Request q;
  q.type = NBD_CMD_BLOCK_STATUS;
  q.length = 1;
  CHECK(validate_request(q, ro_noctx).error == NBD_EINVAL);
}

TEST_CASE("errno map") {
  CHECK(errno_to_nbd(0) == 0);
  CHECK(errno_to_nbd(EROFS) == NBD_EPERM);
  CHECK(errno_to_nbd(EPERM) == NBD_EPERM);
  CHECK(errno_to_nbd(EIO) == NBD_EIO);
  CHECK(errno_to_nbd(EDQUOT) == NBD_ENOSPC);
  CHECK(errno_to_nbd(EFBIG) == NBD_ENOSPC);
  CHECK(errno_to_nbd(ENOSPC) == NBD_ENOSPC);
  CHECK(errno_to_nbd(ENOTSUP, true) == NBD_ENOTSUP);
  CHECK(errno_to_nbd(ENOTSUP, false) == NBD_EINVAL);
  CHECK(errno_to_nbd(ESHUTDOWN) == NBD_ESHUTDOWN);
  CHECK(errno_to_nbd(EOVERFLOW) == NBD_EOVERFLOW);
  CHECK(errno_to_nbd(EBADF) == NBD_EINVAL);
}
