// Shared decoding of fuzz inputs for the image targets.
//
// An image input is: u16 ops_length, ops bytes, then the image as a sparse
// list, so a seed built from a real qemu-img image stays a few KiB while the
// image it describes can be several MiB (all integers little endian):
//   u32 file_size
//   repeated: u32 offset, u16 n, then
//     n < 0x8000: n literal bytes
//     n >= 0x8000: one byte b; (n - 0x8000) * 64 bytes of value b (a fill:
//     qemu-io -P data and refcount blocks of 8-bit refcounts are runs)
// The file is file_size bytes (at least the end of the last record), but at
// most kSlackBytes past the last record and never above kMaxImageBytes, so
// a mutated size field does not make every run zero-fill 16 MiB.
// fuzz/make-corpus.py writes seeds in this layout.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

namespace qnbd::fuzz {

inline constexpr std::size_t kMaxImageBytes = 16u << 20;
inline constexpr std::size_t kSlackBytes = 1u << 20;

// A cursor over fuzzer bytes; reads past the end give zeroes.
class Reader {
 public:
  explicit Reader(std::span<const std::uint8_t> d) : d_(d) {}
  bool empty() const { return pos_ >= d_.size(); }
  std::size_t left() const { return empty() ? 0 : d_.size() - pos_; }
  std::uint64_t le(unsigned bytes) {
    std::uint64_t v = 0;
    for (unsigned i = 0; i < bytes; ++i) v |= std::uint64_t{pos_ < d_.size() ? d_[pos_++] : 0u} << (8 * i);
    return v;
  }
  std::uint8_t u8() { return static_cast<std::uint8_t>(le(1)); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(le(2)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(le(4)); }
  std::uint64_t u64() { return le(8); }
  std::span<const std::uint8_t> take(std::size_t n) {
    n = std::min(n, left());
    auto s = d_.subspan(pos_, n);
    pos_ += n;
    return s;
  }

 private:
  std::span<const std::uint8_t> d_;
  std::size_t pos_ = 0;
};

struct ImageInput {
  std::span<const std::uint8_t> ops;
  std::vector<std::byte> image;
};

inline ImageInput decode_image_input(const std::uint8_t* data, std::size_t size) {
  ImageInput in;
  Reader r({data, size});
  in.ops = r.take(r.u16());
  const std::size_t size_field = r.u32();
  std::size_t records_end = 0;
  struct Record {
    std::size_t offset = 0;
    std::size_t length = 0;
    std::span<const std::uint8_t> bytes;  // empty: a fill of `fill`
    std::uint8_t fill = 0;
  };
  std::vector<Record> records;
  while (!r.empty()) {
    Record rec;
    rec.offset = r.u32();
    const std::uint16_t n = r.u16();
    if (n >= 0x8000) {
      rec.fill = r.u8();
      rec.length = std::size_t{n - 0x8000u} * 64;
    } else {
      rec.bytes = r.take(n);
      rec.length = rec.bytes.size();
    }
    if (rec.offset >= kMaxImageBytes) continue;
    rec.length = std::min(rec.length, kMaxImageBytes - rec.offset);
    records_end = std::max(records_end, rec.offset + rec.length);
    records.push_back(rec);
  }
  const std::size_t file_size = std::max(records_end, std::min({size_field, records_end + kSlackBytes, kMaxImageBytes}));
  in.image.resize(file_size);
  for (const auto& rec : records) {
    if (rec.length == 0) continue;
    if (rec.bytes.empty()) std::memset(in.image.data() + rec.offset, rec.fill, rec.length);
    else std::memcpy(in.image.data() + rec.offset, rec.bytes.data(), rec.length);
  }
  return in;
}

// A failed property: print it and abort, so libFuzzer records the input as a
// crash and the replay test fails.
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "fuzz property violated: %s\n", what);
  std::abort();
}

#define QNBD_FUZZ_CHECK(cond)                                          \
  do {                                                                 \
    if (!(cond)) ::qnbd::fuzz::fail(#cond " at " __FILE__ ":" QNBD_FUZZ_STR(__LINE__)); \
  } while (0)
#define QNBD_FUZZ_STR2(x) #x
#define QNBD_FUZZ_STR(x) QNBD_FUZZ_STR2(x)

}  // namespace qnbd::fuzz
