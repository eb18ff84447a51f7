// The transmission phase as pure code (NBD proto.md section "Transmission
// phase"): decode() turns a parsed request header and its payload into a
// validated Command (every range, flag and payload check, the
// BLOCK_STATUS payload form included), ReadPlan and BlockStatusPlan turn
// what the device answered into reply chunks, and append_error_reply is the
// one way a failure (a refused request or a device errno) becomes a reply.
// The server only does I/O around them.
//
// No allocation on the success path: plans hold fixed arrays or reuse
// their vectors across requests, headers go into caller-provided buffers.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/result.hpp"
#include "protocol/constants.hpp"
#include "protocol/meta_context.hpp"
#include "protocol/mode.hpp"
#include "protocol/reply.hpp"
#include "protocol/request.hpp"

namespace qnbd::protocol {

// A connection selects at most base:allocation, qemu:allocation-depth and
// one context per exported bitmap; BLOCK_STATUS keeps fixed-size state of
// this many contexts (the server refuses exports with more bitmaps).
inline constexpr std::size_t kMaxContexts = 64;

// One selected metadata context as the wire sees it: what it reports and
// the id it was given in NBD_REP_META_CONTEXT.
struct ContextSlot {
  ContextKind kind = ContextKind::base_allocation;
  std::uint32_t id = 0;
};

// A request that passed every check: the server may execute it as is.
struct Command {
  std::uint16_t type = 0;
  std::uint16_t flags = 0;
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  // Effect length: for the BLOCK_STATUS payload form, the payload's.
  std::uint64_t length = 0;
  // BLOCK_STATUS: bit k set = report contexts[k] (all without a payload,
  // the payload's id list with one, NBD proto.md "NBD_CMD_BLOCK_STATUS").
  std::uint64_t context_mask = 0;

  bool fua() const { return flags & NBD_CMD_FLAG_FUA; }
  bool df() const { return flags & NBD_CMD_FLAG_DF; }
  bool req_one() const { return flags & NBD_CMD_FLAG_REQ_ONE; }
  bool fast_zero() const { return flags & NBD_CMD_FLAG_FAST_ZERO; }
  bool no_hole() const { return flags & NBD_CMD_FLAG_NO_HOLE; }
};

// Decide whether `header` (parse_request_header's output) with its
// `payload` (payload_length bytes, already consumed from the wire) may run.
// `contexts` is the connection's selection, at most kMaxContexts. The
// error's code is an errno equal to the NBD_E* value to send (EINVAL,
// EPERM, ENOSPC, EOVERFLOW); its message goes into the error chunk.
Result<Command> decode(const Request& header, std::span<const std::byte> payload, const ValidationContext& ctx,
                       std::span<const ContextSlot> contexts);

// The reply to a request that failed, appended to `out`: a simple reply
// carrying the error, or one NBD_REPLY_TYPE_ERROR chunk (DONE) with the
// message. `err.code` is an errno (from decode or the device), mapped by
// errno_to_nbd (ENOTSUP only for a FAST_ZERO request, NBD proto.md "Error
// values").
void append_error_reply(std::vector<std::byte>& out, ReplyMode mode, const Request& header, const Error& err);

// The reply to a request that succeeded without data: a simple reply, or
// NBD_REPLY_TYPE_NONE with DONE in extended mode. `out` holds at least
// kMaxChunkPrefix bytes; returns the bytes written.
std::size_t encode_ok_reply(std::span<std::byte> out, ReplyMode mode, std::uint64_t cookie, std::uint64_t offset);

// One piece of a READ reply: `length` bytes at `offset` from the start of
// the request, sent as data or as an OFFSET_HOLE chunk.
struct ReadPart {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  bool hole = false;
};

// The chunks of a READ reply (NBD proto.md "NBD_CMD_READ"). With structured
// or extended replies and no DF, ranges the device reports as reading zero
// go out as OFFSET_HOLE chunks (no disk read, no bandwidth); everything else
// is one data reply. Use: reset(); if sparse(), add() the device's extents
// for the range in order; finish(); read the data parts; encode each chunk.
class ReadPlan {
 public:
  // Distinct device extents used; what follows them is sent as data.
  static constexpr std::size_t kMaxExtents = 64;

  void reset(const Command& cmd, ReplyMode mode);
  bool sparse() const { return sparse_; }
  // One device extent, in order from the request's offset. False once no
  // more are wanted (the request is covered or the plan is full).
  bool add(std::uint64_t length, bool zero);
  // The rest of the request, not covered by add(), is data.
  void finish();

  std::span<const ReadPart> parts() const { return {parts_.data(), n_parts_}; }
  // Chunks to send: one per part, or one (a completion) for a zero-length read.
  std::size_t chunk_count() const { return n_parts_ ? n_parts_ : 1; }
  // Header of chunk i into `out` (kMaxChunkPrefix bytes); returns its size.
  // A data part's bytes must follow it on the wire; the last chunk is DONE.
  std::size_t encode_chunk(std::size_t i, std::span<std::byte> out) const;

 private:
  std::array<ReadPart, kMaxExtents + 1> parts_{};
  std::size_t n_parts_ = 0;
  std::uint64_t pos_ = 0;
  std::uint64_t cookie_ = 0, offset_ = 0, length_ = 0;
  ReplyMode mode_ = ReplyMode::simple;
  bool sparse_ = false;
};

// The chunks of a BLOCK_STATUS reply (NBD proto.md "NBD_CMD_BLOCK_STATUS",
// "Metadata querying"): one extent list per reported context, the device's
// answer mapped to each context's NBD_STATE_* flags, equal neighbours
// merged, one extent with REQ_ONE, per-chunk and per-extent caps of the
// mode, and each chunk tagged with its context id. Reuse one plan per slot:
// its lists keep their capacity.
class BlockStatusPlan {
 public:
  void reset(const Command& cmd, ReplyMode mode, std::span<const ContextSlot> contexts);

  // The base:allocation / qemu:allocation-depth walk: while open, ask the
  // device from offset + allocation_pos() and add() each extent in order.
  bool allocation_open() const { return alloc_active_ && alloc_pos_ < length_; }
  std::uint64_t allocation_pos() const { return alloc_pos_; }
  // False once no more extents are wanted (every such context is full, the
  // request is covered, or the extent is empty).
  bool add_allocation(std::uint64_t length, bool allocated, bool zero, std::uint32_t depth);

  // The qemu:dirty-bitmap walk of context k (kind dirty_bitmap, reported).
  bool bitmap_open(std::size_t k) const;
  std::uint64_t bitmap_pos(std::size_t k) const { return lists_[k].total(); }
  bool add_bitmap(std::size_t k, std::uint64_t length, bool dirty);

  // Append one chunk per reported context that has extents, the last DONE.
  // Fails (EIO) when no context got any.
  Result<void> append_chunks(std::vector<std::byte>& out) const;

  std::size_t context_count() const { return contexts_.size(); }
  bool reported(std::size_t k) const { return (mask_ >> k) & 1; }
  std::span<const StatusExtent> extents(std::size_t k) const { return lists_[k].extents(); }

 private:
  std::span<const ContextSlot> contexts_;
  std::vector<ExtentList> lists_;
  std::uint64_t mask_ = 0;     // reported contexts
  std::uint64_t stopped_ = 0;  // contexts whose list is full
  std::uint64_t cookie_ = 0, offset_ = 0, length_ = 0;
  std::uint64_t alloc_pos_ = 0;
  bool alloc_active_ = false;
  ReplyMode mode_ = ReplyMode::simple;
};

}  // namespace qnbd::protocol
