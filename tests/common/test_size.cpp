// common/size.hpp: QEMU's size syntax. Each expected value here was read
// from QEMU 7.2's tools (`qemu-io -c "read SIZE 1"` prints the offset it
// parsed; `qemu-img create` for what is refused); integration/test-create.sh
// checks sizes against qemu-img itself.
#include <doctest/doctest.h>

#include <cstdint>
#include <string_view>

#include "common/size.hpp"

using namespace qnbd;
using Status = ParsedSize::Status;

namespace {
std::uint64_t bytes_of(std::string_view text) {
  const ParsedSize p = parse_qemu_size(text);
  REQUIRE_MESSAGE(p.ok(), text);
  return p.bytes;
}
Status status_of(std::string_view text) { return parse_qemu_size(text).status; }
}  // namespace

TEST_CASE("size: whole numbers and suffixes") {
  CHECK(bytes_of("0") == 0);
  CHECK(bytes_of("00") == 0);
  CHECK(bytes_of("010") == 10);  // decimal, not octal
  CHECK(bytes_of("4096") == 4096);
  CHECK(bytes_of("1b") == 1);
  CHECK(bytes_of("1B") == 1);
  CHECK(bytes_of("1k") == 1024);
  CHECK(bytes_of("1K") == 1024);
  CHECK(bytes_of("3m") == 3ull << 20);
  CHECK(bytes_of("1g") == 1ull << 30);
  CHECK(bytes_of("1T") == 1ull << 40);
  CHECK(bytes_of("2P") == 2ull << 50);
  CHECK(bytes_of("15E") == 15ull << 60);
  CHECK(bytes_of("18446744073709551615") == UINT64_MAX);
  CHECK(bytes_of(" 1k") == 1024);  // leading white space, as strtoull
  CHECK(bytes_of("+1") == 1);
}

TEST_CASE("size: fractions need a suffix and round to the nearest byte") {
  CHECK(bytes_of("1.5k") == 1536);
  CHECK(bytes_of("1.5K") == 1536);
  CHECK(bytes_of("1.k") == 1024);
  CHECK(bytes_of("1.000001k") == 1024);                 // 1024.001 bytes
  CHECK(bytes_of("1.0005k") == 1025);                   // 1024.512 bytes: half up
  CHECK(bytes_of("1.0004k") == 1024);                   // 1024.4096 bytes
  CHECK(bytes_of("0.999k") == 1023);                    // 1022.976 bytes
  CHECK(bytes_of("0.00048828125k") == 1);               // exactly half a byte
  CHECK(bytes_of("0.000732421875k") == 1);              // three quarters
  CHECK(bytes_of("0.0001k") == 0);                      // 0.1024 bytes
  CHECK(bytes_of("1.999999999999999999999k") == 1024);  // the fraction rounds to 1.0, which QEMU wraps to 0
  CHECK(bytes_of("4096.0") == 4096);
  CHECK(bytes_of("1.0b") == 1);
  CHECK(bytes_of("1.b") == 1);
  CHECK(bytes_of("0.5M") == 512 * 1024);
  CHECK(status_of("1.5") == Status::invalid);
  CHECK(status_of("0.5") == Status::invalid);
  CHECK(status_of("0.5b") == Status::invalid);
  CHECK(status_of(".5k") == Status::invalid);
  CHECK(status_of("1..5") == Status::invalid);
  CHECK(status_of("1.5e3k") == Status::invalid);  // no exponents
}

TEST_CASE("size: hex without a fraction, a suffix flagged as deprecated") {
  CHECK(bytes_of("0x10") == 16);
  CHECK(bytes_of("0X1") == 1);
  CHECK(bytes_of("  0x10") == 16);
  const ParsedSize p = parse_qemu_size("0x10k");
  CHECK(p.ok());
  CHECK(p.bytes == 16384);
  CHECK(p.hex_with_suffix);
  CHECK_FALSE(parse_qemu_size("0x10").hex_with_suffix);
  CHECK_FALSE(parse_qemu_size("16k").hex_with_suffix);
  CHECK(status_of("0x") == Status::invalid);
  CHECK(status_of("0x1.8k") == Status::invalid);
  CHECK(status_of("0x1p3") == Status::invalid);  // 'p' is a suffix, then a stray 3
}

TEST_CASE("size: what is refused, and what is out of range") {
  for (std::string_view bad :
       {"", " ", "k", "-1", " -1", "-0", "1k ", "1kB", "1e3", "1_000", "inf", "nan", "1 k", "x10", "1kk"}) {
    CHECK_MESSAGE(status_of(bad) == Status::invalid, bad);
  }
  CHECK(status_of(std::string_view("1k\0", 3)) == Status::invalid);
  CHECK(status_of("16E") == Status::out_of_range);
  CHECK(status_of("18446744073709551616") == Status::out_of_range);
  CHECK(status_of("16384P") == Status::out_of_range);
  CHECK(status_of("0x10000000000000000") == Status::out_of_range);
}
