#include "common/size.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>

namespace qnbd {
namespace {

// The multiplier of a size suffix, 0 for none.
std::uint64_t suffix_multiplier(char c) {
  switch (c) {
    case 'b':
    case 'B': return 1;
    case 'k':
    case 'K': return 1ull << 10;
    case 'm':
    case 'M': return 1ull << 20;
    case 'g':
    case 'G': return 1ull << 30;
    case 't':
    case 'T': return 1ull << 40;
    case 'p':
    case 'P': return 1ull << 50;
    case 'e':
    case 'E': return 1ull << 60;
    default: return 0;
  }
}

// strtoull on [pos, end of text) in `base`: true and the value when at least
// one digit was read and the value fits in 64 bits (false with *range set
// when it does not). `pos` is moved past what was read.
bool parse_integer(const std::string& text, std::size_t& pos, int base, std::uint64_t& value, bool& range) {
  const char* start = text.c_str() + pos;
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(start, &end, base);
  if (end == start) return false;
  if (errno == ERANGE) {
    range = true;
    return false;
  }
  pos += static_cast<std::size_t>(end - start);
  value = v;
  return true;
}

}  // namespace

ParsedSize parse_qemu_size(std::string_view view) {
  ParsedSize r;
  // A NUL inside the text ends it for QEMU's C parser, and what follows is
  // then "trailing garbage": refuse it the same way.
  if (view.find('\0') != std::string_view::npos) return r;
  const std::string text(view);
  std::size_t pos = 0;
  std::uint64_t integral = 0;
  bool range = false;
  if (!parse_integer(text, pos, 10, integral, range)) {
    if (range) r.status = ParsedSize::Status::out_of_range;
    return r;
  }
  // strtoull takes "-1" as 2^64 - 1; a size is never negative.
  if (text.find('-') < pos) return r;
  bool hex = false;
  double fraction = 0;  // in [0, 1)
  if (integral == 0 && pos < text.size() && (text[pos] == 'x' || text[pos] == 'X')) {
    // "0x...": read again as hex, and no fraction may follow.
    hex = true;
    pos = 0;
    if (!parse_integer(text, pos, 16, integral, range)) {
      if (range) r.status = ParsedSize::Status::out_of_range;
      return r;
    }
    if (pos < text.size() && text[pos] == '.') return r;
  } else if (pos < text.size() && text[pos] == '.') {
    // A fraction: ".5" (or "." alone, as in "1.k"). With an exponent the
    // whole text is refused.
    const char* start = text.c_str() + pos;
    char* end = nullptr;
    errno = 0;
    const double f = std::strtod(start, &end);
    if (end == start || errno == ERANGE || !std::isfinite(f)) {
      pos++;  // just the '.'
    } else {
      if (std::string_view(start, static_cast<std::size_t>(end - start)).find_first_of("eE") !=
          std::string_view::npos) {
        return r;
      }
      // Digits after the point below 1 (".999..." can round to 1.0, which
      // QEMU's 64-bit fixed-point fraction wraps to 0).
      fraction = f < 1.0 ? f : 0.0;
      pos += static_cast<std::size_t>(end - start);
    }
  }
  std::uint64_t multiplier = pos < text.size() ? suffix_multiplier(text[pos]) : 0;
  if (multiplier) {
    r.hex_with_suffix = hex;
    pos++;
  } else {
    multiplier = 1;
  }
  if (pos != text.size()) return r;
  // The fraction as a 64-bit fixed-point number, scaled exactly: 0.5 of a
  // byte or more rounds up, as QEMU does.
  const auto fixed = static_cast<std::uint64_t>(std::ldexp(fraction, 64));
  if (multiplier == 1) {
    if (fixed != 0) return r;  // "1.5": a fraction needs a suffix
    r.bytes = integral;
    r.status = ParsedSize::Status::ok;
    return r;
  }
  const unsigned __int128 whole = static_cast<unsigned __int128>(integral) * multiplier;
  const unsigned __int128 part = static_cast<unsigned __int128>(fixed) * multiplier;  // 64.64 fixed point
  const unsigned __int128 bytes = whole + (part >> 64) + ((part >> 63) & 1);
  if (bytes >> 64) {
    r.status = ParsedSize::Status::out_of_range;
    return r;
  }
  r.bytes = static_cast<std::uint64_t>(bytes);
  r.status = ParsedSize::Status::ok;
  return r;
}

}  // namespace qnbd
