// Option-phase helpers shared by the Negotiator tests (test_negotiator.cpp,
// test_negotiator_tls.cpp): client options and server option replies written
// out field by field from NBD proto.md "Option haggling" and "Option reply",
// independent of the encoders under test.
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "protocol/constants.hpp"
#include "test_helpers.hpp"

namespace qnbd::test {

// A client option: IHAVEOPT, option code, data length, data.
inline Bytes option(std::uint32_t code, const Bytes& data = {}) {
  return Bytes().u64(protocol::IHAVEOPT).u32(code).u32(static_cast<std::uint32_t>(data.v.size())).add(data);
}

// The data of NBD_OPT_INFO / NBD_OPT_GO: name length, name, number of
// information requests, the requests.
inline Bytes info_go_data(std::string_view name, const std::vector<std::uint16_t>& reqs = {}) {
  Bytes d;
  d.u32(static_cast<std::uint32_t>(name.size())).str(name).u16(static_cast<std::uint16_t>(reqs.size()));
  for (auto r : reqs) d.u16(r);
  return d;
}

// One option reply as parsed from the server's bytes. Error replies carry a
// message; tests compare the header fields and look at data where it counts.
struct Rep {
  std::uint32_t opt, type;
  std::vector<std::byte> data;
};

// The option replies in `b` from offset `from` (18, after the greeting) to
// the end: everything there must be a whole option reply, unless
// `other_may_follow`, where parsing stops at the first bytes that do not
// start one (the reply to NBD_OPT_EXPORT_NAME, which has no header).
inline std::vector<Rep> parse_replies(const std::vector<std::byte>& b, std::size_t from,
                                      bool other_may_follow = false) {
  std::vector<Rep> out;
  auto be = [&](std::size_t at, int n) {
    std::uint64_t x = 0;
    for (int i = 0; i < n; ++i) x = (x << 8) | std::to_integer<std::uint8_t>(b.at(at + i));
    return x;
  };
  while (from < b.size()) {
    if (other_may_follow && (from + 20 > b.size() || be(from, 8) != protocol::NBD_REP_MAGIC)) break;
    REQUIRE(be(from, 8) == protocol::NBD_REP_MAGIC);
    Rep r{static_cast<std::uint32_t>(be(from + 8, 4)), static_cast<std::uint32_t>(be(from + 12, 4)), {}};
    auto len = be(from + 16, 4);
    REQUIRE(from + 20 + len <= b.size());
    r.data.assign(b.begin() + static_cast<long>(from + 20), b.begin() + static_cast<long>(from + 20 + len));
    out.push_back(r);
    from += 20 + len;
  }
  return out;
}

}  // namespace qnbd::test
