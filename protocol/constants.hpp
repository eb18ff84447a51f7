// NBD wire constants, spelled as in NetworkBlockDevice/nbd doc/proto.md (and
// its extension-ext-header branch) so they can be grepped against the spec.
// Each group names the proto.md section it comes from.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qnbd::protocol {

// Magic numbers (proto.md "Handshake" and "Transmission" message layouts).
inline constexpr std::uint64_t NBDMAGIC = 0x4e42444d41474943ULL;
inline constexpr std::uint64_t IHAVEOPT = 0x49484156454F5054ULL;
inline constexpr std::uint64_t NBD_REP_MAGIC = 0x0003e889045565a9ULL;
inline constexpr std::uint32_t NBD_REQUEST_MAGIC = 0x25609513;
inline constexpr std::uint32_t NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
inline constexpr std::uint32_t NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
inline constexpr std::uint32_t NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
inline constexpr std::uint32_t NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// proto.md "Handshake flags" (server, 16 bit).
inline constexpr std::uint16_t NBD_FLAG_FIXED_NEWSTYLE = 1u << 0;
inline constexpr std::uint16_t NBD_FLAG_NO_ZEROES = 1u << 1;
// proto.md "Client flags" (32 bit).
inline constexpr std::uint32_t NBD_FLAG_C_FIXED_NEWSTYLE = 1u << 0;
inline constexpr std::uint32_t NBD_FLAG_C_NO_ZEROES = 1u << 1;

// proto.md "Option types".
inline constexpr std::uint32_t NBD_OPT_EXPORT_NAME = 1;
inline constexpr std::uint32_t NBD_OPT_ABORT = 2;
inline constexpr std::uint32_t NBD_OPT_LIST = 3;
inline constexpr std::uint32_t NBD_OPT_PEEK_EXPORT = 4;
inline constexpr std::uint32_t NBD_OPT_STARTTLS = 5;
inline constexpr std::uint32_t NBD_OPT_INFO = 6;
inline constexpr std::uint32_t NBD_OPT_GO = 7;
inline constexpr std::uint32_t NBD_OPT_STRUCTURED_REPLY = 8;
inline constexpr std::uint32_t NBD_OPT_LIST_META_CONTEXT = 9;
inline constexpr std::uint32_t NBD_OPT_SET_META_CONTEXT = 10;
inline constexpr std::uint32_t NBD_OPT_EXTENDED_HEADERS = 11;

// proto.md "Option reply types".
inline constexpr std::uint32_t NBD_REP_ACK = 1;
inline constexpr std::uint32_t NBD_REP_SERVER = 2;
inline constexpr std::uint32_t NBD_REP_INFO = 3;
inline constexpr std::uint32_t NBD_REP_META_CONTEXT = 4;
inline constexpr std::uint32_t NBD_REP_FLAG_ERROR = 1u << 31;
inline constexpr std::uint32_t NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1;
inline constexpr std::uint32_t NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2;
inline constexpr std::uint32_t NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3;
inline constexpr std::uint32_t NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4;
inline constexpr std::uint32_t NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5;
inline constexpr std::uint32_t NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6;
inline constexpr std::uint32_t NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7;
inline constexpr std::uint32_t NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8;
inline constexpr std::uint32_t NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9;
inline constexpr std::uint32_t NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10;

// Info types (proto.md "Option reply types", NBD_REP_INFO).
inline constexpr std::uint16_t NBD_INFO_EXPORT = 0;
inline constexpr std::uint16_t NBD_INFO_NAME = 1;
inline constexpr std::uint16_t NBD_INFO_DESCRIPTION = 2;
inline constexpr std::uint16_t NBD_INFO_BLOCK_SIZE = 3;

// proto.md "Transmission flags" (16 bit).
inline constexpr std::uint16_t NBD_FLAG_HAS_FLAGS = 1u << 0;
inline constexpr std::uint16_t NBD_FLAG_READ_ONLY = 1u << 1;
inline constexpr std::uint16_t NBD_FLAG_SEND_FLUSH = 1u << 2;
inline constexpr std::uint16_t NBD_FLAG_SEND_FUA = 1u << 3;
inline constexpr std::uint16_t NBD_FLAG_ROTATIONAL = 1u << 4;
inline constexpr std::uint16_t NBD_FLAG_SEND_TRIM = 1u << 5;
inline constexpr std::uint16_t NBD_FLAG_SEND_WRITE_ZEROES = 1u << 6;
inline constexpr std::uint16_t NBD_FLAG_SEND_DF = 1u << 7;
inline constexpr std::uint16_t NBD_FLAG_CAN_MULTI_CONN = 1u << 8;
inline constexpr std::uint16_t NBD_FLAG_SEND_RESIZE = 1u << 9;
inline constexpr std::uint16_t NBD_FLAG_SEND_CACHE = 1u << 10;
inline constexpr std::uint16_t NBD_FLAG_SEND_FAST_ZERO = 1u << 11;
inline constexpr std::uint16_t NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1u << 12;

