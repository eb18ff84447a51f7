// Refcount entry encoding (qcow2.txt "Host cluster management"), the refcount
// structure and its allocator: block creation and a refcount table that has to
// move (as QEMU's alloc_refcount_block and qcow2_refcount_area).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include "common/endian.hpp"
#include "image/io/forwarding_file.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/refcount.hpp"
#include "test_refcount_support.hpp"

using namespace qnbd;
using namespace qnbd::image::qcow2;
using qnbd::test::VecFile;

TEST_CASE("refcount entries: exact bit layout for every refcount_order") {
  std::vector<std::byte> block(64, std::byte{0});
  // order 0: entry 9 = byte 1, bit 1.
  set_refcount_entry(block, 0, 9, 1);
  CHECK(block[1] == std::byte{0x02});
  CHECK(get_refcount_entry(block, 0, 9) == 1);
  CHECK(get_refcount_entry(block, 0, 8) == 0);
  std::fill(block.begin(), block.end(), std::byte{0});
  // order 1: entry 5 = byte 1, bits 2-3.
  set_refcount_entry(block, 1, 5, 3);
  CHECK(block[1] == std::byte{0x0c});
  std::fill(block.begin(), block.end(), std::byte{0});
  // order 2: entry 1 = high nibble of byte 0.
  set_refcount_entry(block, 2, 1, 0xa);
  set_refcount_entry(block, 2, 0, 0x5);
  CHECK(block[0] == std::byte{0xa5});
  std::fill(block.begin(), block.end(), std::byte{0});
  set_refcount_entry(block, 3, 3, 0xfe);
  CHECK(block[3] == std::byte{0xfe});
  // orders 4-6: big-endian at width * index.
  set_refcount_entry(block, 4, 1, 0x1234);
  CHECK(block[2] == std::byte{0x12});
  CHECK(block[3] == std::byte{0x34});
  set_refcount_entry(block, 5, 2, 0xdeadbeef);
  CHECK(load_be32(block.data() + 8) == 0xdeadbeef);
  set_refcount_entry(block, 6, 3, 0x0102030405060708ull);
  CHECK(load_be64(block.data() + 24) == 0x0102030405060708ull);
}

TEST_CASE("refcount entries: random set/get agrees with a model for every width") {
  std::mt19937_64 rng(42);
  for (unsigned order = 0; order <= 6; order++) {
    CAPTURE(order);
    std::vector<std::byte> block(512, std::byte{0});
    const std::uint64_t entries = 512 * 8 >> order;
    std::vector<std::uint64_t> model(entries, 0);
    for (int i = 0; i < 3000; i++) {
      const std::uint64_t idx = rng() % entries;
      const std::uint64_t v = rng() & max_refcount(order);
      set_refcount_entry(block, order, idx, v);
      model[idx] = v;
    }
    for (std::uint64_t idx = 0; idx < entries; idx++) {
      REQUIRE(get_refcount_entry(block, order, idx) == model[idx]);
    }
  }
  CHECK(max_refcount(0) == 1);
  CHECK(max_refcount(4) == 0xffff);
  CHECK(max_refcount(6) == UINT64_MAX);
}

