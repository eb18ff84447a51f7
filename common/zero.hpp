// is_zero: whether a buffer holds only zero bytes, at memcmp speed.
//
// Used where qemu uses buffer_is_zero(): --detect-zeroes on every WRITE
// payload (so it must not be a byte loop) and qnbd convert's sparse output.
#pragma once

#include <cstddef>
#include <cstring>
#include <span>

namespace qnbd {

[[nodiscard]] inline bool is_zero(std::span<const std::byte> b) {
  // Check a 16-byte head directly, then compare the buffer with itself
  // shifted by 16: equal only if every byte equals the one 16 before it,
  // which with a zero head means all zero. glibc's memcmp is vectorised.
  constexpr std::size_t kHead = 16;
  const std::size_t head = b.size() < kHead ? b.size() : kHead;
  for (std::size_t i = 0; i < head; ++i)
    if (b[i] != std::byte{0}) return false;
  if (b.size() <= kHead) return true;
  return std::memcmp(b.data(), b.data() + kHead, b.size() - kHead) == 0;
}

}  // namespace qnbd
