// Fuzz entry for the transmission phase of protocol/ without a handshake:
// the input picks the connection facts (export size, transmission flags,
// reply mode, block-size commitment, limits, the selected metadata
// contexts), then a stream of request headers, each followed by its
// payload, that go through parse_request_header and decode(); a decoded
// READ drives ReadPlan and a decoded BLOCK_STATUS drives BlockStatusPlan
// with fuzzed device extents, a refusal goes through append_error_reply;
// then every reply encoder and extent lists from fuzzed (length, flags).
//
// Properties checked (each can fail):
// - decode accepts only what validate_request accepts; a decoded
//   BLOCK_STATUS has a non-zero length inside the export and reports only
//   selected contexts (the payload form included);
// - ReadPlan's parts cover the request exactly, in order, holes and data
//   alternating, at most kMaxExtents + 1, the last chunk DONE;
// - BlockStatusPlan reports only the contexts asked for, REQ_ONE gives one
//   extent, no list covers more than the request, the chunks are the sizes
//   the spec gives;
// - a request validate_request accepts has its range inside the export,
//   aligned when the client committed to block sizes, flags allowed;
// - encoders write exactly the sizes NBD proto.md section "Structured
//   reply chunk message" / "Extended reply chunk message" give, with the
//   right magic;
// - ExtentList keeps at most its capacity, every extent non-empty and within
//   the mode's maximum, neighbours merged, and total() = sum of lengths.
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/endian.hpp"
#include "fuzz_input.hpp"
#include "protocol/constants.hpp"
#include "protocol/reply.hpp"
#include "protocol/request.hpp"
#include "protocol/transmission.hpp"

using namespace qnbd;
using namespace qnbd::protocol;
using qnbd::fuzz::Reader;

namespace {

void check_extents(const ExtentList& l, std::size_t capacity, std::uint64_t max_len) {
  auto e = l.extents();
  QNBD_FUZZ_CHECK(e.size() <= std::max<std::size_t>(capacity, 1));
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < e.size(); ++i) {
    QNBD_FUZZ_CHECK(e[i].length > 0 && e[i].length <= max_len);
    // Equal neighbours merge unless the earlier one is already full.
    if (i) QNBD_FUZZ_CHECK(e[i - 1].flags != e[i].flags || e[i - 1].length == max_len);
    sum += e[i].length;
  }
  QNBD_FUZZ_CHECK(sum == l.total());
}

