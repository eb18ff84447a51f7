// Byte-building helpers for protocol tests: expected wire images are written
// out field by field from the spec tables, independent of the encoders.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace qnbd::test {

struct Bytes {
  std::vector<std::byte> v;
  Bytes& u8(std::uint8_t x) {
    v.push_back(std::byte{x});
    return *this;
  }
  Bytes& u16(std::uint16_t x) { return u8(x >> 8).u8(x & 0xff); }
  Bytes& u32(std::uint32_t x) { return u16(x >> 16).u16(x & 0xffff); }
  Bytes& u64(std::uint64_t x) { return u32(x >> 32).u32(x & 0xffffffffu); }
  Bytes& str(std::string_view s) {
    for (char c : s) u8(static_cast<std::uint8_t>(c));
    return *this;
  }
  Bytes& zeros(std::size_t n) {
    v.insert(v.end(), n, std::byte{0});
    return *this;
  }
  Bytes& add(const Bytes& o) {
    v.insert(v.end(), o.v.begin(), o.v.end());
    return *this;
  }
};

}  // namespace qnbd::test