namespace {

struct Image {
  VecFile file;
  std::uint64_t cluster_size;
  unsigned refcount_order;
};

Image make_image(std::uint64_t cluster_size, std::uint32_t refcount_bits, std::uint64_t size) {
  Image img{VecFile{}, cluster_size, static_cast<unsigned>(__builtin_ctz(refcount_bits))};
  CreateOptions o;
  o.cluster_size = cluster_size;
  o.refcount_bits = refcount_bits;
  o.size = size;
  REQUIRE(create_qcow2(img.file, o));
  return img;
}

// Independent recount: read the table and blocks straight from the bytes and
// return the refcount of every cluster up to the file end.
std::vector<std::uint64_t> stored_refcounts(VecFile& f, std::uint64_t cs, unsigned order) {
  const auto& d = f.data;
  const std::uint64_t rt_offset = load_be64(d.data() + 48);
  const std::uint32_t rt_clusters = load_be32(d.data() + 56);
  const std::uint64_t entries_per_block = cs * 8 >> order;
  const std::uint64_t clusters = (d.size() + cs - 1) / cs;
  std::vector<std::uint64_t> rc(clusters, 0);
  for (std::uint64_t ti = 0; ti < rt_clusters * cs / 8; ti++) {
    const std::uint64_t block = load_be64(d.data() + rt_offset + ti * 8);
    if (!block) continue;
    std::span<const std::byte> b(d.data() + block, cs);
    for (std::uint64_t i = 0; i < entries_per_block; i++) {
      const std::uint64_t ci = ti * entries_per_block + i;
      const std::uint64_t v = get_refcount_entry(b, order, i);
      if (ci < clusters) {
        rc[ci] = v;
      } else {
        REQUIRE(v == 0);  // nothing counted past the end of the file
      }
    }
  }
  return rc;
}

// The metadata clusters the file holds: header, table, blocks, L1.
std::set<std::uint64_t> metadata_clusters(VecFile& f, std::uint64_t cs) {
  const auto& d = f.data;
  std::set<std::uint64_t> s{0};
  const std::uint64_t rt_offset = load_be64(d.data() + 48);
  const std::uint32_t rt_clusters = load_be32(d.data() + 56);
  for (std::uint64_t i = 0; i < rt_clusters; i++) REQUIRE(s.insert(rt_offset / cs + i).second);
  for (std::uint64_t ti = 0; ti < rt_clusters * cs / 8; ti++) {
    const std::uint64_t block = load_be64(d.data() + rt_offset + ti * 8);
    if (block) REQUIRE(s.insert(block / cs).second);
  }
  const std::uint32_t l1_size = load_be32(d.data() + 36);
  const std::uint64_t l1_offset = load_be64(d.data() + 40);
  for (std::uint64_t i = 0; i < (l1_size * 8 + cs - 1) / cs; i++) {
    REQUIRE(s.insert(l1_offset / cs + i).second);
  }
  return s;
}

}  // namespace

TEST_CASE("allocator: a fresh image's refcounts match its metadata") {
  for (std::uint32_t bits : {1u, 2u, 4u, 8u, 16u, 32u, 64u}) {
    CAPTURE(bits);
    Image img = make_image(512, bits, 64 << 20);
    auto rc = stored_refcounts(img.file, img.cluster_size, img.refcount_order);
    auto meta = metadata_clusters(img.file, img.cluster_size);
    for (std::uint64_t ci = 0; ci < rc.size(); ci++) {
      CAPTURE(ci);
      CHECK(rc[ci] == (meta.count(ci) ? 1u : 0u));
    }
  }
}

