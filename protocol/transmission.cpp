#include "protocol/transmission.hpp"

#include <algorithm>
#include <cerrno>
#include <string>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "protocol/constants.hpp"

namespace qnbd::protocol {

// validate_request answers in NBD_E* values; decode's errors are errnos
// that errno_to_nbd maps back to the same values (NBD proto.md "Error
// values" took them from Linux).
static_assert(NBD_EPERM == EPERM && NBD_EIO == EIO && NBD_ENOMEM == ENOMEM && NBD_EINVAL == EINVAL &&
              NBD_ENOSPC == ENOSPC && NBD_EOVERFLOW == EOVERFLOW && NBD_ENOTSUP == ENOTSUP &&
              NBD_ESHUTDOWN == ESHUTDOWN);

namespace {

Error refuse(std::uint32_t nbd_error, std::string_view message) {
  return Error{static_cast<int>(nbd_error), std::string(message)};
}

}  // namespace

Result<Command> decode(const Request& r, std::span<const std::byte> payload, const ValidationContext& ctx,
                       std::span<const ContextSlot> contexts) {
  if (auto v = validate_request(r, ctx); v.error) return refuse(v.error, v.message);
  Command c;
  c.type = r.type;
  c.flags = r.flags;
  c.cookie = r.cookie;
  c.offset = r.offset;
  c.length = r.length;
  if (r.type != NBD_CMD_BLOCK_STATUS) return c;
  const std::size_t nctx = std::min(contexts.size(), kMaxContexts);
  if (r.flags & NBD_CMD_FLAG_PAYLOAD_LEN) {
    // NBD proto.md "NBD_CMD_BLOCK_STATUS", payload form: a 64-bit effect
    // length, then one or more 32-bit context ids, each selected during
    // negotiation and named once.
    const std::uint64_t plen = std::min<std::uint64_t>(r.payload_length, payload.size());
    if (plen < 8 || (plen - 8) % 4 != 0 || (plen - 8) / 4 == 0 || (plen - 8) / 4 > nctx)
      return refuse(NBD_EINVAL, "malformed block status payload");
    const std::byte* p = payload.data();
    c.length = load_be64(p);
    for (std::uint64_t i = 0; i < (plen - 8) / 4; ++i) {
      const auto id = load_be32(p + 8 + 4 * i);
      std::size_t k = 0;
      while (k < nctx && contexts[k].id != id) ++k;
      if (k == nctx || ((c.context_mask >> k) & 1)) return refuse(NBD_EINVAL, "unknown or duplicate context id");
      c.context_mask |= std::uint64_t{1} << k;
    }
    if (!range_within(r.offset, c.length, ctx.export_size)) return refuse(NBD_EINVAL, "request beyond end of export");
  } else {
    c.context_mask = nctx == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << nctx) - 1;
  }
  if (c.length == 0) return refuse(NBD_EINVAL, "zero-length block status");
  return c;
}

void append_error_reply(std::vector<std::byte>& out, ReplyMode mode, const Request& r, const Error& err) {
  const auto code = errno_to_nbd(err.code, r.flags & NBD_CMD_FLAG_FAST_ZERO);
  if (mode == ReplyMode::simple) {
    const auto base = out.size();
    out.resize(base + kSimpleReplySize);
    encode_simple_reply(std::span(out).subspan(base), code, r.cookie);
    return;
  }
  append_error_chunk(out, mode, NBD_REPLY_FLAG_DONE, r.cookie, r.offset, code, err.message);
}

std::size_t encode_ok_reply(std::span<std::byte> out, ReplyMode mode, std::uint64_t cookie, std::uint64_t offset) {
  if (mode == ReplyMode::extended) return encode_none(out, mode, cookie, offset);
  return encode_simple_reply(out, 0, cookie);
}

void ReadPlan::reset(const Command& cmd, ReplyMode mode) {
  mode_ = mode;
  cookie_ = cmd.cookie;
  offset_ = cmd.offset;
  length_ = cmd.length;
  pos_ = 0;
  n_parts_ = 0;
  // NBD proto.md "NBD_CMD_READ": holes may be sent as OFFSET_HOLE only in
  // structured replies, and never when the client asked for DF.
  sparse_ = mode != ReplyMode::simple && !cmd.df() && cmd.length > 0;
}

bool ReadPlan::add(std::uint64_t length, bool zero) {
  if (!sparse_ || pos_ >= length_ || length == 0) return false;
  const auto len = std::min(length, length_ - pos_);
  if (n_parts_ && parts_[n_parts_ - 1].hole == zero) {
    parts_[n_parts_ - 1].length += len;
  } else {
    // Keep one part free for what finish() adds.
    if (n_parts_ >= kMaxExtents) return false;
    parts_[n_parts_++] = {pos_, len, zero};
  }
  pos_ += len;
  return pos_ < length_;
}

