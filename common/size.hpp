// QEMU's size syntax, as qemu-img and qemu-nbd read every size on their
// command lines and in option strings (QEMU 7.2's qemu_strtosz: cvtnum for
// qemu-img's sizes and counts, QemuOpts and QAPI "size" parameters such as a
// raw node's offset/size). One parser here, so that every qnbd command
// accepts and refuses what the qemu tool of the same name does.
//
// Syntax: optional leading white space and '+'; a decimal integer with an
// optional fraction ("1.5k"; "1.k" is 1k), or a hex integer ("0x10", no
// fraction); then an optional suffix b, k, M, G, T, P or E (either case,
// powers of 1024), and nothing after it. A fraction needs a suffix that
// scales it to whole bytes ("1.5" is refused, "4096.0" is 4096) and is
// rounded to the nearest byte, half up; an exponent is refused ("1.5e3k").
#pragma once

#include <cstdint>
#include <string_view>

namespace qnbd {

struct ParsedSize {
  enum class Status {
    ok,
    invalid,       // not the syntax above (QEMU: -EINVAL)
    out_of_range,  // the syntax, but 2^64 or more bytes (QEMU: -ERANGE)
  };
  Status status = Status::invalid;
  std::uint64_t bytes = 0;
  // "0x10k": accepted, but QEMU warns that a suffix on a hex number is
  // deprecated; callers print the same warning.
  bool hex_with_suffix = false;

  [[nodiscard]] bool ok() const { return status == Status::ok; }
};

[[nodiscard]] ParsedSize parse_qemu_size(std::string_view text);

}  // namespace qnbd
