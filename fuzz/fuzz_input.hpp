// Shared decoding of fuzz inputs: a cursor over the fuzzer bytes and the
// property check that aborts (the image input layout is in fuzz_image.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "common/log.hpp"

namespace qnbd::fuzz {

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

// The engine's warnings (a corrupt image, a stale record) are expected on
// almost every input: formatting and printing them would cost more than
// the run itself.
inline void quiet_logs() {
  static const bool once = (log::set_level(log::Level::off), true);
  (void)once;
}

// A failed property: print it and abort, so libFuzzer records the input as a
// crash and the replay test fails.
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "fuzz property violated: %s\n", what);
  std::abort();
}

#define QNBD_FUZZ_CHECK(cond)                                                                                          \
  do {                                                                                                                 \
    if (!(cond)) ::qnbd::fuzz::fail(#cond " at " __FILE__ ":" QNBD_FUZZ_STR(__LINE__));                                \
  } while (0)
#define QNBD_FUZZ_STR2(x) #x
#define QNBD_FUZZ_STR(x) QNBD_FUZZ_STR2(x)

}  // namespace qnbd::fuzz
