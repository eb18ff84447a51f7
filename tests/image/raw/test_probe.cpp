// probe_format(): the format QEMU would open a file as, from its first
// sector. Each format's signature probes as that format, and a near miss
// (one field off) probes as raw; integration/test-serve-probed-raw.sh
// checks the same sectors against qemu-nbd itself.
#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "image/probe.hpp"

using namespace qnbd::image;

namespace {

using Sector = std::array<std::byte, kProbeSectorSize>;

Sector sector(std::string_view head, std::size_t at = 0) {
  Sector s{};
  std::memcpy(s.data() + at, head.data(), head.size());
  return s;
}

void put_le32(Sector& s, std::size_t at, std::uint32_t v) { std::memcpy(s.data() + at, &v, sizeof v); }

std::string probe(const Sector& s, std::string_view filename = {}) { return std::string(probe_format(s, filename)); }

std::string_view bin(const char* s, std::size_t n) { return {s, n}; }

}  // namespace

TEST_CASE("probe_format: nothing claims zeroes or text") {
  CHECK(probe(Sector{}) == "raw");
  CHECK(probe(sector("hello world\n")) == "raw");
  CHECK(probe(sector("\xeb\x63\x90")) == "raw");  // a boot sector's jump
}

TEST_CASE("probe_format: qcow2 and qcow by version") {
  CHECK(probe(sector(bin("QFI\xfb\0\0\0\3", 8))) == "qcow2");
  CHECK(probe(sector(bin("QFI\xfb\0\0\0\2", 8))) == "qcow2");
  CHECK(probe(sector(bin("QFI\xfb\0\0\1\0", 8))) == "qcow2");  // an unknown higher version is still qcow2's
  CHECK(probe(sector(bin("QFI\xfb\0\0\0\1", 8))) == "qcow");
  CHECK(probe(sector(bin("QFI\xfb\0\0\0\0", 8))) == "raw");
  CHECK(probe(sector(bin("QFI\xfa\0\0\0\3", 8))) == "raw");
}

TEST_CASE("probe_format: magics of 4 to 8 bytes") {
  CHECK(probe(sector(bin("QED\0", 4))) == "qed");
  CHECK(probe(sector("QEDx")) == "raw");
  CHECK(probe(sector("KDMV")) == "vmdk");
  CHECK(probe(sector("COWD")) == "vmdk");
  CHECK(probe(sector("conectix")) == "vpc");
  CHECK(probe(sector("conectiX")) == "raw");
  CHECK(probe(sector("vhdxfile")) == "vhdx");
  CHECK(probe(sector("vhdxfil")) == "raw");
  CHECK(probe(sector(bin("LUKS\xba\xbe\0\1", 8))) == "luks");
  CHECK(probe(sector(bin("LUKS\xba\xbe\0\2", 8))) == "raw");
}

TEST_CASE("probe_format: vdi's signature after its text") {
  Sector s = sector("<<< QEMU VM Virtual Disk Image >>>\n");
  CHECK(probe(s) == "raw");
  put_le32(s, 64, 0xbeda107f);
  CHECK(probe(s) == "vdi");
  put_le32(s, 64, 0xbeda107e);
  CHECK(probe(s) == "raw");
}

TEST_CASE("probe_format: parallels needs version 2") {
  for (std::string_view magic : {"WithoutFreeSpace", "WithouFreSpacExt"}) {
    CAPTURE(magic);
    Sector s = sector(magic);
    CHECK(probe(s) == "raw");
    put_le32(s, 16, 2);
    CHECK(probe(s) == "parallels");
    put_le32(s, 16, 1);
    CHECK(probe(s) == "raw");
  }
}

TEST_CASE("probe_format: bochs compares C strings and two versions") {
  auto make = [](std::uint32_t version) {
    Sector s = sector("Bochs Virtual HD Image");
    std::memcpy(s.data() + 32, "Redolog", 7);
    std::memcpy(s.data() + 48, "Growing", 7);
    put_le32(s, 64, version);
    return s;
  };
  CHECK(probe(make(0x00020000)) == "bochs");
  CHECK(probe(make(0x00010000)) == "bochs");
  CHECK(probe(make(0x00030000)) == "raw");
  Sector longer = make(0x00020000);
  longer[22] = std::byte{'!'};  // the magic field no longer ends where the string does
  CHECK(probe(longer) == "raw");
}

TEST_CASE("probe_format: cloop's shell header and dmg's file name") {
  const std::string_view cloop =
      "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
  CHECK(probe(sector(cloop)) == "cloop");
  CHECK(probe(sector(cloop.substr(0, cloop.size() - 1))) == "raw");
  CHECK(probe(Sector{}, "disk.dmg") == "dmg");
  CHECK(probe(Sector{}, ".dmg") == "raw");  // the name must be longer than the suffix
  CHECK(probe(Sector{}, "disk.img") == "raw");
  // A real signature beats the file name's guess.
  CHECK(probe(sector(bin("QFI\xfb\0\0\0\3", 8)), "disk.dmg") == "qcow2");
}

TEST_CASE("probe_format: vmdk text descriptors") {
  CHECK(probe(sector("# Disk DescriptorFile\nversion=1\n")) == "vmdk");
  CHECK(probe(sector("version=2\n")) == "vmdk");
  CHECK(probe(sector("version=3\r\n")) == "vmdk");
  CHECK(probe(sector("# a\n#b\n   \n  \r\nversion=1\n")) == "vmdk");  // comments and blank lines of spaces
  CHECK(probe(sector("version=4\n")) == "raw");
  CHECK(probe(sector("version=1")) == "raw");        // no line end
  CHECK(probe(sector("\nversion=1\n")) == "raw");    // an empty line is not a blank one
  CHECK(probe(sector(" x\nversion=1\n")) == "raw");  // nor is text after spaces
  CHECK(probe(sector("CID=1\nversion=1\n")) == "raw");
  // A comment that runs to the end of the sector.
  Sector comment{};
  comment.fill(std::byte{'x'});
  comment[0] = std::byte{'#'};
  CHECK(probe(comment) == "raw");
  // The version line at the very end of the sector.
  Sector tail{};
  tail.fill(std::byte{' '});
  const std::string_view line = "version=1\n";
  for (std::size_t i = 0; i + line.size() < tail.size(); i += 4) tail[i + 3] = std::byte{'\n'};
  std::memcpy(tail.data() + tail.size() - line.size(), line.data(), line.size());
  tail[tail.size() - line.size() - 1] = std::byte{'\n'};
  CHECK(probe(tail) == "vmdk");
}
