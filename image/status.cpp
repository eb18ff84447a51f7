// Backing-chain walks shared by every driver: block status for NBD and the
// per-range entries of `qnbd map` (mirroring qemu-img's get_block_status).
#include <algorithm>
#include <array>

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

// One extent for NBD: base:allocation flags as bdrv_block_status_above
// (want_zero) and the allocation depth as bdrv_is_allocated_above, which
// QEMU's NBD server uses for qemu:allocation-depth. They differ from
// qemu-img map in one case: past the end of a shorter backing layer the
// synthesized zeroes count as allocated in that short layer.
static Result<Extent> chain_extent(BlockDevice& top, std::uint64_t offset, std::uint64_t length) {
  BlockDevice* bs = &top;
  std::uint32_t depth = 1;
  Extent x;
  bool flags_set = false;
  for (;;) {
    LayerStatus st = QNBD_TRY(bs->layer_status(offset, length));
    if (st.length == 0 || st.length > length) {
      return make_error(EIO, "block status of {:#x} returned a bad length {}", offset, st.length);
    }
    length = st.length;
    if (!flags_set && (st.data || st.zero)) {
      x.allocated = st.data;
      x.zero = st.zero;
      flags_set = true;
    }
    if (st.present) {
      x.depth = depth;
      break;
    }
    BlockDevice* below = bs->backing();
    if (!below) {
      x.depth = 0;
      break;
    }
    ++depth;
    if (offset >= below->size()) {
      x.depth = depth;  // zeroes past a short layer's end belong to it
      break;
    }
    length = std::min(length, below->size() - offset);
    bs = below;
  }
  if (!flags_set) x.zero = true;  // nothing below: reads as zeroes
  x.length = length;
  return x;
}

Result<bool> chain_reads_zero(BlockDevice& top, std::uint64_t offset, std::uint64_t length) {
  std::array<Extent, 8> ext;
  const std::uint64_t end = offset + length;
  while (offset < end) {
    const std::size_t k = QNBD_TRY(chain_block_status(top, offset, end - offset, ext));
    if (k == 0) return false;
    for (std::size_t i = 0; i < k && offset < end; ++i) {
      if (!ext[i].zero) return false;
      offset += ext[i].length;
    }
  }
  return true;
}

bool append_extent(std::span<Extent> out, std::size_t& n, const Extent& x) {
  if (n > 0 && out[n - 1].allocated == x.allocated && out[n - 1].zero == x.zero && out[n - 1].depth == x.depth) {
    out[n - 1].length += x.length;
    return true;
  }
  if (n == out.size()) return false;
  out[n++] = x;
  return true;
}

Result<std::size_t> chain_block_status(BlockDevice& top, std::uint64_t offset, std::uint64_t length,
                                       std::span<Extent> out) {
  if (offset >= top.size() || length > top.size() - offset) {
    return make_error(EINVAL, "block status range {:#x}+{} is outside the image", offset, length);
  }
  std::size_t n = 0;
  while (length > 0) {
    const Extent x = QNBD_TRY(chain_extent(top, offset, length));
    if (!append_extent(out, n, x)) break;
    offset += x.length;
    length -= x.length;
  }
  return n;
}

}  // namespace qnbd::image
