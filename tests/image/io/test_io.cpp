// The File implementations: PosixFile (short I/O loops, holes, zeroing) and
// MemFile.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>

#include "image/io/mem_file.hpp"
#include "image/io/range_file.hpp"
#include "image_test_support.hpp"

using namespace qnbd;
using namespace qnbd::image;

TEST_CASE("MemFile: reads past EOF are short, writes grow, discard zeroes") {
  MemFile f;
  std::vector<std::byte> w(100, std::byte{7});
  REQUIRE(f.pwrite(w, 50).has_value());
  CHECK(*f.size() == 150);
  std::vector<std::byte> r(200);
  CHECK(*f.pread(r, 0) == 150);
  CHECK(r[49] == std::byte{0});
  CHECK(r[50] == std::byte{7});
  REQUIRE(f.discard(60, 10).has_value());
  REQUIRE(f.pread(std::span(r).first(20), 55).has_value());
  CHECK(r[4] == std::byte{7});
  CHECK(r[5] == std::byte{0});
  CHECK(r[15] == std::byte{7});
  CHECK(f.truncate(1ull << 40).error().code == EFBIG);
}

TEST_CASE("MemFile: an empty read of an empty file is fine (UBSan: no memcpy from null)") {
  // Found by the check fuzz target: a zero-length pread on an empty MemFile
  // passed null pointers to memcpy.
  MemFile f;
  std::span<std::byte> none;
  auto r = f.pread(none, 0);
  REQUIRE(r);
  CHECK(*r == 0);
  std::vector<std::byte> one(1);
  REQUIRE(f.pwrite(one, 0));
  r = f.pread(none, 0);
  REQUIRE(r);
  CHECK(*r == 0);
}

TEST_CASE("PosixFile: read/write/zero/holes on a real file") {
  qnbd::test::TempDir d;
  auto created = create_posix_file(d / "f.img");
  REQUIRE(created.has_value());
  File& f = **created;
  REQUIRE(f.truncate(1 << 20).has_value());
  std::vector<std::byte> data(64 * 1024, std::byte{0x42});
  REQUIRE(f.pwrite(data, 256 * 1024).has_value());
  REQUIRE(f.flush().has_value());
  CHECK(*f.size() == (1u << 20));
  // SEEK_DATA/SEEK_HOLE: the start is a hole up to the data.
  auto e = f.probe_extent(0, 1 << 20);
  REQUIRE(e.has_value());
  if (e->hole) {  // some filesystems report no holes at all; then it is data
    CHECK(e->length == 256 * 1024);
    auto e2 = f.probe_extent(256 * 1024, 1 << 20);
    CHECK_FALSE(e2->hole);
    CHECK(e2->length >= 64 * 1024);
    CHECK(*f.is_hole(0, 4096));
    CHECK_FALSE(*f.is_hole(256 * 1024, 4096));
  }
  CHECK(f.probe_extent(2 << 20, 100)->hole);  // past EOF
  // write_zeroes with unmap punches a hole; the data reads back as zeroes.
  REQUIRE(f.write_zeroes(256 * 1024, 4096, true).has_value());
  std::vector<std::byte> back(8192);
  REQUIRE(f.read_exact(back, 256 * 1024, "test").has_value());
  CHECK(back[0] == std::byte{0});
  CHECK(back[4095] == std::byte{0});
  CHECK(back[4096] == std::byte{0x42});
  CHECK(*f.size() == (1u << 20));
  // read_exact past EOF names the defect.
  auto bad = f.read_exact(back, (1 << 20) - 10, "thing");
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().message.find("thing") != std::string::npos);

  auto missing = open_posix_file(d / "nope", OpenMode::read_only);
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code == ENOENT);
}

TEST_CASE("PosixFile: cache=none handles unaligned requests") {
  qnbd::test::TempDir d;
  {
    auto c = create_posix_file(d / "direct.img");
    REQUIRE(c.has_value());
    std::vector<std::byte> data(3 * 4096);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = std::byte(i % 251);
    REQUIRE((*c)->pwrite(data, 0).has_value());
  }
  auto f = open_posix_file(d / "direct.img", OpenMode::read_write, CacheMode::none);
  REQUIRE(f.has_value());
  std::vector<std::byte> buf(1000);
  REQUIRE((*f)->read_exact(buf, 123, "unaligned").has_value());
  CHECK(buf[0] == std::byte(123 % 251));
  std::vector<std::byte> w(10, std::byte{0xfe});
  REQUIRE((*f)->pwrite(w, 4095).has_value());
  REQUIRE((*f)->read_exact(std::span(buf).first(12), 4094, "unaligned").has_value());
  CHECK(buf[1] == std::byte{0xfe});
  CHECK(buf[11] == std::byte((4094 + 11) % 251));
  REQUIRE((*f)->flush().has_value());
}

TEST_CASE("RangeFile: a fixed range of a file reads, writes and probes only inside it") {
  std::vector<std::byte> init(64 * 1024);
  for (std::size_t i = 0; i < init.size(); ++i) init[i] = std::byte(static_cast<std::uint8_t>(i / 256));
  auto owned = std::make_unique<MemFile>("inner", init);
  MemFile& inner = *owned;
  RangeFile f(std::move(owned), 4096, 8192);
  CHECK(*f.size() == 8192);
  std::vector<std::byte> r(1000);
  REQUIRE(*f.pread(r, 0) == 1000);
  CHECK(r[0] == std::byte{16});     // inner byte 4096
  CHECK(*f.pread(r, 8000) == 192);  // the end of the range is an end of file
  CHECK(*f.pread(r, 9000) == 0);
  std::vector<std::byte> w(100, std::byte{0xaa});
  REQUIRE(f.pwrite(w, 8092).has_value());
  CHECK(inner.contents()[4096 + 8092] == std::byte{0xaa});
  // Nothing above may reach past the range: ENOSPC, as QEMU's raw node.
  auto before = inner.contents();
  CHECK(f.pwrite(w, 8093).error().code == ENOSPC);
  CHECK(f.write_zeroes(8000, 1000, false).error().code == ENOSPC);
  CHECK(f.discard(9000, 1).error().code == ENOSPC);
  CHECK(f.truncate(4096).error().code == ENOTSUP);
  CHECK(inner.contents() == before);
  auto e = f.probe_extent(9000, 512);
  REQUIRE(e);
  CHECK(e->hole);
  e = f.probe_extent(8000, 4096);
  REQUIRE(e);
  CHECK(e->length <= 192);
}

TEST_CASE("RangeFile: without a size the range runs to the end of the file and grows with it") {
  auto owned = std::make_unique<MemFile>("inner", std::vector<std::byte>(10000, std::byte{1}));
  MemFile& inner = *owned;
  RangeFile f(std::move(owned), 1000, std::nullopt);
  CHECK(*f.size() == 9000);
  std::vector<std::byte> w(100, std::byte{2});
  REQUIRE(f.pwrite(w, 9000).has_value());
  CHECK(*inner.size() == 10100);
  CHECK(*f.size() == 9100);
  REQUIRE(f.truncate(500).has_value());
  CHECK(*inner.size() == 1500);
  RangeFile past(std::make_unique<MemFile>("small", std::vector<std::byte>(10)), 100, std::nullopt);
  CHECK(*past.size() == 0);
}
