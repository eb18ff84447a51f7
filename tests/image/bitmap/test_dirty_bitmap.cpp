// DirtyBitmap against a naive per-granule model: random set/clear/merge, run
// queries from arbitrary offsets, and the serialized (qcow2.txt "Bitmap data")
// byte order.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "image/bitmap/dirty_bitmap.hpp"

using qnbd::image::DirtyBitmap;

namespace {

struct Model {
  std::uint64_t size, g;
  std::vector<bool> bits;
  Model(std::uint64_t s, std::uint64_t gran) : size(s), g(gran), bits((s + gran - 1) / gran) {}
  void set(std::uint64_t off, std::uint64_t len, bool v) {
    if (len == 0 || off >= size) return;
    std::uint64_t end = std::min(size, off + len);
    for (std::uint64_t k = off / g; k <= (end - 1) / g; ++k) bits[k] = v;
  }
  bool at(std::uint64_t off) const { return bits[off / g]; }
};

struct Ext {
  std::uint64_t length = 0;
  bool dirty = false;
};

// Every run reported from `offset` must match the model byte for byte,
// consecutive runs must differ, and runs must end on granule boundaries.
void check_runs(const DirtyBitmap& b, const Model& m, std::uint64_t offset, std::uint64_t length) {
  std::vector<Ext> out(4096);
  std::size_t n = b.runs(offset, length, std::span<Ext>(out));
  std::uint64_t end = std::min(m.size, offset + length);
  std::uint64_t pos = offset;
  for (std::size_t i = 0; i < n; ++i) {
    REQUIRE(out[i].length > 0);
    if (i > 0) CHECK(out[i].dirty != out[i - 1].dirty);
    std::uint64_t run_end = pos + out[i].length;
    REQUIRE(run_end <= end);
    if (run_end != end) CHECK(run_end % m.g == 0);
    for (std::uint64_t k = pos / m.g; k * m.g < run_end; ++k) REQUIRE(m.bits[k] == out[i].dirty);
    pos = run_end;
  }
  if (n < out.size()) CHECK(pos == end);
}

}  // namespace

TEST_CASE("DirtyBitmap: create validates granularity and bounds the size") {
  CHECK(!DirtyBitmap::create(1 << 20, 3));
  CHECK(!DirtyBitmap::create(1 << 20, 0));
  CHECK(!DirtyBitmap::create(~0ull, 512));  // 2^55 bits
  auto b = DirtyBitmap::create(1000, 512);
  REQUIRE(b);
  CHECK(b->bit_count() == 2);
  CHECK(b->byte_count() == 1);
  auto empty = DirtyBitmap::create(0, 65536);
  REQUIRE(empty);
  CHECK(empty->bit_count() == 0);
  CHECK(empty->run(0, 100).length == 0);
}

TEST_CASE("DirtyBitmap: partial granules dirty the whole granule, clipped at the end") {
  auto b = DirtyBitmap::create(10000, 4096).value();
  b.set_range(4095, 2);  // touches granules 0 and 1
  CHECK(b.is_dirty(0));
  CHECK(b.is_dirty(8191));
  CHECK(!b.is_dirty(8192));
  CHECK(b.count_dirty() == 2);
  auto r = b.run(100, 1 << 20);
  CHECK(r.dirty);
  CHECK(r.length == 8192 - 100);
  r = b.run(8192, 1 << 20);
  CHECK(!r.dirty);
  CHECK(r.length == 10000 - 8192);  // clipped at the device end
  b.set_range(9999, 100);
  CHECK(b.run(8192, ~0ull).length == 10000 - 8192);
  CHECK(b.run(8192, ~0ull).dirty);
  b.clear_range(0, 1);
  CHECK(!b.is_dirty(4095));
  b.reset();
  CHECK(b.count_dirty() == 0);
  b.set_all();
  CHECK(b.count_dirty() == 3);
}

