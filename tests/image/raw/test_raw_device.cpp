// The raw driver: block status on a sparse host file, and the probed-raw
// guard that keeps a guest from making the first sector probe as another
// format.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>

#include "image/block_device.hpp"
#include "image/io/mem_file.hpp"
#include "image/raw/raw_device.hpp"
#include "image_test_support.hpp"

using namespace qnbd;
using namespace qnbd::image;

TEST_CASE("RawDevice: holes are zero and present, data is data") {
  qnbd::test::TempDir d;
  {
    auto c = create_posix_file(d / "r.raw");
    REQUIRE(c.has_value());
    REQUIRE((*c)->truncate(1 << 20).has_value());
    std::vector<std::byte> data(64 * 1024, std::byte{1});
    REQUIRE((*c)->pwrite(data, 512 * 1024).has_value());
  }
  OpenOptions o;
  o.format = ImageFormat::raw;
  auto dev = open_image(d / "r.raw", o);
  REQUIRE(dev.has_value());
  CHECK(std::string((*dev)->format()) == "raw");
  CHECK((*dev)->size() == (1u << 20));
  std::array<Extent, 8> ext;
  auto n = (*dev)->block_status(0, 1 << 20, ext);
  REQUIRE(n.has_value());
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < *n; ++i) {
    total += ext[i].length;
    CHECK(ext[i].depth == 1);
    CHECK(ext[i].allocated != ext[i].zero);
  }
  CHECK(total == (1u << 20));
  // Read-only: writes fail with EROFS.
  std::vector<std::byte> w(512);
  CHECK((*dev)->write(w, 0, false).error().code == EROFS);
  // Writable with discard=unmap.
  o.read_only = false;
  o.discard_unmap = true;
  auto rw = open_image(d / "r.raw", o);
  REQUIRE(rw.has_value());
  CHECK((*rw)->capabilities().can_trim);
  REQUIRE((*rw)->write(w, 4096, true).has_value());
  REQUIRE((*rw)->discard(512 * 1024, 64 * 1024, {}).has_value());
  std::vector<std::byte> back(64 * 1024);
  REQUIRE((*rw)->read(back, 512 * 1024).has_value());
  CHECK(std::all_of(back.begin(), back.end(), [](std::byte b) { return b == std::byte{0}; }));
  CHECK_FALSE((*rw)->read(back, (1 << 20) - 10).has_value());
  // Fast zeroing: fallocate on a real file; a MemFile has no fast path.
  ZeroFlags fast;
  fast.fast_only = true;
  auto fz = (*rw)->write_zeroes(0, 8192, fast);
  if (!fz) CHECK(fz.error().code == ENOTSUP);
  RawDevice mem(std::make_unique<MemFile>("m", std::vector<std::byte>(8192, std::byte{1})), 8192, o);
  CHECK(mem.write_zeroes(0, 4096, fast).error().code == ENOTSUP);
  ZeroFlags slow;
  REQUIRE(mem.write_zeroes(0, 4096, slow).has_value());
  REQUIRE(mem.read(std::span(back).first(4096), 0).has_value());
  CHECK(back[0] == std::byte{0});
}

TEST_CASE("RawDevice probed: no change may make the first sector probe as another format") {
  OpenOptions o;
  o.read_only = false;
  o.discard_unmap = true;
  auto bytes = [](std::string_view s) {
    return std::vector<std::byte>(reinterpret_cast<const std::byte*>(s.data()),
                                  reinterpret_cast<const std::byte*>(s.data()) + s.size());
  };
  auto sector = [&](std::string_view s) {
    auto b = bytes(s);
    b.resize(512);
    return b;
  };
  RawDevice probed(std::make_unique<MemFile>("p", std::vector<std::byte>(4096)), 4096, o, true);
  RawDevice given(std::make_unique<MemFile>("g", std::vector<std::byte>(4096)), 4096, o, false);
  CHECK(probed.capabilities().min_block == 512);
  CHECK(given.capabilities().min_block == 1);
  // Whole-sector headers of formats QEMU probes, as qemu-nbd refuses them
  // (integration/test-serve-probed-raw.sh compares the two servers).
  for (std::string_view head :
       {std::string_view("QFI\xfb\0\0\0\3", 8), std::string_view("QFI\xfb\0\0\0\1", 8), std::string_view("KDMV"),
        std::string_view("# Disk DescriptorFile\nversion=1\n"), std::string_view("conectix"),
        std::string_view("vhdxfile"), std::string_view("QED\0", 4), std::string_view("LUKS\xba\xbe\0\1", 8)}) {
    CAPTURE(head);
    auto r = probed.write(sector(head), 0, false);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == EPERM);
    CHECK(given.write(sector(head), 0, false).has_value());
  }
  // The qcow2 magic with version 0 probes as raw in QEMU too: allowed.
  REQUIRE(probed.write(sector(std::string_view("QFI\xfb\0\0\0\0", 8)), 0, false).has_value());
  // In pieces: with the version already in place, the piece that would
  // complete the magic is refused, wherever it lands.
  REQUIRE(probed.write(sector(std::string_view("QF\0\0\0\0\0\3", 8)), 0, false).has_value());
  CHECK(probed.write(bytes("I\xfb"), 2, false).error().code == EPERM);
  REQUIRE(probed.write(bytes("I!"), 2, false).has_value());
  CHECK(probed.write(bytes("\xfb"), 3, false).error().code == EPERM);
  // A vmdk descriptor finished by its version line.
  REQUIRE(probed.write(sector("# Disk DescriptorFile\n"), 0, false).has_value());
  CHECK(probed.write(bytes("version=1\n"), 22, false).error().code == EPERM);
  // Zeroes can complete a signature that holds a NUL ("QED\0"): a zeroing
  // and, with --discard=unmap, a TRIM (a punched hole reads as zeroes).
  REQUIRE(probed.write(sector("QEDx"), 0, false).has_value());
  ZeroFlags zero;
  CHECK(probed.write_zeroes(3, 1, zero).error().code == EPERM);
  CHECK(probed.discard(3, 1, {}).error().code == EPERM);
  REQUIRE(probed.write_zeroes(0, 4096, zero).has_value());  // all zeroes: raw
  // Past the first sector anything goes; an ordinary sector 0 write works.
  REQUIRE(probed.write(bytes("KDMV"), 512, false).has_value());
  REQUIRE(probed.write(bytes("boot"), 0, false).has_value());
  std::vector<std::byte> back(4);
  REQUIRE(probed.read(back, 0).has_value());
  CHECK(back == bytes("boot"));
  REQUIRE(probed.read(back, 512).has_value());
  CHECK(back == bytes("KDMV"));
}