// proto.md "Command flags" (16 bit).
inline constexpr std::uint16_t NBD_CMD_FLAG_FUA = 1u << 0;
inline constexpr std::uint16_t NBD_CMD_FLAG_NO_HOLE = 1u << 1;
inline constexpr std::uint16_t NBD_CMD_FLAG_DF = 1u << 2;
inline constexpr std::uint16_t NBD_CMD_FLAG_REQ_ONE = 1u << 3;
inline constexpr std::uint16_t NBD_CMD_FLAG_FAST_ZERO = 1u << 4;
inline constexpr std::uint16_t NBD_CMD_FLAG_PAYLOAD_LEN = 1u << 5;

// proto.md "Structured reply flags".
inline constexpr std::uint16_t NBD_REPLY_FLAG_DONE = 1u << 0;

// proto.md "Structured reply types".
inline constexpr std::uint16_t NBD_REPLY_TYPE_NONE = 0;
inline constexpr std::uint16_t NBD_REPLY_TYPE_OFFSET_DATA = 1;
inline constexpr std::uint16_t NBD_REPLY_TYPE_OFFSET_HOLE = 2;
inline constexpr std::uint16_t NBD_REPLY_TYPE_BLOCK_STATUS = 5;
inline constexpr std::uint16_t NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
inline constexpr std::uint16_t NBD_REPLY_TYPE_ERROR = (1u << 15) | 1;
inline constexpr std::uint16_t NBD_REPLY_TYPE_ERROR_OFFSET = (1u << 15) | 2;

// proto.md "Request types".
inline constexpr std::uint16_t NBD_CMD_READ = 0;
inline constexpr std::uint16_t NBD_CMD_WRITE = 1;
inline constexpr std::uint16_t NBD_CMD_DISC = 2;
inline constexpr std::uint16_t NBD_CMD_FLUSH = 3;
inline constexpr std::uint16_t NBD_CMD_TRIM = 4;
inline constexpr std::uint16_t NBD_CMD_CACHE = 5;
inline constexpr std::uint16_t NBD_CMD_WRITE_ZEROES = 6;
inline constexpr std::uint16_t NBD_CMD_BLOCK_STATUS = 7;

// proto.md "Error values".
inline constexpr std::uint32_t NBD_EPERM = 1;
inline constexpr std::uint32_t NBD_EIO = 5;
inline constexpr std::uint32_t NBD_ENOMEM = 12;
inline constexpr std::uint32_t NBD_EINVAL = 22;
inline constexpr std::uint32_t NBD_ENOSPC = 28;
inline constexpr std::uint32_t NBD_EOVERFLOW = 75;
inline constexpr std::uint32_t NBD_ENOTSUP = 95;
inline constexpr std::uint32_t NBD_ESHUTDOWN = 108;

// proto.md "base:allocation metadata context" status bits; qemu:dirty-bitmap
// (qemu docs/interop/nbd.rst "qemu namespace").
inline constexpr std::uint32_t NBD_STATE_HOLE = 1u << 0;
inline constexpr std::uint32_t NBD_STATE_ZERO = 1u << 1;
inline constexpr std::uint32_t NBD_STATE_DIRTY = 1u << 0;

// Sizes of fixed wire structures.
inline constexpr std::size_t kGreetingSize = 18;
inline constexpr std::size_t kOptionHeaderSize = 16;
inline constexpr std::size_t kOptionReplyHeaderSize = 20;
inline constexpr std::size_t kCompactRequestSize = 28;
inline constexpr std::size_t kExtendedRequestSize = 32;
inline constexpr std::size_t kSimpleReplySize = 16;
inline constexpr std::size_t kStructuredChunkHeaderSize = 20;
inline constexpr std::size_t kExtendedChunkHeaderSize = 32;

// Limits. The maximum payload matches qemu-nbd (32 MiB); strings follow the
// spec's 4096-byte ceiling.
inline constexpr std::uint32_t kMaxPayload = 32u << 20;
inline constexpr std::size_t kMaxString = 4096;
// Option data (proto.md "Newstyle negotiation") is held whole while an option
// is processed, so it is capped per connection. qemu-nbd reads option data
// piecewise and accepts up to 32 MiB, nbdkit buffers up to 64 MiB; real clients
// send far less (a SET_META_CONTEXT of 3,000 bitmap queries is about 72 KB), so
// 1 MiB serves them with room to spare. Above it, up to kMaxOptionDrain (qemu's
// cap), the data is read and dropped without being stored and the option fails
// with NBD_REP_ERR_TOO_BIG (EXPORT_NAME, which has no error reply,
// disconnects); above that the connection is dropped, as qemu does.
inline constexpr std::uint32_t kMaxOptionLength = 1u << 20;
inline constexpr std::uint32_t kMaxOptionDrain = 32u << 20;
// Status descriptors per chunk: qemu caps at 1 MiB / 8
// (NBD_MAX_BLOCK_STATUS_EXTENTS); spec allows 2^20.
inline constexpr std::size_t kMaxExtentsPerChunk = (1u << 20) / 8;

// Metadata context ids, stable like qemu's (NBD_META_ID_* in nbd/server.c).
inline constexpr std::uint32_t kContextIdBaseAllocation = 0;
inline constexpr std::uint32_t kContextIdAllocationDepth = 1;
inline constexpr std::uint32_t kContextIdFirstBitmap = 2;

}  // namespace qnbd::protocol
