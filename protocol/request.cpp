#include "protocol/request.hpp"

#include <cerrno>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "protocol/constants.hpp"

namespace qnbd::protocol {

ParseStatus parse_request_header(std::span<const std::byte> h, ReplyMode mode, std::uint32_t max_payload, Request& r) {
  const bool ext = mode == ReplyMode::extended;
  if (h.size() < request_header_size(mode)) return ParseStatus::bad_magic;
  auto magic = load_be32(h.data());
  if (magic != (ext ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC)) return ParseStatus::bad_magic;
  r.flags = load_be16(h.data() + 4);
  r.type = load_be16(h.data() + 6);
  r.cookie = load_be64(h.data() + 8);
  r.offset = load_be64(h.data() + 16);
  r.length = ext ? load_be64(h.data() + 24) : load_be32(h.data() + 24);
  r.payload_length = 0;
  if (ext) {
    // Extended request (proto.md "Request message", extension-ext-header
    // branch): payload iff PAYLOAD_LEN; qemu also tolerates a WRITE without it.
    if ((r.flags & NBD_CMD_FLAG_PAYLOAD_LEN) || r.type == NBD_CMD_WRITE) r.payload_length = r.length;
  } else if (r.type == NBD_CMD_WRITE) {
    r.payload_length = r.length;
  }
  // A payload above the maximum cannot be a legitimate request; qemu drops
  // the connection for WRITE above 32 MiB too (proto.md "Size constraints").
  if (r.payload_length > max_payload) return ParseStatus::payload_too_large;
  return ParseStatus::ok;
}

namespace {

std::uint16_t allowed_flags(std::uint16_t type) {
  switch (type) {
    case NBD_CMD_READ: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF;
    case NBD_CMD_WRITE: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_PAYLOAD_LEN;
    case NBD_CMD_WRITE_ZEROES: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    case NBD_CMD_BLOCK_STATUS: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_PAYLOAD_LEN;
    default: return NBD_CMD_FLAG_FUA;
  }
}

Validation inval(std::string_view m) { return {NBD_EINVAL, m}; }

}  // namespace

Validation validate_request(const Request& r, const ValidationContext& c) {
  const auto tf = c.transmission_flags;
  const bool ext = c.mode == ReplyMode::extended;
  switch (r.type) {
    case NBD_CMD_DISC: return {};
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS: break;
    default: return inval("unknown command");
  }
  // proto.md "Command flags": flags not defined for the command, or needing an
  // unadvertised feature.
  if (r.flags & ~allowed_flags(r.type)) return inval("flag not valid for this command");
  if ((r.flags & NBD_CMD_FLAG_FUA) && !(tf & NBD_FLAG_SEND_FUA)) return inval("FUA not negotiated");
  if ((r.flags & NBD_CMD_FLAG_DF) && !(tf & NBD_FLAG_SEND_DF)) return inval("DF not negotiated");
  if ((r.flags & NBD_CMD_FLAG_FAST_ZERO) && !(tf & NBD_FLAG_SEND_FAST_ZERO)) return inval("FAST_ZERO not negotiated");
  if (r.flags & NBD_CMD_FLAG_PAYLOAD_LEN) {
    if (!ext) return inval("PAYLOAD_LEN needs extended headers");
    if (r.type == NBD_CMD_BLOCK_STATUS && !(tf & NBD_FLAG_BLOCK_STATUS_PAYLOAD))
      return inval("block status payload not negotiated");
  }
  // Read-only export: NBD_EPERM (proto.md "Error values"); qemu rejects writes
  // to a read-only export before any range check.
  const bool writes = r.type == NBD_CMD_WRITE || r.type == NBD_CMD_TRIM || r.type == NBD_CMD_WRITE_ZEROES;
  if (writes && (tf & NBD_FLAG_READ_ONLY)) return {NBD_EPERM, "export is read-only"};
  // Commands that need an advertised feature (proto.md "Transmission flags").
  if (r.type == NBD_CMD_FLUSH && !(tf & NBD_FLAG_SEND_FLUSH)) return inval("flush not supported");
  // NBD proto.md "NBD_CMD_FLUSH": offset and length are reserved and MUST
  // be zero. (qemu 7.2 refuses them only past the end of the export.)
  if (r.type == NBD_CMD_FLUSH && (r.offset || r.length)) return inval("flush offset and length must be 0");
  if (r.type == NBD_CMD_TRIM && !(tf & NBD_FLAG_SEND_TRIM)) return inval("trim not supported");
  if (r.type == NBD_CMD_WRITE_ZEROES && !(tf & NBD_FLAG_SEND_WRITE_ZEROES)) return inval("write zeroes not supported");
  if (r.type == NBD_CMD_BLOCK_STATUS) {
    // proto.md "Metadata querying": structured replies and a selected context.
    if (c.mode == ReplyMode::simple) return inval("block status needs structured replies");
    if (!c.has_contexts) return inval("no metadata context selected");
  }
  // A payload on a command that has none is consumed, then refused (proto.md
  // "Request message", extension-ext-header branch).
  if (r.payload_length && r.type != NBD_CMD_WRITE && r.type != NBD_CMD_BLOCK_STATUS) return inval("unexpected payload");
  // The payload form of BLOCK_STATUS carries its own effect length; the
  // server checks it after reading the payload.
  const bool bs_payload = r.type == NBD_CMD_BLOCK_STATUS && (r.flags & NBD_CMD_FLAG_PAYLOAD_LEN);
  if (r.type != NBD_CMD_FLUSH && !bs_payload) {
    // Overflow-free range check (proto.md "Size constraints", "Error values").
    if (!range_within(r.offset, r.length, c.export_size)) {
      if (r.type == NBD_CMD_WRITE || r.type == NBD_CMD_WRITE_ZEROES)
        return {NBD_ENOSPC, "request beyond end of export"};
      return inval("request beyond end of export");
    }
    // Minimum block size (proto.md "Size constraints"): only for clients that
    // committed to our block sizes.
    if (c.block_size_committed && c.min_block > 1 &&
        (!is_aligned(r.offset, c.min_block) || !is_aligned(r.length, c.min_block)))
      return inval("request not aligned to the minimum block size");
  }
  // proto.md "Size constraints": client-controlled payloads (simple READ) above
  // the maximum fail; structured READs we do not split above it either.
  if (r.type == NBD_CMD_READ && r.length > c.max_payload) {
    if (c.mode == ReplyMode::simple) return inval("read larger than maximum payload");
    return {NBD_EOVERFLOW, "read larger than maximum payload"};
  }
  return {};
}

std::uint32_t errno_to_nbd(int err, bool fast_zero) {
  switch (err) {
    case 0: return 0;
    case EPERM:
    case EROFS:
    case EACCES: return NBD_EPERM;
    case EIO: return NBD_EIO;
    case ENOMEM: return NBD_ENOMEM;
#ifdef EDQUOT
    case EDQUOT:
#endif
    case EFBIG:
    case ENOSPC: return NBD_ENOSPC;
    case EOVERFLOW: return NBD_EOVERFLOW;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
      // ENOTSUP is only meaningful as a fast-zero refusal (proto.md "Error values").
      return fast_zero ? NBD_ENOTSUP : NBD_EINVAL;
    case ESHUTDOWN: return NBD_ESHUTDOWN;
    case EINVAL: return NBD_EINVAL;
    default: return NBD_EINVAL;  // qemu's default
  }
}

const char* command_name(std::uint16_t type) {
  switch (type) {
    case NBD_CMD_READ: return "READ";
    case NBD_CMD_WRITE: return "WRITE";
    case NBD_CMD_DISC: return "DISC";
    case NBD_CMD_FLUSH: return "FLUSH";
    case NBD_CMD_TRIM: return "TRIM";
    case NBD_CMD_CACHE: return "CACHE";
    case NBD_CMD_WRITE_ZEROES: return "WRITE_ZEROES";
    case NBD_CMD_BLOCK_STATUS: return "BLOCK_STATUS";
    default: return "UNKNOWN";
  }
}

}  // namespace qnbd::protocol