void encode_replies(Reader& in, const Request& q, ReplyMode mode, std::vector<std::byte>& out) {
  const bool ext = mode == ReplyMode::extended;
  const std::size_t chunk_header = ext ? 32 : 20;
  ChunkPrefix buf{};
  const std::uint16_t flags = in.u8() & 1 ? NBD_REPLY_FLAG_DONE : 0;
  if (mode == ReplyMode::simple) {
    QNBD_FUZZ_CHECK(encode_simple_reply(buf, in.u32(), q.cookie) == 16);
    QNBD_FUZZ_CHECK(load_be32(buf.data()) == NBD_SIMPLE_REPLY_MAGIC);
    QNBD_FUZZ_CHECK(load_be64(buf.data() + 8) == q.cookie);
    return;
  }
  const std::uint32_t magic = ext ? NBD_EXTENDED_REPLY_MAGIC : NBD_STRUCTURED_REPLY_MAGIC;
  switch (q.type) {
    case NBD_CMD_READ: {
      // A READ answered as data then a hole then NONE, as the server may.
      const std::uint64_t data_len = std::min<std::uint64_t>(q.length, ext ? q.length : 0xFFFFFFF7u);
      QNBD_FUZZ_CHECK(encode_offset_data(buf, mode, flags, q.cookie, q.offset, q.offset, data_len) == chunk_header + 8);
      QNBD_FUZZ_CHECK(load_be32(buf.data()) == magic);
      QNBD_FUZZ_CHECK(encode_offset_hole(buf, mode, flags, q.cookie, q.offset, q.offset,
                                         static_cast<std::uint32_t>(q.length)) == chunk_header + 12);
      QNBD_FUZZ_CHECK(encode_none(buf, mode, q.cookie, q.offset) == chunk_header);
      QNBD_FUZZ_CHECK(load_be16(buf.data() + 4) == NBD_REPLY_FLAG_DONE);
      break;
    }
    case NBD_CMD_BLOCK_STATUS: {
      const std::size_t capacity = (q.flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : 1 + in.u8() % 32;
      const std::uint64_t max_len = max_extent_length(mode);
      ExtentList l(capacity, max_len);
      // The server adds extents of one request, whose length is below 2^63
      // (an export size): keep the sum there so total() cannot wrap.
      std::uint64_t budget = std::uint64_t{1} << 63;
      for (unsigned n = in.u8() % 64; n > 0 && !in.empty(); --n) {
        // Lengths from tiny to past the mode's maximum, so splitting runs too.
        const unsigned shift = in.u8() % 64;
        std::uint64_t len = shift >= 63 ? in.u64() : (in.u64() & ((std::uint64_t{2} << shift) - 1));
        len = std::min(len, budget);
        budget -= len;
        const std::uint64_t before = l.total();
        const bool added = l.add(len, in.u8() % 4);
        QNBD_FUZZ_CHECK(l.total() >= before && l.total() - before <= len);
        if (added) QNBD_FUZZ_CHECK(l.total() - before == len);
        check_extents(l, capacity, max_len);
        if (!added) break;
      }
      if (!l.extents().empty()) {
        const auto base = out.size();
        append_block_status_chunk(out, mode, flags, q.cookie, q.offset, in.u32(), l.extents());
        const std::size_t payload = ext ? 8 + 16 * l.extents().size() : 4 + 8 * l.extents().size();
        QNBD_FUZZ_CHECK(out.size() - base == chunk_header + payload);
        QNBD_FUZZ_CHECK(load_be32(out.data() + base) == magic);
      }
      break;
    }
    default: {
      const std::uint64_t err_off = q.offset;
      const auto base = out.size();
      const int err = static_cast<int>(in.u8());
      const std::uint32_t code = errno_to_nbd(err, q.flags & NBD_CMD_FLAG_FAST_ZERO);
      QNBD_FUZZ_CHECK(code != NBD_ENOTSUP || (q.flags & NBD_CMD_FLAG_FAST_ZERO));
      const char* name = command_name(q.type);
      append_error_chunk(out, mode, flags, q.cookie, q.offset, code, name, in.u8() & 1 ? &err_off : nullptr);
      QNBD_FUZZ_CHECK(out.size() - base >= chunk_header + 6);
      QNBD_FUZZ_CHECK(load_be32(out.data() + base) == magic);
      break;
    }
  }
}

// A decoded READ answered from fuzzed device extents.
void drive_read_plan(Reader& in, const Command& c, ReplyMode mode) {
  ReadPlan plan;
  plan.reset(c, mode);
  QNBD_FUZZ_CHECK(plan.sparse() == (mode != ReplyMode::simple && !c.df() && c.length > 0));
  for (unsigned n = in.u8() % 80; n > 0 && !in.empty(); --n) {
    const std::uint64_t len = in.u8() & 1 ? in.u64() : in.u16();
    if (!plan.add(len, in.u8() & 1)) break;
  }
  plan.finish();
  const auto parts = plan.parts();
  QNBD_FUZZ_CHECK(parts.size() <= ReadPlan::kMaxExtents + 1);
  QNBD_FUZZ_CHECK(plan.chunk_count() == std::max<std::size_t>(parts.size(), 1));
  std::uint64_t pos = 0;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    QNBD_FUZZ_CHECK(parts[i].offset == pos && parts[i].length > 0);
    if (i) QNBD_FUZZ_CHECK(parts[i].hole != parts[i - 1].hole);
    if (!plan.sparse()) QNBD_FUZZ_CHECK(!parts[i].hole);
    pos += parts[i].length;
  }
  QNBD_FUZZ_CHECK(pos == c.length);
  const std::size_t header = mode == ReplyMode::extended ? 32 : 20;
  ChunkPrefix buf{};
  for (std::size_t i = 0; i < plan.chunk_count(); ++i) {
    const auto n = plan.encode_chunk(i, buf);
    if (mode == ReplyMode::simple) {
      QNBD_FUZZ_CHECK(n == kSimpleReplySize && load_be32(buf.data()) == NBD_SIMPLE_REPLY_MAGIC);
      continue;
    }
    const bool last = i + 1 == plan.chunk_count();
    QNBD_FUZZ_CHECK(load_be16(buf.data() + 4) == (last ? NBD_REPLY_FLAG_DONE : 0));
    const auto type = load_be16(buf.data() + 6);
    if (parts.empty())
      QNBD_FUZZ_CHECK(type == NBD_REPLY_TYPE_NONE && n == header);
    else if (parts[i].hole)
      QNBD_FUZZ_CHECK(type == NBD_REPLY_TYPE_OFFSET_HOLE && n == header + 12);
    else
      QNBD_FUZZ_CHECK(type == NBD_REPLY_TYPE_OFFSET_DATA && n == header + 8);
  }
}

