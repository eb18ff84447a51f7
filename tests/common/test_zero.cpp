#include <doctest/doctest.h>

#include <vector>

#include "common/zero.hpp"

using qnbd::is_zero;

TEST_CASE("is_zero: empty and all-zero buffers of every small length") {
  CHECK(is_zero({}));
  for (std::size_t n = 1; n <= 70; ++n) {
    std::vector<std::byte> b(n);
    CHECK(is_zero(b));
  }
}

TEST_CASE("is_zero: one nonzero byte anywhere is found") {
  // Lengths around the 16-byte head and a multi-KiB buffer; the byte at
  // each position (head, the first shifted byte, the very end).
  for (std::size_t n : {1u, 15u, 16u, 17u, 31u, 32u, 33u, 4096u, 65537u}) {
    for (std::size_t pos : {std::size_t{0}, n / 2, n - 1, n > 16 ? std::size_t{16} : std::size_t{0}}) {
      std::vector<std::byte> b(n);
      b[pos] = std::byte{0x80};
      CHECK_MESSAGE(!is_zero(b), "length ", n, " nonzero at ", pos);
    }
  }
}

TEST_CASE("is_zero: a repeating nonzero pattern is not zero") {
  // A buffer equal to itself shifted by 16 but not zero: the head check
  // must catch it (memcmp alone would say equal).
  std::vector<std::byte> b(4096);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = std::byte(i % 16 == 3 ? 1 : 0);
  CHECK(!is_zero(b));
}
