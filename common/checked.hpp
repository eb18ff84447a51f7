// Overflow- and alignment-checked arithmetic for values read from untrusted
// input (image metadata, NBD requests).
#pragma once

#include <cstdint>
#include <optional>

namespace qnbd {

// a + b, or nullopt on overflow.
inline std::optional<std::uint64_t> checked_add(std::uint64_t a, std::uint64_t b) {
  std::uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// a * b, or nullopt on overflow.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) {
  std::uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// True if [offset, offset + length) lies inside [0, limit), without overflow.
inline bool range_within(std::uint64_t offset, std::uint64_t length, std::uint64_t limit) {
  return offset <= limit && length <= limit - offset;
}

constexpr bool is_power_of_2(std::uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// alignment must be a power of two.
constexpr bool is_aligned(std::uint64_t v, std::uint64_t alignment) { return (v & (alignment - 1)) == 0; }
constexpr std::uint64_t align_down(std::uint64_t v, std::uint64_t alignment) { return v & ~(alignment - 1); }
// Caller guarantees no overflow (v <= UINT64_MAX - alignment + 1).
constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t alignment) {
  return (v + alignment - 1) & ~(alignment - 1);
}
constexpr std::uint64_t div_round_up(std::uint64_t a, std::uint64_t b) { return a / b + (a % b != 0); }

}  // namespace qnbd
