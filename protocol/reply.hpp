// Transmission-phase reply encoders (proto.md "Simple reply message",
// "Structured reply chunk message", "Structured reply types"; extended chunks
// from its extension-ext-header branch) and block-status extent accumulation
// (merge of equal neighbours, REQ_ONE and per-chunk caps).
//
// Header encoders write into caller-provided buffers (no allocation) and
// return the number of bytes written; payload data is sent separately
// (scatter/gather), so a READ's data never gets copied.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "protocol/mode.hpp"

namespace qnbd::protocol {

// Largest header any chunk encoder below produces (extended header + the
// fixed part of OFFSET_DATA / OFFSET_HOLE / BLOCK_STATUS_EXT payloads).
inline constexpr std::size_t kMaxChunkPrefix = 32 + 16;
using ChunkPrefix = std::array<std::byte, kMaxChunkPrefix>;

// proto.md "Simple reply message": 16 bytes.
std::size_t encode_simple_reply(std::span<std::byte> out, std::uint32_t error, std::uint64_t cookie);

// proto.md "Structured reply chunk message" / "Extended reply chunk message"
// (extension-ext-header branch): 20 or 32 bytes. `offset` is the request's
// offset (only on the wire in extended mode).
std::size_t encode_chunk_header(std::span<std::byte> out, ReplyMode mode, std::uint16_t flags, std::uint16_t type,
                                std::uint64_t cookie, std::uint64_t offset, std::uint64_t payload_length);

// NBD_REPLY_TYPE_OFFSET_DATA header plus its 8-byte offset; `data_length`
// bytes of data must follow. data_length <= 2^32 - 9 in structured mode.
std::size_t encode_offset_data(std::span<std::byte> out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                               std::uint64_t request_offset, std::uint64_t data_offset, std::uint64_t data_length);

// NBD_REPLY_TYPE_OFFSET_HOLE, complete (hole_length is 32-bit on the wire).
std::size_t encode_offset_hole(std::span<std::byte> out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                               std::uint64_t request_offset, std::uint64_t hole_offset, std::uint32_t hole_length);

// NBD_REPLY_TYPE_NONE with DONE.
std::size_t encode_none(std::span<std::byte> out, ReplyMode mode, std::uint64_t cookie, std::uint64_t request_offset);

// NBD_REPLY_TYPE_ERROR (or ERROR_OFFSET when error_offset is given), appended
// to `out`. The message is cut at 4096 bytes.
void append_error_chunk(std::vector<std::byte>& out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                        std::uint64_t request_offset, std::uint32_t error, std::string_view message,
                        const std::uint64_t* error_offset = nullptr);

struct StatusExtent {
  std::uint64_t length = 0;
  std::uint32_t flags = 0;
};

// Accumulates consecutive extents for one context: equal neighbours merge,
// zero lengths are dropped, each extent stays within max_extent_length, and
// at most `capacity` extents are kept (1 for REQ_ONE).
class ExtentList {
 public:
  ExtentList() = default;
  ExtentList(std::size_t capacity, std::uint64_t max_extent_length) { reset(capacity, max_extent_length); }
  void reset(std::size_t capacity, std::uint64_t max_extent_length);
  // False once full: the added range was (partly) not recorded.
  bool add(std::uint64_t length, std::uint32_t flags);
  bool full() const { return extents_.size() >= capacity_ && !extents_.empty() && last_full(); }
  std::span<const StatusExtent> extents() const { return extents_; }
  std::uint64_t total() const { return total_; }

 private:
  bool last_full() const { return extents_.back().length >= max_len_; }
  std::vector<StatusExtent> extents_;
  std::size_t capacity_ = 1;
  std::uint64_t max_len_ = 0;
  std::uint64_t total_ = 0;
};

// Largest extent length for the mode: compact descriptors are 32-bit; keep
// them 512-aligned (a SHOULD of proto.md "NBD_CMD_BLOCK_STATUS").
inline std::uint64_t max_extent_length(ReplyMode mode) {
  return mode == ReplyMode::extended ? (UINT64_C(1) << 62) : UINT64_C(0xFFFFFE00);
}

// One NBD_REPLY_TYPE_BLOCK_STATUS (compact) or _EXT (extended) chunk,
// appended to `out`. extents must be non-empty.
void append_block_status_chunk(std::vector<std::byte>& out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                               std::uint64_t request_offset, std::uint32_t context_id,
                               std::span<const StatusExtent> extents);

}  // namespace qnbd::protocol