TEST_CASE("allocator: growth moves the refcount table (refcount_bits=1, 512-byte clusters)") {
  Image img = make_image(512, 1, 1 << 20);
  const std::uint64_t cs = img.cluster_size;
  const std::uint64_t old_table = load_be64(img.file.data.data() + 48);
  auto r = Refcounts::load(img.file, RefcountGeometry{9, 0}, old_table, load_be32(img.file.data.data() + 56));
  REQUIRE(r);
  // One block covers 4096 clusters and one table cluster 64 blocks, so
  // 300000 clusters need ~74 blocks and a second table cluster: the table
  // must move at least once.
  std::set<std::uint64_t> allocated;
  std::mt19937 rng(7);
  std::uint64_t total = 0;
  while (total < 300000) {
    const std::uint64_t n = 1 + rng() % 700;
    const std::uint64_t off = *r->allocate(n);
    REQUIRE(off % cs == 0);
    for (std::uint64_t i = 0; i < n; i++) REQUIRE(allocated.insert(off / cs + i).second);
    total += n;
  }
  REQUIRE(r->flush());
  // Clusters are handed out on demand; make the file cover them as a writer
  // would by writing data.
  const std::uint64_t max_cluster = std::max(*allocated.rbegin() + 1, r->image_end_hint() / cs);
  if (img.file.data.size() < max_cluster * cs) img.file.data.resize(max_cluster * cs);

  const std::uint64_t new_table = load_be64(img.file.data.data() + 48);
  CHECK(new_table != old_table);
  CHECK(new_table == r->table_offset());
  CHECK(load_be32(img.file.data.data() + 56) == r->table_clusters());
  CHECK(r->table_clusters() >= 2);

  auto rc = stored_refcounts(img.file, cs, 0);
  auto meta = metadata_clusters(img.file, cs);
  for (auto c : allocated) REQUIRE(meta.count(c) == 0);  // no allocation overlaps metadata
  // The old table was freed and its cluster reused (as data or as new
  // metadata): the mismatch count below would catch a leak of it.
  CHECK((allocated.count(old_table / cs) + meta.count(old_table / cs)) == 1);
  std::uint64_t mismatches = 0;
  for (std::uint64_t ci = 0; ci < rc.size(); ci++) {
    const std::uint64_t expected = (meta.count(ci) || allocated.count(ci)) ? 1 : 0;
    if (rc[ci] != expected) mismatches++;
  }
  CHECK(mismatches == 0);

  // Freed clusters are reused first-fit.
  const std::uint64_t victim = *std::next(allocated.begin(), 10);
  REQUIRE(r->free(victim * cs, cs));
  CHECK(*r->get(victim) == 0);
  CHECK(*r->allocate(1) == victim * cs);
  // A refcount of 1 bit cannot go to 2.
  CHECK(r->update(victim * cs, cs, 1).error().code == EOVERFLOW);
  // And it cannot drop below zero.
  REQUIRE(r->free(victim * cs, cs));
  CHECK(r->free(victim * cs, cs).error().code == EIO);
}

TEST_CASE("allocator: reserved predicate is honoured and small caches still work") {
  Image img = make_image(4096, 16, 1 << 20);
  Refcounts::Options opt;
  opt.max_cached_blocks = 1;
  auto r = Refcounts::load(img.file, RefcountGeometry{12, 4}, 4096, 1, opt);
  REQUIRE(r);
  r->set_reserved_predicate([](std::uint64_t ci) { return ci >= 4 && ci < 10; });
  const std::uint64_t off = *r->allocate(3);
  CHECK(off == 10 * 4096);
  // 4096-byte blocks with 16-bit refcounts cover 2048 clusters: force a
  // second block and a cache eviction with a dirty block.
  const std::uint64_t big = *r->allocate(3000);
  CHECK(big == 13 * 4096);
  REQUIRE(r->flush());
  img.file.data.resize(std::max<std::size_t>(img.file.data.size(), (13 + 3000) * 4096));
  auto rc = stored_refcounts(img.file, 4096, 4);
  for (std::uint64_t ci = 13; ci < 3013; ci++) REQUIRE(rc[ci] == 1);
  for (std::uint64_t ci = 4; ci < 10; ci++) CHECK(rc[ci] == 0);
}

TEST_CASE("refcount table load rejects bad entries (reserved bits, misaligned, outside the file)") {
  Image img = make_image(65536, 16, 1 << 20);
  store_be64(img.file.data.data() + 65536 + 8, 0x30001);  // reserved bit set
  CHECK(!Refcounts::load(img.file, RefcountGeometry{16, 4}, 65536, 1));
  store_be64(img.file.data.data() + 65536 + 8, 0x31000);  // misaligned
  CHECK(!Refcounts::load(img.file, RefcountGeometry{16, 4}, 65536, 1));
  store_be64(img.file.data.data() + 65536 + 8, 0x7000000);  // outside the file
  CHECK(!Refcounts::load(img.file, RefcountGeometry{16, 4}, 65536, 1));
  store_be64(img.file.data.data() + 65536 + 8, 0);
  CHECK(Refcounts::load(img.file, RefcountGeometry{16, 4}, 65536, 1));
  CHECK(!Refcounts::load(img.file, RefcountGeometry{16, 4}, 65536 + 1, 1));
  CHECK(!Refcounts::load(img.file, RefcountGeometry{16, 4}, 65536, 0));
}

