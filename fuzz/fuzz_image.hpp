// Fuzzed qcow2 images held in memory, shared by the qcow2_read,
// qcow2_write and check targets.
//
// An image input is: u16 ops_length, ops bytes, then the image as a sparse
// list, so a seed built from a real qemu-img image stays a few KiB while the
// image it describes can be several MiB (all integers little endian):
//   u32 file_size
//   repeated: u32 offset, u16 n, then
//     n < 0x7f00: n literal bytes
//     0x7f00 <= n < 0x8000: a sequence of big-endian 64-bit words, for
//     tables naming many distinct clusters in a scattered order (what a
//     literal or a fill cannot say in 4 KiB, and where two defects hid: a
//     quadratic registration of scattered refcount blocks and a per-cluster
//     registration of 65,536 snapshot L1 tables): u16 count, u64 start,
//     u32 step, u16 mult; word i < count goes to offset + i * stride,
//     stride = 8 * ((n & 0xff) + 1), and is start + ((i * mult) % count) *
//     step (a mult coprime to count names each value once, scattered). At
//     most kMaxSequenceWords words per input.
//     n >= 0x8000: one byte b; (n - 0x8000) * 64 bytes of value b (a fill:
//     qemu-io -P data and refcount blocks of 8-bit refcounts are runs)
// The file is file_size bytes (at least the end of the last record), but at
// most kSlackBytes past the last record and never above kMaxImageBytes.
// fuzz/make-corpus.py writes seeds in this layout.
//
// The image becomes a SparseFile (sparse_file.hpp): building it costs what
// the input holds, not what the file size says, and every further copy
// (backing layer, data file, reopen) shares its pages.
//
// A backing file named by the image is served from memory too: at the
// first level the same bytes opened as qcow2 (a chain of two fuzzed
// layers), falling back to a raw patterned file; below that always the raw
// file. An external data file is a copy of the image bytes. Nothing here
// touches the host file system.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/endian.hpp"
#include "fuzz_input.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image/raw/raw_device.hpp"
#include "sparse_file.hpp"

