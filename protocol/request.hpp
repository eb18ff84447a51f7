// Transmission-phase requests (proto.md "Request message"; the 32-byte form
// from its extension-ext-header branch): header parsing, the single
// validate_request that applies every per-request rule once ("Request types",
// "Command flags", "Error values", "Size constraints"), and the one
// errno -> NBD_E* map ("Error values").
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "protocol/mode.hpp"

namespace qnbd::protocol {

struct Request {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;          // effect length (or payload length with PAYLOAD_LEN)
  std::uint64_t payload_length = 0;  // bytes that follow the header on the wire
};

inline std::size_t request_header_size(ReplyMode mode) { return mode == ReplyMode::extended ? 32 : 28; }

enum class ParseStatus : std::uint8_t {
  ok,
  bad_magic,          // framing lost: hard disconnect (proto.md "Terminating the transmission phase")
  payload_too_large,  // payload cannot be consumed sensibly: hard disconnect (proto.md "Size constraints")
};

// Parse one header of the negotiated mode from exactly request_header_size()
// bytes and work out how much payload follows it.
ParseStatus parse_request_header(std::span<const std::byte> header, ReplyMode mode, std::uint32_t max_payload,
                                 Request& out);

// Connection facts that validation depends on.
struct ValidationContext {
  std::uint64_t export_size = 0;
  std::uint16_t transmission_flags = 0;
  ReplyMode mode = ReplyMode::simple;
  bool has_contexts = false;          // BLOCK_STATUS allowed
  bool block_size_committed = false;  // enforce min_block alignment
  std::uint32_t min_block = 1;
  std::uint32_t max_payload = 32u << 20;
};

struct Validation {
  std::uint32_t error = 0;   // 0 = valid, else NBD_E*
  std::string_view message;  // static text for the error chunk
};

// Decide whether a parsed request may be executed (proto.md "Request types",
// "Command flags", "Size constraints", "Metadata querying"). DISC is always
// valid. The payload has been (or will be) consumed regardless.
Validation validate_request(const Request& req, const ValidationContext& ctx);

// errno -> NBD_E*. fast_zero: whether the request asked for
// NBD_CMD_FLAG_FAST_ZERO (only then may ENOTSUP go out, proto.md
// "NBD_CMD_WRITE_ZEROES").
std::uint32_t errno_to_nbd(int err, bool fast_zero = false);

const char* command_name(std::uint16_t type);

}  // namespace qnbd::protocol