TEST_CASE("DirtyBitmap: random operations match a per-granule model") {
  std::mt19937_64 rng(12345);
  for (std::uint64_t g : {512ull, 4096ull, 65536ull}) {
    for (std::uint64_t size : {g * 64, g * 1000 + 512, g * 200 + g / 2, std::uint64_t{512}}) {
      auto b = DirtyBitmap::create(size, g).value();
      Model m(size, g);
      for (int op = 0; op < 300; ++op) {
        std::uint64_t off = rng() % size;
        std::uint64_t len = rng() % (rng() % 4 == 0 ? size : g * 3 + 1);
        bool v = rng() % 3 != 0;
        if (v) {
          b.set_range(off, len);
        } else {
          b.clear_range(off, len);
        }
        m.set(off, len, v);
        if (op % 10 == 0) {
          std::uint64_t q = rng() % size;
          check_runs(b, m, q, rng() % (size + 1) + 1);
          CHECK(b.is_dirty(q) == m.at(q));
        }
      }
      check_runs(b, m, 0, size);
      std::uint64_t count = 0;
      for (bool x : m.bits) count += x;
      CHECK(b.count_dirty() == count);
    }
  }
}

TEST_CASE("DirtyBitmap: runs stop when the output fills") {
  auto b = DirtyBitmap::create(64 * 512, 512).value();
  for (int k = 0; k < 64; k += 2) b.set_range(std::uint64_t(k) * 512, 1);
  std::vector<Ext> out(5);
  CHECK(b.runs(0, 64 * 512, std::span<Ext>(out)) == 5);
  CHECK(out[0].dirty);
  CHECK(out[4].dirty);
  CHECK(out[4].length == 512);
}

TEST_CASE("DirtyBitmap: merge with equal and different granularities") {
  auto a = DirtyBitmap::create(1 << 20, 4096).value();
  auto b = DirtyBitmap::create(1 << 20, 65536).value();
  auto c = DirtyBitmap::create(1 << 20, 512).value();
  auto d = DirtyBitmap::create(2 << 20, 512).value();
  b.set_range(70000, 1);  // granule 1 of b: [65536, 131072)
  c.set_range(5000, 1);   // [4608, 5120) -> granule 1 of a
  REQUIRE(a.merge(b));
  REQUIRE(a.merge(c));
  CHECK(!a.merge(d));
  CHECK(a.count_dirty() == 16 + 1);
  CHECK(a.is_dirty(65536));
  CHECK(a.is_dirty(131071));
  CHECK(!a.is_dirty(131072));
  CHECK(a.is_dirty(4096));
  CHECK(!a.is_dirty(0));
  auto e = DirtyBitmap::create(1 << 20, 4096).value();
  e.set_range(0, 1);
  REQUIRE(e.merge(a));
  CHECK(e.count_dirty() == 18);
}

TEST_CASE("DirtyBitmap: serialized bytes are LSB first and the tail stays clear") {
  // 13 granules: bits 0..12, two bytes, 3 unused tail bits.
  auto b = DirtyBitmap::create(13 * 512, 512).value();
  std::vector<std::byte> in{std::byte{0x81}, std::byte{0xff}};
  b.load_bytes(0, in);
  CHECK(b.is_dirty(0));
  CHECK(!b.is_dirty(512));
  CHECK(b.is_dirty(7 * 512));
  CHECK(b.is_dirty(12 * 512));
  CHECK(b.count_dirty() == 2 + 5);  // tail bits of 0xff dropped
  std::vector<std::byte> out(4, std::byte{0xee});
  b.store_bytes(0, out);
  CHECK(out[0] == std::byte{0x81});
  CHECK(out[1] == std::byte{0x1f});
  CHECK(out[2] == std::byte{0});
  CHECK(out[3] == std::byte{0});
  CHECK(b.tail_bits_clear(0, out));
  CHECK(!b.tail_bits_clear(0, in));
  CHECK(!b.tail_bits_clear(1, std::span(in).subspan(1)));
  b.fill_bytes(0, 1, false);
  CHECK(b.count_dirty() == 5);
  b.fill_bytes(0, 100, true);
  CHECK(b.count_dirty() == 13);
  // A word boundary inside the data: byte 8 is bits 64..71.
  auto w = DirtyBitmap::create(200 * 512, 512).value();
  std::vector<std::byte> one{std::byte{0x02}};
  w.load_bytes(8, one);
  CHECK(w.is_dirty(65 * 512));
  CHECK(w.count_dirty() == 1);
}

