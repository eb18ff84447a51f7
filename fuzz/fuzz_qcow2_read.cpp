// Fuzz entry: open a fuzzed qcow2 image read-only over an in-memory SparseFile and run
// fuzzed reads, block status (one layer, the whole chain, qemu-img map's
// view), host-offset lookups and dirty-bitmap status on it. Input layout:
// fuzz_image.hpp; each op is 9 bytes (kind, range).
//
// Properties checked (each can fail):
// - a range past the end of the device is refused, never served;
// - block_status covers at least one byte and at most the asked length with
//   non-empty extents, and a range it calls zero reads as zeroes (what a
//   client trusting NBD_STATE_ZERO would skip);
// - layer_status and get_host_offset never report an empty run.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/zero.hpp"
#include "fuzz_image.hpp"

using namespace qnbd;
using namespace qnbd::image;
using qnbd::fuzz::Reader;

namespace {

constexpr std::uint64_t kMaxRead = 256u << 10;
constexpr std::uint64_t kWindow = std::uint64_t{1} << 40;  // offsets anywhere in a 1 TiB device

// Bytes one run may read in all (keeps every run fast whatever the
// extents say).
constexpr std::uint64_t kReadBudget = 512u << 10;
std::uint64_t budget = 0;

std::vector<std::byte>& buffer(std::uint64_t n) {
  static std::vector<std::byte> b;
  b.resize(n);
  return b;
}

void do_read(qcow2::Qcow2Image& img, const fuzz::Range& g) {
  const std::uint64_t n = std::min({g.length, kMaxRead, budget});
  budget -= n;
  auto& b = buffer(n);
  auto r = img.read(b, g.offset);
  if (n && (g.offset > img.size() || n > img.size() - g.offset)) QNBD_FUZZ_CHECK(!r);
}

void do_block_status(qcow2::Qcow2Image& img, const fuzz::Range& g, std::size_t slots, bool verify_zero) {
  std::array<Extent, 64> out;
  slots = std::clamp<std::size_t>(slots, 1, out.size());
  auto r = img.block_status(g.offset, g.length, std::span(out).first(slots));
  if (!g.inside) {
    QNBD_FUZZ_CHECK(!r);
    return;
  }
  if (!r) return;
  QNBD_FUZZ_CHECK(*r <= slots);
  if (g.length) QNBD_FUZZ_CHECK(*r >= 1);
  std::uint64_t pos = g.offset;
  for (std::size_t i = 0; i < *r; ++i) {
    QNBD_FUZZ_CHECK(out[i].length > 0);
    QNBD_FUZZ_CHECK(out[i].length <= g.offset + g.length - pos);
    if (verify_zero && out[i].zero) {
      const std::uint64_t n = std::min({out[i].length, kMaxRead, budget});
      budget -= n;
      auto& b = buffer(n);
      if (img.read(b, pos)) QNBD_FUZZ_CHECK(is_zero(b));
    }
    pos += out[i].length;
  }
}

void do_layer(qcow2::Qcow2Image& img, const fuzz::Range& g) {
  if (!g.inside || !g.length) return;
  auto st = img.layer_status(g.offset, g.length);
  if (st) QNBD_FUZZ_CHECK(st->length >= 1 && st->length <= g.length);
  auto m = img.get_host_offset(g.offset, g.length);
  if (m) QNBD_FUZZ_CHECK(m->bytes >= 1 && m->bytes <= g.length);
  auto e = map_block_status(img, g.offset, g.length);
  if (e) QNBD_FUZZ_CHECK(e->length >= 1 && e->length <= g.length);
  std::array<Extent, 8> out;
  auto c = chain_block_status(img, g.offset, g.length, out);
  if (c) QNBD_FUZZ_CHECK(*c >= 1 && *c <= out.size());
}

void do_bitmap(qcow2::Qcow2Image& img, const fuzz::Range& g, std::uint8_t which) {
  if (img.bitmaps().empty() || !g.inside) return;
  const auto& name = img.bitmaps()[which % img.bitmaps().size()].name;
  auto h = img.export_bitmap(name);
  if (!h) return;
  std::array<BitmapExtent, 16> out;
  auto r = img.bitmap_status(*h, g.offset, g.length, out);
  if (r && g.length) {
    QNBD_FUZZ_CHECK(*r >= 1 && *r <= out.size());
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < *r; ++i) total += out[i].length;
    QNBD_FUZZ_CHECK(total <= g.length);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::ImageInput in;
  fuzz::decode_image_input(data, size, in);
  budget = kReadBudget;
  auto opened = fuzz::open_fuzz_qcow2(in.image, false);
  if (!opened) return 0;
  auto& img = **opened;
  (void)img.info();
  (void)img.capabilities();
  const std::uint64_t dev = img.size();
  if (in.ops.empty()) {
    // Seeds carry no ops: read and map the start of the image.
    const std::uint64_t end = std::min<std::uint64_t>(dev, 1u << 20);
    for (std::uint64_t off = 0; off < end; off += 65536)
      do_read(img, {off, std::min<std::uint64_t>(65536, end - off), true});
    do_block_status(img, {0, dev, true}, 64, true);
    do_layer(img, {0, dev, true});
    for (std::size_t i = 0; i < img.bitmaps().size() && i < 4; ++i)
      do_bitmap(img, {0, dev, true}, static_cast<std::uint8_t>(i));
    return 0;
  }
  Reader ops(in.ops);
  for (int n = 0; n < 64 && !ops.empty(); ++n) {
    const std::uint8_t op = ops.u8();
    const auto g = fuzz::pick_range(ops, dev, kWindow, (op & 0x80) ? kMaxRead : UINT64_MAX / 2);
    switch (op % 4) {
      case 0: do_read(img, g); break;
      case 1: do_block_status(img, g, (op >> 2) & 63, op & 0x80); break;
      case 2: do_layer(img, g); break;
      case 3: do_bitmap(img, g, op >> 2); break;
    }
  }
  return 0;
}
