// Backing-chain walks shared by every driver: block status for NBD and the
// per-range entries of `qnbd map` (mirroring qemu-img's get_block_status).
#include <algorithm>

#include "image/block_device.hpp"

namespace qnbd::image {

Result<MapEntry> map_block_status(BlockDevice& top, std::uint64_t offset, std::uint64_t length) {
  if (offset >= top.size() || length == 0) {
    return make_error(EINVAL, "block status range {:#x}+{} is outside the image", offset, length);
  }
  length = std::min(length, top.size() - offset);
  BlockDevice* bs = &top;
  std::uint32_t depth = 0;
  LayerStatus st;
  for (;;) {
    st = QNBD_TRY(bs->layer_status(offset, length));
    if (st.length == 0 || st.length > length) {
      return make_error(EIO, "block status of {:#x} returned a bad length {}", offset, st.length);
    }
    length = st.length;
    if (st.data || st.zero) break;
    BlockDevice* below = bs->backing();
    // A layer without anything below reports zero itself, so this only
    // guards against a driver that does not.
    if (!below || offset >= below->size()) break;
    bs = below;
    length = std::min(length, below->size() - offset);
    ++depth;
  }
  MapEntry e;
  e.start = offset;
  e.length = length;
  e.depth = depth;
  e.present = st.present;
  e.zero = st.zero;
  e.data = st.data;
  e.compressed = st.compressed;
  e.has_offset = st.offset_valid;
  e.offset = st.host_offset;
  e.file = st.file;
  return e;
}

Result<std::size_t> chain_block_status(BlockDevice& top, std::uint64_t offset, std::uint64_t length,
                                       std::span<Extent> out) {
  std::size_t n = 0;
  while (length > 0) {
    MapEntry m = QNBD_TRY(map_block_status(top, offset, length));
    Extent x{m.length, m.data, m.zero, m.present ? m.depth + 1 : 0};
    if (n > 0 && out[n - 1].allocated == x.allocated && out[n - 1].zero == x.zero && out[n - 1].depth == x.depth) {
      out[n - 1].length += x.length;
    } else {
      if (n == out.size()) break;
      out[n++] = x;
    }
    offset += m.length;
    length -= m.length;
  }
  return n;
}

}  // namespace qnbd::image