namespace {

// Records every write and flush so the crash ordering (refcounts before
// pointers) can be asserted on the sequence.
class RecordingFile final : public qnbd::image::ForwardingFile {
 public:
  struct Event {
    bool flush;
    std::uint64_t offset;
    std::uint64_t length;
  };
  explicit RecordingFile(VecFile& inner) : ForwardingFile(inner) {}
  std::vector<Event> events;

  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override {
    events.push_back({false, offset, buf.size()});
    return ForwardingFile::pwrite(buf, offset);
  }
  Result<void> flush() override {
    events.push_back({true, 0, 0});
    return ForwardingFile::flush();
  }
};

// Index of the first write covering [offset, offset+length), or -1.
long find_write(const std::vector<RecordingFile::Event>& ev, std::uint64_t offset, std::uint64_t length,
                std::size_t from = 0) {
  for (std::size_t i = from; i < ev.size(); i++) {
    if (!ev[i].flush && ev[i].offset <= offset && offset + length <= ev[i].offset + ev[i].length) {
      return static_cast<long>(i);
    }
  }
  return -1;
}

bool flush_between(const std::vector<RecordingFile::Event>& ev, long a, long b) {
  for (long i = a + 1; i < b; i++) {
    if (ev[static_cast<std::size_t>(i)].flush) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("allocator: crash ordering of new blocks and a moved table (refcounts before pointers)") {
  Image img = make_image(512, 1, 1 << 20);
  RecordingFile rec(img.file);
  const std::uint64_t old_table = load_be64(img.file.data.data() + 48);
  auto r = Refcounts::load(rec, RefcountGeometry{9, 0}, old_table, load_be32(img.file.data.data() + 56));
  REQUIRE(r);
  // Enough to need new blocks and at least one table move.
  // (one 512-byte table cluster addresses 64 blocks of 4096 clusters)
  for (int i = 0; i < 300; i++) REQUIRE(r->allocate(1000));
  REQUIRE(r->flush());
  const auto& ev = rec.events;

  // Every table entry written in place points at a block whose contents
  // were written and flushed before the entry.
  std::size_t entry_writes = 0;
  for (std::size_t i = 0; i < ev.size(); i++) {
    if (ev[i].flush || ev[i].length != 8) continue;
    const std::uint64_t block = load_be64(img.file.data.data() + ev[i].offset);
    if (block == 0 || block % 512 != 0) continue;
    const long w = find_write(ev, block, 512);
    REQUIRE(w >= 0);
    CHECK(static_cast<std::size_t>(w) < i);
    CHECK(flush_between(ev, w, static_cast<long>(i)));
    entry_writes++;
  }
  CHECK(entry_writes > 0);

  // Each header switch (12 bytes at 48) comes after the new table was
  // written and flushed, and is itself flushed before anything else.
  std::size_t switches = 0;
  for (std::size_t i = 0; i < ev.size(); i++) {
    if (ev[i].flush || ev[i].offset != 48 || ev[i].length != 12) continue;
    switches++;
    long last_table_write = -1;
    for (long j = static_cast<long>(i) - 1; j >= 0; j--) {
      const auto& e = ev[static_cast<std::size_t>(j)];
      if (!e.flush && e.length >= 512 && e.length % 512 == 0) {
        last_table_write = j;
        break;
      }
    }
    REQUIRE(last_table_write >= 0);
    CHECK(flush_between(ev, last_table_write, static_cast<long>(i)));
    REQUIRE(i + 1 < ev.size());
    CHECK(ev[i + 1].flush);
  }
  CHECK(switches >= 1);
  CHECK(load_be64(img.file.data.data() + 48) == r->table_offset());
}
