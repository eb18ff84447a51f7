// Opening a fuzzed qcow2 image held in memory (MemFile), shared by the
// qcow2 read and write targets. A backing file named by the image is served
// from memory too: at the first level the same bytes opened as qcow2 (a
// chain of two fuzzed layers), falling back to a raw patterned file; below
// that always the raw file. An external data file is a copy of the image
// bytes. Nothing here touches the host file system.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "fuzz_input.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image/raw/raw_device.hpp"

namespace qnbd::fuzz {

inline std::unique_ptr<image::File> raw_backing_file() {
  // 1 MiB + 512 so the backing file ends inside most cluster sizes.
  std::vector<std::byte> b((1u << 20) + 512);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(0xb0 ^ (i >> 9));
  return std::make_unique<image::MemFile>("<backing.raw>", std::move(b));
}

inline Result<std::unique_ptr<image::qcow2::Qcow2Image>> open_fuzz_qcow2(const std::vector<std::byte>& bytes,
                                                                         bool writable, int depth = 0);

// The backing opener of a fuzzed image at `depth`: the same bytes once more
// as a qcow2 backing file (one level, so a chain cannot recurse), else the
// fixed raw backing file.
inline image::qcow2::BackingOpener fuzz_backing_opener(const std::vector<std::byte>& bytes, int depth) {
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

inline Result<std::unique_ptr<image::qcow2::Qcow2Image>> open_fuzz_qcow2(const std::vector<std::byte>& bytes,
                                                                         bool writable, int depth) {
  using namespace image;
  qcow2::Qcow2Image::Parts parts;
  parts.file = std::make_unique<MemFile>(depth ? "<backing.qcow2>" : "<fuzz.qcow2>", bytes);
  parts.path = depth ? "backing.qcow2" : "fuzz.qcow2";
  auto h = qcow2::parse_header(std::span(bytes).first(std::min<std::size_t>(bytes.size(), 2u << 20)),
                               bytes.size());
  if (h && h->has_data_file()) parts.data_file = std::make_unique<MemFile>("<data file>", bytes);
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
