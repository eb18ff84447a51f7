// OffsetDevice (qemu-nbd -o): requests shifted by the offset, none past
// either end, block status of the top layer alone, no bitmaps.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "image/io/mem_file.hpp"
#include "image/offset_device.hpp"
#include "image/raw/raw_device.hpp"

using namespace qnbd;
using namespace qnbd::image;

namespace {

std::shared_ptr<BlockDevice> raw_of(std::vector<std::byte> bytes, bool probed = false) {
  OpenOptions o;
  o.read_only = false;
  const std::uint64_t size = bytes.size();
  return std::make_shared<RawDevice>(std::make_unique<MemFile>("m", std::move(bytes)), size, o, probed);
}

}  // namespace

TEST_CASE("OffsetDevice: reads and writes land the offset further in") {
  std::vector<std::byte> bytes(8192);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::byte(i / 512);
  auto inner = raw_of(bytes);
  auto dev = offset_device(inner, 1024, "m");
  REQUIRE(dev.has_value());
  CHECK((*dev)->size() == 8192 - 1024);
  std::array<std::byte, 4> got{};
  REQUIRE((*dev)->read(got, 0).has_value());
  CHECK(got[0] == std::byte{2});
  const std::array<std::byte, 4> w{std::byte{0xee}, std::byte{0xee}, std::byte{0xee}, std::byte{0xee}};
  REQUIRE((*dev)->write(w, 512, false).has_value());
  REQUIRE(inner->read(got, 1536).has_value());
  CHECK(got == w);
  REQUIRE((*dev)->write_zeroes(7168 - 512, 512, ZeroFlags{}).has_value());
  REQUIRE(inner->read(got, 8192 - 512).has_value());
  CHECK(std::all_of(got.begin(), got.end(), [](std::byte b) { return b == std::byte{0}; }));
  REQUIRE(inner->read(got, 8192 - 1024).has_value());
  CHECK(got[0] == std::byte{14});  // the sector before was not touched
}

TEST_CASE("OffsetDevice: nothing past its end reaches the inner device") {
  auto inner = raw_of(std::vector<std::byte>(8192, std::byte{7}));
  auto dev = *offset_device(inner, 4096, "m");
  std::array<std::byte, 512> buf{};
  CHECK(dev->read(buf, 4096 - 256).error().code == EINVAL);
  CHECK(dev->write(buf, 4096, false).error().code == EINVAL);
  CHECK(dev->write_zeroes(0, 4097, ZeroFlags{}).error().code == EINVAL);
  CHECK(dev->discard(~0ull - 100, 200, {}).error().code == EINVAL);
  std::array<Extent, 4> ext;
  CHECK(dev->block_status(4000, 200, ext).error().code == EINVAL);
  std::array<std::byte, 512> back{};
  REQUIRE(inner->read(back, 7680).has_value());
  CHECK(back[0] == std::byte{7});
}

TEST_CASE("OffsetDevice: QEMU's checks, minimum block 1, no bitmaps") {
  auto inner = raw_of(std::vector<std::byte>(4096), true);
  CHECK(inner->capabilities().min_block == 512);
  auto past = offset_device(inner, 4608, "img");
  REQUIRE_FALSE(past.has_value());
  CHECK(past.error().message == "img: Offset (4608) cannot be greater than size of the containing file (4096)");
  CHECK_FALSE(offset_device(inner, 1000, "img").has_value());
  auto all = offset_device(inner, 4096, "img");
  REQUIRE(all.has_value());
  CHECK((*all)->size() == 0);
  auto dev = *offset_device(inner, 512, "img");
  CHECK(dev->capabilities().min_block == 1);
  CHECK(dev->export_bitmap("b0").error().message == "Bitmap 'b0' is not found");
  std::array<Extent, 4> ext;
  auto n = dev->block_status(0, 3584, ext);
  REQUIRE(n.has_value());
  REQUIRE(*n == 1);
  CHECK(ext[0].length == 3584);
  CHECK(ext[0].depth == 1);
}