void ReadPlan::finish() {
  if (pos_ >= length_) return;
  if (n_parts_ && !parts_[n_parts_ - 1].hole)
    parts_[n_parts_ - 1].length += length_ - pos_;
  else
    parts_[n_parts_++] = {pos_, length_ - pos_, false};
  pos_ = length_;
}

std::size_t ReadPlan::encode_chunk(std::size_t i, std::span<std::byte> out) const {
  if (n_parts_ == 0) {
    // Zero-length read: nothing but the completion (the spec leaves the
    // form open; structured clients get NONE).
    if (mode_ == ReplyMode::simple) return encode_simple_reply(out, 0, cookie_);
    return encode_none(out, mode_, cookie_, offset_);
  }
  if (mode_ == ReplyMode::simple) return encode_simple_reply(out, 0, cookie_);
  const auto& p = parts_[i];
  const std::uint16_t flags = i + 1 == n_parts_ ? NBD_REPLY_FLAG_DONE : 0;
  if (p.hole)
    return encode_offset_hole(out, mode_, flags, cookie_, offset_, offset_ + p.offset,
                              static_cast<std::uint32_t>(p.length));
  return encode_offset_data(out, mode_, flags, cookie_, offset_, offset_ + p.offset, p.length);
}

void BlockStatusPlan::reset(const Command& cmd, ReplyMode mode, std::span<const ContextSlot> contexts) {
  contexts_ = contexts.first(std::min(contexts.size(), kMaxContexts));
  mode_ = mode;
  cookie_ = cmd.cookie;
  offset_ = cmd.offset;
  length_ = cmd.length;
  mask_ = cmd.context_mask;
  stopped_ = 0;
  alloc_pos_ = 0;
  alloc_active_ = false;
  if (lists_.size() < contexts_.size()) lists_.resize(contexts_.size());
  for (std::size_t k = 0; k < contexts_.size(); ++k) {
    // REQ_ONE: one extent per context, as long as equal neighbours make it
    // (what qemu-nbd answers).
    lists_[k].reset(cmd.req_one() ? 1 : kMaxExtentsPerChunk, max_extent_length(mode));
    if (reported(k) && contexts_[k].kind != ContextKind::dirty_bitmap) alloc_active_ = true;
  }
}

bool BlockStatusPlan::add_allocation(std::uint64_t length, bool allocated, bool zero, std::uint32_t depth) {
  if (!allocation_open()) return false;
  const auto len = std::min(length, length_ - alloc_pos_);
  if (len == 0) return false;
  alloc_active_ = false;
  for (std::size_t k = 0; k < contexts_.size(); ++k) {
    if (!reported(k) || ((stopped_ >> k) & 1)) continue;
    std::uint32_t flags = 0;
    switch (contexts_[k].kind) {
      // NBD proto.md "base:allocation metadata context".
      case ContextKind::base_allocation: flags = (allocated ? 0 : NBD_STATE_HOLE) | (zero ? NBD_STATE_ZERO : 0); break;
      // qemu:allocation-depth: the layer that supplies the data, 0 = none.
      case ContextKind::allocation_depth: flags = depth; break;
      case ContextKind::dirty_bitmap: continue;  // walked by add_bitmap
    }
    if (!lists_[k].add(len, flags))
      stopped_ |= std::uint64_t{1} << k;
    else
      alloc_active_ = true;
  }
  alloc_pos_ += len;
  return allocation_open();
}

bool BlockStatusPlan::bitmap_open(std::size_t k) const {
  return k < contexts_.size() && reported(k) && contexts_[k].kind == ContextKind::dirty_bitmap &&
         !((stopped_ >> k) & 1) && lists_[k].total() < length_;
}

bool BlockStatusPlan::add_bitmap(std::size_t k, std::uint64_t length, bool dirty) {
  if (!bitmap_open(k)) return false;
  const auto len = std::min(length, length_ - lists_[k].total());
  if (len == 0) return false;
  // qemu:dirty-bitmap:NAME: NBD_STATE_DIRTY where the bitmap has bits set.
  if (!lists_[k].add(len, dirty ? NBD_STATE_DIRTY : 0)) {
    stopped_ |= std::uint64_t{1} << k;
    return false;
  }
  return bitmap_open(k);
}

Result<void> BlockStatusPlan::append_chunks(std::vector<std::byte>& out) const {
  std::size_t last = contexts_.size();
  for (std::size_t k = 0; k < contexts_.size(); ++k)
    if (reported(k) && !lists_[k].extents().empty()) last = k;
  if (last == contexts_.size()) return make_error(EIO, "no block status available");
  for (std::size_t k = 0; k <= last; ++k) {
    if (!reported(k) || lists_[k].extents().empty()) continue;
    append_block_status_chunk(out, mode_, k == last ? NBD_REPLY_FLAG_DONE : 0, cookie_, offset_, contexts_[k].id,
                              lists_[k].extents());
  }
  return {};
}

}  // namespace qnbd::protocol
