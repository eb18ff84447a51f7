// DataRunCache (the data runs SEEK_HOLE reported, kept so a READ does not
// probe again) and PosixFile's use of it: a punched hole, a zeroed range or
// a truncation must never be reported as data afterwards.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "image/io/data_run_cache.hpp"
#include "image/io/file.hpp"
#include "image_test_support.hpp"

using namespace qnbd;
using namespace qnbd::image;

TEST_CASE("DataRunCache: lookups, merging, forgetting") {
  DataRunCache c;
  CHECK(c.run_end(0) == 0);
  c.add(100, 200, c.epoch());
  CHECK(c.run_end(99) == 0);
  CHECK(c.run_end(100) == 200);
  CHECK(c.run_end(199) == 200);
  CHECK(c.run_end(200) == 0);
  // Overlapping and touching runs merge into one.
  c.add(150, 300, c.epoch());
  c.add(300, 400, c.epoch());
  c.add(50, 100, c.epoch());
  CHECK(c.size() == 1);
  CHECK(c.run_end(50) == 400);
  c.add(1000, 2000, c.epoch());
  CHECK(c.size() == 2);
  // Outside every run: where the run before it ends (where a probe starts).
  CHECK(c.lookup(700).prev_end == 400);
  CHECK(c.lookup(700).run_end == 0);
  CHECK(c.lookup(10).prev_end == 0);
  CHECK(c.lookup(5000).prev_end == 2000);
  CHECK(c.lookup(1000).prev_end == 0);
  CHECK(c.run_end(999) == 0);
  CHECK(c.run_end(1500) == 2000);
  // A hole punched in the middle splits the run.
  c.forget(200, 250);
  CHECK(c.run_end(199) == 200);
  CHECK(c.run_end(200) == 0);
  CHECK(c.run_end(249) == 0);
  CHECK(c.run_end(250) == 400);
  // Truncation forgets everything past the new end.
  c.forget(1200, UINT64_MAX);
  CHECK(c.run_end(1100) == 1200);
  CHECK(c.run_end(1200) == 0);
}

TEST_CASE("DataRunCache: a probe that raced a hole punch is not cached") {
  DataRunCache c;
  const auto seen = c.epoch();  // the probe starts
  c.forget(0, 4096);            // a hole is punched meanwhile
  c.add(0, 1 << 20, seen);      // the probe's (possibly stale) answer arrives
  CHECK(c.run_end(0) == 0);
  CHECK(c.size() == 0);
}

TEST_CASE("DataRunCache: bounded; the shortest run goes first") {
  DataRunCache c;
  // Runs of length 10 at 0, 100, 200, ... (the one at 500: 60).
  for (std::uint64_t i = 0; i < DataRunCache::kCapacity; ++i) {
    c.add(i * 100, i * 100 + 10 + (i == 5 ? 50 : 0), c.epoch());
  }
  CHECK(c.size() == DataRunCache::kCapacity);
  c.add(1u << 30, (1u << 30) + 1000, c.epoch());
  CHECK(c.size() == DataRunCache::kCapacity);
  CHECK(c.run_end(1u << 30) == (1u << 30) + 1000);  // the new one is kept
  CHECK(c.run_end(500) == 560);                     // a longer one is kept
  std::size_t known = 0;
  for (std::uint64_t i = 0; i < DataRunCache::kCapacity; ++i) known += c.run_end(i * 100) != 0;
  CHECK(known == DataRunCache::kCapacity - 1);
}

TEST_CASE("DataRunCache: readers racing updates never see a run that was not added") {
  DataRunCache c;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> bad{0};
  // Runs are always [k * 4096, k * 4096 + 2048): any answer must be one of them.
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&, t] {
      std::uint64_t x = 12345 + t;
      while (!stop.load(std::memory_order_relaxed)) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        const std::uint64_t off = (x >> 20) % (4096 * 2000);
        const std::uint64_t end = c.run_end(off);
        if (end == 0) continue;
        const std::uint64_t run = off / 4096;
        if (off % 4096 >= 2048 || end != run * 4096 + 2048) bad.fetch_add(1);
      }
    });
  }
  for (int round = 0; round < 20; ++round) {
    for (std::uint64_t k = 0; k < 2000; k += 1 + round % 3) c.add(k * 4096, k * 4096 + 2048, c.epoch());
    c.forget(round * 4096 * 50, round * 4096 * 50 + 4096 * 300);
  }
  stop = true;
  for (auto& t : readers) t.join();
  CHECK(bad.load() == 0);
}

TEST_CASE("PosixFile: holes punched after a data run was learned are holes") {
  qnbd::test::TempDir d;
  auto created = create_posix_file(d / "f.img");
  REQUIRE(created.has_value());
  File& f = **created;
  std::vector<std::byte> data(1 << 20, std::byte{0x42});
  REQUIRE(f.pwrite(data, 0).has_value());
  REQUIRE(f.flush().has_value());
  auto e = f.probe_extent(4096, 4096);
  REQUIRE(e.has_value());
  CHECK_FALSE(e->hole);
  CHECK(e->length == 4096);
  // Learn the run, then punch holes three ways: each must show afterwards
  // (on file systems that report holes at all).
  REQUIRE(f.probe_extent(0, 1 << 20).has_value());
  REQUIRE(f.discard(64 * 1024, 64 * 1024).has_value());
  REQUIRE(f.write_zeroes_fast(256 * 1024, 64 * 1024, true).has_value());
  REQUIRE(f.truncate(768 * 1024).has_value());
  REQUIRE(f.truncate(1 << 20).has_value());
  auto h1 = f.probe_extent(64 * 1024, 4096);
  REQUIRE(h1.has_value());
  if (h1->hole) {
    CHECK(f.probe_extent(256 * 1024, 4096)->hole);
    CHECK(f.probe_extent(768 * 1024, 4096)->hole);
    CHECK_FALSE(f.probe_extent(0, 4096)->hole);
    CHECK(f.probe_extent(0, 1 << 20)->length == 64 * 1024);
    CHECK_FALSE(f.probe_extent(128 * 1024, 4096)->hole);
    CHECK(f.probe_extent(128 * 1024, 1 << 20)->length == 128 * 1024);
  }
  std::vector<std::byte> back(4096);
  REQUIRE(f.read_exact(back, 64 * 1024, "test").has_value());
  CHECK(back[0] == std::byte{0});
  REQUIRE(f.read_exact(back, 128 * 1024, "test").has_value());
  CHECK(back[0] == std::byte{0x42});
}