TEST_CASE("DirtyBitmap: random operations across leaves match the model") {
  // 32768 bits per leaf: sizes of a few leaves, with and without a partial
  // last leaf, so whole-leaf (shared all-dirty / unallocated) states, their
  // private copies and the tail all get exercised.
  std::mt19937_64 rng(777);
  const std::uint64_t g = 512, leaf = 32768 * g;
  for (std::uint64_t size : {3 * leaf, 3 * leaf + 1000 * g + 100, leaf - g}) {
    auto b = DirtyBitmap::create(size, g).value();
    Model m(size, g);
    for (int op = 0; op < 400; ++op) {
      std::uint64_t off = rng() % size;
      std::uint64_t len = rng() % (rng() % 3 == 0 ? size : g * 100);
      bool v = rng() % 2 != 0;
      if (v)
        b.set_range(off, len);
      else
        b.clear_range(off, len);
      m.set(off, len, v);
      if (op % 25 == 0) check_runs(b, m, rng() % size, size);
      if (op % 50 == 0) {
        // Round trip through the serialized form, at an odd byte offset.
        const std::uint64_t bytes = b.byte_count();
        std::vector<std::byte> ser(bytes);
        b.store_bytes(0, ser);
        auto c = DirtyBitmap::create(size, g).value();
        c.load_bytes(0, std::span(ser).first(bytes / 3));
        c.load_bytes(bytes / 3, std::span(ser).subspan(bytes / 3));
        check_runs(c, m, 0, size);
        CHECK(c.count_dirty() == b.count_dirty());
      }
    }
    check_runs(b, m, 0, size);
    std::uint64_t count = 0;
    for (bool x : m.bits) count += x;
    CHECK(b.count_dirty() == count);
    auto other = DirtyBitmap::create(size, g).value();
    other.set_range(leaf, leaf);  // one whole leaf, shared all-dirty
    other.set_range(10 * g, 3 * g);
    REQUIRE(b.merge(other));
    m.set(leaf, leaf, true);
    m.set(10 * g, 3 * g, true);
    check_runs(b, m, 0, size);
  }
}

TEST_CASE("DirtyBitmap: memory follows the dirty part, not the declared size") {
  // 2 TiB at 512 B granularity: 2^32 bits, the qcow2 maximum (512 MiB).
  auto b = DirtyBitmap::create(2ull << 40, 512).value();
  CHECK(b.resident_bytes() == 0);
  b.set_range(1ull << 40, 4096);
  b.set_range(5ull << 30, 64 * 1024);
  CHECK(b.resident_bytes() == 2 * 4096);
  CHECK(b.count_dirty() == 8 + 128);
  b.set_all();  // every leaf shares the one all-dirty leaf
  CHECK(b.resident_bytes() == 0);
  CHECK(b.count_dirty() == 1ull << 32);
  b.clear_range(0, 512);  // one private copy
  CHECK(b.resident_bytes() == 4096);
  CHECK(!b.is_dirty(0));
  CHECK(b.is_dirty(512));
  CHECK(b.any_dirty_bytes(0, 1));
  b.reset();
  CHECK(b.resident_bytes() == 0);
  CHECK(!b.any_dirty_bytes(0, b.byte_count()));
  // Serialized clean and all-dirty leaves allocate nothing.
  std::vector<std::byte> zeros(1 << 20), ones(1 << 20, std::byte{0xff});
  b.load_bytes(0, zeros);
  b.load_bytes(64 << 20, ones);
  CHECK(b.resident_bytes() == 0);
  CHECK(b.count_dirty() == 8ull << 20);
  CHECK(b.run(0, ~0ull).length == (64ull << 20) * 8 * 512);
}

TEST_CASE("DirtyBitmap: the declared total of the process is capped") {
  const std::uint64_t before = DirtyBitmap::total_declared_bytes();
  std::vector<DirtyBitmap> held;
  // 512 MiB each: the cap admits kMaxTotalBytes / 512 MiB of them, no more.
  const std::uint64_t fit = (DirtyBitmap::kMaxTotalBytes - before) / (512ull << 20);
  for (std::uint64_t i = 0; i < fit; ++i) held.push_back(DirtyBitmap::create(2ull << 40, 512).value());
  auto over = DirtyBitmap::create(2ull << 40, 512);
  REQUIRE(!over);
  CHECK(over.error().code == ENOMEM);
  CHECK(over.error().message.find("more than the 8192 MiB allowed") != std::string::npos);
  held.pop_back();  // released bitmaps give their share back
  CHECK(DirtyBitmap::create(2ull << 40, 512));
  held.clear();
  CHECK(DirtyBitmap::total_declared_bytes() == before);
}
