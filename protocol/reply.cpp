#include "protocol/reply.hpp"

#include <algorithm>

#include "common/endian.hpp"
#include "protocol/constants.hpp"

namespace qnbd::protocol {

std::size_t encode_simple_reply(std::span<std::byte> out, std::uint32_t error, std::uint64_t cookie) {
  store_be32(out.data(), NBD_SIMPLE_REPLY_MAGIC);
  store_be32(out.data() + 4, error);
  store_be64(out.data() + 8, cookie);
  return kSimpleReplySize;
}

std::size_t encode_chunk_header(std::span<std::byte> out, ReplyMode mode, std::uint16_t flags, std::uint16_t type,
                                std::uint64_t cookie, std::uint64_t offset, std::uint64_t payload_length) {
  auto* p = out.data();
  if (mode == ReplyMode::extended) {
    store_be32(p, NBD_EXTENDED_REPLY_MAGIC);
    store_be16(p + 4, flags);
    store_be16(p + 6, type);
    store_be64(p + 8, cookie);
    store_be64(p + 16, offset);
    store_be64(p + 24, payload_length);
    return kExtendedChunkHeaderSize;
  }
  store_be32(p, NBD_STRUCTURED_REPLY_MAGIC);
  store_be16(p + 4, flags);
  store_be16(p + 6, type);
  store_be64(p + 8, cookie);
  store_be32(p + 16, static_cast<std::uint32_t>(payload_length));
  return kStructuredChunkHeaderSize;
}

std::size_t encode_offset_data(std::span<std::byte> out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                               std::uint64_t request_offset, std::uint64_t data_offset, std::uint64_t data_length) {
  auto n = encode_chunk_header(out, mode, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, request_offset, 8 + data_length);
  store_be64(out.data() + n, data_offset);
  return n + 8;
}

std::size_t encode_offset_hole(std::span<std::byte> out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                               std::uint64_t request_offset, std::uint64_t hole_offset, std::uint32_t hole_length) {
  auto n = encode_chunk_header(out, mode, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, request_offset, 12);
  store_be64(out.data() + n, hole_offset);
  store_be32(out.data() + n + 8, hole_length);
  return n + 12;
}

std::size_t encode_none(std::span<std::byte> out, ReplyMode mode, std::uint64_t cookie, std::uint64_t request_offset) {
  return encode_chunk_header(out, mode, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, request_offset, 0);
}

void append_error_chunk(std::vector<std::byte>& out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                        std::uint64_t request_offset, std::uint32_t error, std::string_view message,
                        const std::uint64_t* error_offset) {
  message = message.substr(0, std::min(message.size(), kMaxString));
  const std::uint64_t payload = 6 + message.size() + (error_offset ? 8 : 0);
  auto base = out.size();
  out.resize(base + kMaxChunkPrefix + payload);
  auto n = encode_chunk_header(std::span(out).subspan(base), mode, flags,
                               error_offset ? NBD_REPLY_TYPE_ERROR_OFFSET : NBD_REPLY_TYPE_ERROR, cookie,
                               request_offset, payload);
  auto* p = out.data() + base + n;
  store_be32(p, error);
  store_be16(p + 4, static_cast<std::uint16_t>(message.size()));
  std::copy_n(reinterpret_cast<const std::byte*>(message.data()), message.size(), p + 6);
  if (error_offset) store_be64(p + 6 + message.size(), *error_offset);
  out.resize(base + n + payload);
}

void ExtentList::reset(std::size_t capacity, std::uint64_t max_extent_length) {
  extents_.clear();
  capacity_ = std::max<std::size_t>(capacity, 1);
  max_len_ = max_extent_length;
  total_ = 0;
}

bool ExtentList::add(std::uint64_t length, std::uint32_t flags) {
  while (length > 0) {
    if (!extents_.empty() && extents_.back().flags == flags && extents_.back().length < max_len_) {
      auto take = std::min(length, max_len_ - extents_.back().length);
      extents_.back().length += take;
      total_ += take;
      length -= take;
      continue;
    }
    if (extents_.size() >= capacity_) return false;
    auto take = std::min(length, max_len_);
    extents_.push_back({take, flags});
    total_ += take;
    length -= take;
  }
  return true;
}

void append_block_status_chunk(std::vector<std::byte>& out, ReplyMode mode, std::uint16_t flags, std::uint64_t cookie,
                               std::uint64_t request_offset, std::uint32_t context_id,
                               std::span<const StatusExtent> extents) {
  const bool ext = mode == ReplyMode::extended;
  const std::uint64_t payload = ext ? 8 + 16 * extents.size() : 4 + 8 * extents.size();
  auto base = out.size();
  out.resize(base + kMaxChunkPrefix + payload);
  auto n = encode_chunk_header(std::span(out).subspan(base), mode, flags,
                               ext ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT : NBD_REPLY_TYPE_BLOCK_STATUS, cookie,
                               request_offset, payload);
  auto* p = out.data() + base + n;
  store_be32(p, context_id);
  if (ext) {
    store_be32(p + 4, static_cast<std::uint32_t>(extents.size()));
    p += 8;
    for (const auto& e : extents) {
      store_be64(p, e.length);
      store_be64(p + 8, e.flags);
      p += 16;
    }
  } else {
    p += 4;
    for (const auto& e : extents) {
      store_be32(p, static_cast<std::uint32_t>(e.length));
      store_be32(p + 4, e.flags);
      p += 8;
    }
  }
  out.resize(base + n + payload);
}

}  // namespace qnbd::protocol
