// Fuzz entry for protocol/: the input is a client byte stream. It drives the
// Negotiator (in chunk sizes taken from the first byte), and once the
// handshake reaches transmission, the rest is parsed as requests of the
// negotiated mode, validated and answered with the reply encoders.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "protocol/constants.hpp"
#include "protocol/negotiator.hpp"
#include "protocol/reply.hpp"
#include "protocol/request.hpp"

using namespace qnbd::protocol;

namespace {

const StaticCatalog& catalog() {
  static const StaticCatalog cat([] {
    ExportInfo a;
    a.size = 1 << 20;
    a.read_only = false;
    a.can_trim = a.can_write_zeroes = a.can_fast_zero = true;
    ExportInfo b;
    b.name = "ro";
    b.size = 12345;
    b.allocation_depth = true;
    b.bitmaps = {"b0"};
    b.min_block = 512;
    return std::vector<ExportInfo>{a, b};
  }());
  return cat;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t chunk = 1 + data[0] % 64;
  auto in = std::span(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  Negotiator n(catalog());
  std::size_t pos = 0;
  for (;;) {
    auto a = n.next();
    if (a.kind == Action::Kind::send) continue;
    if (a.kind == Action::Kind::close) return 0;
    if (a.kind == Action::Kind::start_transmission) break;
    if (pos == in.size()) return 0;
    std::size_t take = std::min<std::size_t>({a.bytes, chunk, in.size() - pos});
    n.feed(in.subspan(pos, take));
    pos += take;
  }
  const auto& r = n.result();
  ValidationContext v{r.export_info->size,    r.transmission_flags, r.mode,       !r.contexts.empty(),
                      r.block_size_committed, r.min_block,          r.max_payload};
  const auto hsize = request_header_size(r.mode);
  std::vector<std::byte> out;
  while (in.size() - pos >= hsize) {
    Request q;
    if (parse_request_header(in.subspan(pos, hsize), r.mode, r.max_payload, q) != ParseStatus::ok) return 0;
    pos += hsize;
    if (q.payload_length > in.size() - pos) return 0;
    pos += q.payload_length;
    if (q.type == NBD_CMD_DISC) return 0;
    auto val = validate_request(q, v);
    out.clear();
    if (val.error) {
      append_error_chunk(out, r.mode, NBD_REPLY_FLAG_DONE, q.cookie, q.offset, val.error, val.message);
    } else if (q.type == NBD_CMD_BLOCK_STATUS) {
      ExtentList l((q.flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : 8, max_extent_length(r.mode));
      for (std::uint64_t left = q.length, i = 0; left && i < 16; ++i) {
        auto len = std::min<std::uint64_t>(left, 4096 << i);
        if (!l.add(len, static_cast<std::uint32_t>(i & 3))) break;
        left -= len;
      }
      if (!l.extents().empty())
        append_block_status_chunk(out, r.mode, NBD_REPLY_FLAG_DONE, q.cookie, q.offset, 0, l.extents());
    }
  }
  return 0;
}
