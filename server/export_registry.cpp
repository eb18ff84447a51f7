// The exports as served: what the handshake advertises for a device.
#include "server/internal.hpp"

#include <algorithm>

#include "protocol/constants.hpp"

namespace qnbd::server {

protocol::ExportInfo describe_export(const image::BlockDevice& device, std::string name, std::string description,
                                     bool read_only, bool multi_conn, bool allocation_depth) {
  auto caps = device.capabilities();
  protocol::ExportInfo e;
  e.name = std::move(name);
  e.description = std::move(description);
  e.size = device.size();
  e.read_only = read_only || !caps.writable;
  e.can_flush = true;
  e.can_fua = true;
  e.can_cache = true;
  // Like qemu-nbd: a writable export offers TRIM (a no-op with
  // --discard=ignore), WRITE_ZEROES and FAST_ZERO.
  e.can_trim = true;
  e.can_write_zeroes = true;
  e.can_fast_zero = true;
  e.can_multi_conn = multi_conn && caps.can_multi_conn;
  e.min_block = std::max<std::uint32_t>(1, caps.min_block);
  // qemu-nbd advertises max(4096, minimum), not the cluster size.
  e.preferred_block = std::max<std::uint32_t>(4096, e.min_block);
  e.max_payload = protocol::kMaxPayload;
  e.allocation_depth = allocation_depth;
  return e;
}


}  // namespace qnbd::server