// A decoded BLOCK_STATUS answered from fuzzed device and bitmap extents.
void drive_status_plan(Reader& in, const Command& c, ReplyMode mode, std::span<const ContextSlot> ctxs,
                       BlockStatusPlan& plan, std::vector<std::byte>& out) {
  plan.reset(c, mode, ctxs);
  for (unsigned n = in.u8() % 64; n > 0 && plan.allocation_open() && !in.empty(); --n) {
    const auto before = plan.allocation_pos();
    const std::uint64_t len = in.u8() & 1 ? in.u64() : in.u16();
    const std::uint8_t b = in.u8();
    const bool more = plan.add_allocation(len, b & 1, b & 2, b >> 2);
    QNBD_FUZZ_CHECK(plan.allocation_pos() >= before && plan.allocation_pos() <= c.length);
    if (!more) break;
  }
  for (std::size_t k = 0; k < ctxs.size(); ++k) {
    if (ctxs[k].kind != ContextKind::dirty_bitmap) QNBD_FUZZ_CHECK(!plan.bitmap_open(k));
    for (unsigned n = in.u8() % 16; n > 0 && plan.bitmap_open(k) && !in.empty(); --n) {
      const std::uint64_t len = in.u8() & 1 ? in.u64() : in.u16();
      if (!plan.add_bitmap(k, len, in.u8() & 1)) break;
    }
  }
  const bool ext = mode == ReplyMode::extended;
  std::size_t expect = 0;
  for (std::size_t k = 0; k < ctxs.size(); ++k) {
    const auto e = plan.extents(k);
    if (!((c.context_mask >> k) & 1)) QNBD_FUZZ_CHECK(e.empty());
    if (c.req_one()) QNBD_FUZZ_CHECK(e.size() <= 1);
    std::uint64_t sum = 0;
    for (const auto& x : e) {
      QNBD_FUZZ_CHECK(x.length > 0 && x.length <= max_extent_length(mode));
      if (ctxs[k].kind == ContextKind::base_allocation) QNBD_FUZZ_CHECK(x.flags <= 3);
      if (ctxs[k].kind == ContextKind::dirty_bitmap) QNBD_FUZZ_CHECK(x.flags <= NBD_STATE_DIRTY);
      sum += x.length;
    }
    QNBD_FUZZ_CHECK(sum <= c.length);
    if (!e.empty()) expect += (ext ? 32 + 8 + 16 * e.size() : 20 + 4 + 8 * e.size());
  }
  out.clear();
  auto done = plan.append_chunks(out);
  QNBD_FUZZ_CHECK(done.has_value() == (expect > 0));
  QNBD_FUZZ_CHECK(out.size() == expect);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in({data, size});
  ValidationContext v;
  // Sizes near the interesting edges: small, 2^32 and 2^63 and above.
  const unsigned size_kind = in.u8();
  v.export_size = size_kind & 0x80 ? in.u64() : in.u32();
  v.transmission_flags = in.u16();
  v.mode = static_cast<ReplyMode>(in.u8() % 3);
  const std::uint8_t bits = in.u8();
  v.has_contexts = bits & 1;
  v.block_size_committed = bits & 2;
  v.min_block = 1u << (in.u8() % 13);
  v.max_payload = std::max<std::uint32_t>(in.u32() % (64u << 20), 512);
  // Selected contexts, in the fixed order match_meta_contexts gives:
  // base:allocation, qemu:allocation-depth, then bitmaps.
  std::vector<ContextSlot> ctxs;
  if (v.has_contexts) {
    if (bits & 4 || !(bits & 0x78)) ctxs.push_back({ContextKind::base_allocation, kContextIdBaseAllocation});
    if (bits & 8) ctxs.push_back({ContextKind::allocation_depth, kContextIdAllocationDepth});
    for (unsigned i = 0; i < ((bits >> 4) & 7u); ++i)
      ctxs.push_back({ContextKind::dirty_bitmap, kContextIdFirstBitmap + i * 3});
  }
  const auto hsize = request_header_size(v.mode);
  std::vector<std::byte> out;
  BlockStatusPlan plan;
  while (in.left() >= hsize) {
    auto raw = in.take(hsize);
    Request q;
    auto st = parse_request_header(std::as_bytes(raw), v.mode, v.max_payload, q);
    if (st != ParseStatus::ok) continue;
    QNBD_FUZZ_CHECK(q.payload_length <= v.max_payload);
    // The payload follows the header (what the input has of it).
    const auto payload = std::as_bytes(in.take(std::min<std::uint64_t>(q.payload_length, in.left())));
    const auto val = validate_request(q, v);
    if (q.type != NBD_CMD_DISC) {
      const auto cmd = decode(q, payload, v, ctxs);
      if (val.error) QNBD_FUZZ_CHECK(!cmd);
      out.clear();
      if (cmd) {
        QNBD_FUZZ_CHECK(cmd->type == q.type && cmd->flags == q.flags && cmd->cookie == q.cookie);
        if (q.type == NBD_CMD_BLOCK_STATUS) {
          QNBD_FUZZ_CHECK(cmd->length > 0 && cmd->offset <= v.export_size &&
                          cmd->length <= v.export_size - cmd->offset);
          QNBD_FUZZ_CHECK(cmd->context_mask != 0);
          QNBD_FUZZ_CHECK(ctxs.size() >= 64 || (cmd->context_mask >> ctxs.size()) == 0);
          drive_status_plan(in, *cmd, v.mode, ctxs, plan, out);
        } else {
          QNBD_FUZZ_CHECK(cmd->length == q.length);
          if (q.type == NBD_CMD_READ) drive_read_plan(in, *cmd, v.mode);
        }
      } else {
        QNBD_FUZZ_CHECK(!cmd.error().message.empty());
        append_error_reply(out, v.mode, q, cmd.error());
        const std::size_t header = v.mode == ReplyMode::extended ? 32 : 20;
        if (v.mode == ReplyMode::simple)
          QNBD_FUZZ_CHECK(out.size() == kSimpleReplySize);
        else
          QNBD_FUZZ_CHECK(out.size() == header + 6 + cmd.error().message.size());
      }
    }
    if (!val.error && q.type != NBD_CMD_DISC) {
      const bool bs_payload = q.type == NBD_CMD_BLOCK_STATUS && (q.flags & NBD_CMD_FLAG_PAYLOAD_LEN);
      if (q.type != NBD_CMD_FLUSH && !bs_payload) {
        QNBD_FUZZ_CHECK(q.offset <= v.export_size && q.length <= v.export_size - q.offset);
        if (v.block_size_committed) QNBD_FUZZ_CHECK(q.offset % v.min_block == 0 && q.length % v.min_block == 0);
      }
      if (q.flags & NBD_CMD_FLAG_FUA) QNBD_FUZZ_CHECK(v.transmission_flags & NBD_FLAG_SEND_FUA);
      if (q.type == NBD_CMD_WRITE || q.type == NBD_CMD_TRIM || q.type == NBD_CMD_WRITE_ZEROES)
        QNBD_FUZZ_CHECK(!(v.transmission_flags & NBD_FLAG_READ_ONLY));
      if (q.type == NBD_CMD_BLOCK_STATUS) QNBD_FUZZ_CHECK(v.mode != ReplyMode::simple && v.has_contexts);
      if (q.type == NBD_CMD_READ) QNBD_FUZZ_CHECK(q.length <= v.max_payload);
    }
    out.clear();
    if (val.error) {
      QNBD_FUZZ_CHECK(!val.message.empty());
      if (v.mode != ReplyMode::simple)
        append_error_chunk(out, v.mode, NBD_REPLY_FLAG_DONE, q.cookie, q.offset, val.error, val.message);
    } else {
      encode_replies(in, q, v.mode, out);
    }
  }
  return 0;
}