namespace qnbd::fuzz {

inline constexpr std::size_t kMaxImageBytes = 16u << 20;
inline constexpr std::size_t kSlackBytes = 1u << 20;
inline constexpr std::size_t kMaxSequenceWords = 1u << 18;

struct ImageInput {
  std::span<const std::uint8_t> ops;
  SparseFile image{"<fuzz.qcow2>"};
};

inline void decode_image_input(const std::uint8_t* data, std::size_t size, ImageInput& in) {
  quiet_logs();
  Reader r({data, size});
  in.ops = r.take(r.u16());
  const std::size_t size_field = r.u32();
  std::size_t records_end = 0;
  std::size_t sequence_words = 0;
  while (!r.empty()) {
    const std::size_t offset = r.u32();
    const std::uint16_t n = r.u16();
    std::span<const std::uint8_t> bytes;
    std::uint8_t fill = 0;
    std::size_t length;
    if (n >= 0x7f00 && n < 0x8000) {
      const std::uint32_t count = r.u16();
      const std::uint64_t start = r.u64();
      const std::uint64_t step = r.u32();
      const std::uint32_t mult = r.u16();
      const std::size_t stride = 8 * ((n & 0xffu) + 1);
      for (std::uint32_t i = 0; i < count && sequence_words < kMaxSequenceWords; ++i, ++sequence_words) {
        const std::size_t at = offset + std::size_t{i} * stride;
        if (at + 8 > kMaxImageBytes) break;
        std::byte word[8];
        store_be64(word, start + (std::uint64_t{i} * mult % count) * step);
        (void)in.image.pwrite(word, at);
        records_end = std::max(records_end, at + 8);
      }
      continue;
    }
    if (n >= 0x8000) {
      fill = r.u8();
      length = std::size_t{n - 0x8000u} * 64;
    } else {
      bytes = r.take(n);
      length = bytes.size();
    }
    if (offset >= kMaxImageBytes) continue;
    length = std::min(length, kMaxImageBytes - offset);
    if (length == 0) continue;
    records_end = std::max(records_end, offset + length);
    if (bytes.empty())
      in.image.fill(offset, length, std::byte{fill});
    else
      (void)in.image.pwrite(std::as_bytes(bytes.first(length)), offset);
  }
  in.image.set_size(std::max(records_end, std::min({size_field, records_end + kSlackBytes, kMaxImageBytes})));
}

// Whether the header asks for an external data file (incompatible feature
// bit 2 of a version 3 header, qcow2.txt "Header"); open() refuses a data
// file it did not ask for, so the fuzzer gives one exactly then.
inline bool wants_data_file(SparseFile& f) {
  std::byte h[80];
  auto n = f.pread(h, 0);
  if (!n || *n < sizeof h) return false;
  return load_be32(h + 4) >= 3 && (load_be64(h + 72) & 4);
}

// 1 MiB + 512 so the backing file ends inside most cluster sizes; built
// once, each open shares its pages.
inline std::unique_ptr<image::File> raw_backing_file() {
  static const auto pattern = [] {
    auto f = std::make_unique<SparseFile>("<backing.raw>");
    for (std::uint64_t off = 0; off < (1u << 20) + 512; off += 512) f->fill(off, 512, std::byte(0xb0 ^ (off >> 9)));
    return f;
  }();
  return std::make_unique<SparseFile>(*pattern, "<backing.raw>");
}

inline Result<std::unique_ptr<image::qcow2::Qcow2Image>> open_fuzz_qcow2(const SparseFile& bytes, bool writable,
                                                                         int depth = 0);

// The backing opener of a fuzzed image at `depth`: the same bytes once more
// as a qcow2 backing file (one level, so a chain cannot recurse), else the
// fixed raw backing file.
inline image::qcow2::BackingOpener fuzz_backing_opener(const SparseFile& bytes, int depth) {
  using namespace image;
  return [&bytes, depth](const std::string&, const std::string& format) -> Result<std::unique_ptr<BlockDevice>> {
    if (depth == 0 && format != "raw") {
      auto q = open_fuzz_qcow2(bytes, false, depth + 1);
      if (q) return std::unique_ptr<BlockDevice>(std::move(*q));
    }
    auto raw = RawDevice::open(raw_backing_file(), OpenOptions{});
    if (!raw) return raw.error();
    return std::unique_ptr<BlockDevice>(std::move(*raw));
  };
}

inline Result<std::unique_ptr<image::qcow2::Qcow2Image>> open_fuzz_qcow2(const SparseFile& bytes, bool writable,
                                                                         int depth) {
  using namespace image;
  qcow2::Qcow2Image::Parts parts;
  auto file = std::make_unique<SparseFile>(bytes, depth ? "<backing.qcow2>" : "<fuzz.qcow2>");
  if (wants_data_file(*file)) parts.data_file = std::make_unique<SparseFile>(bytes, "<data file>");
  parts.file = std::move(file);
  parts.path = depth ? "backing.qcow2" : "fuzz.qcow2";
  parts.open_backing = fuzz_backing_opener(bytes, depth);
  OpenOptions o;
  o.format = ImageFormat::qcow2;
  o.read_only = !writable;
  return qcow2::Qcow2Image::open(std::move(parts), o);
}

// One guest range from fuzzer bytes: mostly inside [0, size], 512-aligned or
// not, sometimes past the end on purpose (the engine must refuse those).
struct Range {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  bool inside = true;
};

inline Range pick_range(Reader& r, std::uint64_t size, std::uint64_t window, std::uint64_t max_length) {
  const std::uint8_t kind = r.u8();
  std::uint64_t off = r.u32();
  std::uint64_t len = r.u32();
  if (!(kind & 1)) off *= 512;
  if (!(kind & 2)) len *= 512;
  Range g;
  if ((kind & 0xf0) == 0xf0) {
    // Past the end (or overflowing): must be refused.
    g.offset = (kind & 4) || off > UINT64_MAX - size ? UINT64_MAX - (off & 0xffff) : size + off;
    g.length = len % max_length + 1;
    g.inside = g.offset <= size && g.length <= size - g.offset;
    return g;
  }
  const std::uint64_t w = std::min(size, window);
  g.offset = off % (w + 1);
  g.length = std::min<std::uint64_t>(len % (max_length + 1), w - g.offset);
  return g;
}

}  // namespace qnbd::fuzz
