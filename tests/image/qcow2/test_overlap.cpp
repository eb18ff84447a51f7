// Metadata overlap protection (issue 8 item 2): the MetadataMap index, the
// writable-open refusal of refcount blocks overlapping other metadata, and
// the EIO + corrupt bit on allocations and in-place writes that would land
// on metadata, over hand-built images in memory.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/endian.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/overlap.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image_test_support.hpp"

namespace {

using namespace qnbd;
using image::qcow2::kind_bit;
using image::qcow2::KindMask;
using image::qcow2::MetadataKind;
using image::qcow2::MetadataMap;
using image::qcow2::Qcow2Image;

Result<std::unique_ptr<Qcow2Image>> open_mem(std::unique_ptr<image::MemFile> file, bool writable) {
  Qcow2Image::Parts parts;
  parts.file = std::move(file);
  parts.path = "hand.qcow2";
  image::OpenOptions o;
  o.read_only = !writable;
  return Qcow2Image::open(std::move(parts), o);
}

// Every byte equal except the incompatible features field (72-79), which
// gains exactly the corrupt bit.
void check_only_corrupt_bit_added(const std::vector<std::byte>& before, image::MemFile& file) {
  std::vector<std::byte> now(static_cast<std::size_t>(*file.size()));
  REQUIRE(file.pread(now, 0));
  REQUIRE(now.size() == before.size());
  CHECK(load_be64(now.data() + 72) == (load_be64(before.data() + 72) | image::qcow2::INCOMPAT_CORRUPT));
  CHECK(std::memcmp(now.data(), before.data(), 72) == 0);
  CHECK(std::memcmp(now.data() + 80, before.data() + 80, now.size() - 80) == 0);
}

}  // namespace

TEST_CASE("overlap: MetadataMap finds, ignores and removes registrations by cluster") {
  MetadataMap m(16);  // 64 KiB clusters
  CHECK_FALSE(m.find(0, 1 << 30));
  m.add(MetadataKind::header, 0, 65536);
  m.add(MetadataKind::active_l1, 0x30000, 8);              // one cluster, from 8 bytes
  m.add(MetadataKind::refcount_table, 0x100000, 0x20000);  // two clusters
  CHECK(m.registered_clusters() == 4);

  auto hit = m.find(0x1000, 1);
  REQUIRE(hit);
  CHECK(hit->kind == MetadataKind::header);
  CHECK(hit->cluster_offset == 0);
  CHECK_FALSE(m.find(0x10000, 0x20000));  // clusters 1-2: free
  hit = m.find(0x2ffff, 2);               // straddles into cluster 3
  REQUIRE(hit);
  CHECK(hit->kind == MetadataKind::active_l1);
  hit = m.find(0x11ff00, 0x100);  // last bytes of the table's second cluster
  REQUIRE(hit);
  CHECK(hit->kind == MetadataKind::refcount_table);
  CHECK(hit->cluster_offset == 0x110000);
  CHECK_FALSE(m.find(0x120000, 65536));
  CHECK_FALSE(m.find(0x30000, 8, kind_bit(MetadataKind::active_l1)));  // the L1's own write
  // A range reaching the end of the 64-bit space does not wrap around.
  CHECK_FALSE(m.find(0x200000, UINT64_MAX - 0x200000 + 1));
  CHECK(m.find(0x100000, UINT64_MAX - 0x100000 + 1));

  // The same cluster under two kinds (a corrupt image): ignoring one still
  // finds the other; removal drops one registration at a time.
  m.add(MetadataKind::active_l2, 0x30000, 65536);
  hit = m.find(0x30000, 4096, kind_bit(MetadataKind::active_l2));
  REQUIRE(hit);
  CHECK(hit->kind == MetadataKind::active_l1);
  m.add(MetadataKind::active_l2, 0x30000, 65536);
  m.remove(MetadataKind::active_l2, 0x30000, 65536);
  m.remove(MetadataKind::active_l1, 0x30000, 8);
  hit = m.find(0x30000, 1);
  REQUIRE(hit);
  CHECK(hit->kind == MetadataKind::active_l2);
  m.remove(MetadataKind::active_l2, 0x30000, 65536);
  CHECK_FALSE(m.find(0x30000, 1));
  m.remove_all(MetadataKind::refcount_table);
  CHECK(m.registered_clusters() == 1);

  // check(): the hook gets QEMU's wording and decides the error.
  std::string seen;
  m.set_on_overlap([&](const std::string& why) {
    seen = why;
    return make_error(EIO, "hooked");
  });
  CHECK(m.check(0x10000, 65536));
  auto r = m.check(100, 10);
  REQUIRE_FALSE(r);
  CHECK(r.error().message == "hooked");
  CHECK(seen.find("Preventing invalid write on metadata (overlaps with the qcow2 header") == 0);
}

TEST_CASE("overlap: MetadataMap agrees with a plain set through growth, removals and rebuilds") {
  // The Bloom filter in front of the binary search must never hide a
  // registered cluster, whatever the history.
  MetadataMap m(9);
  std::multiset<std::uint64_t> ref;  // registered cluster indexes
  std::uint64_t seed = 1;
  auto next = [&] { return seed = seed * 6364136223846793005ull + 1442695040888963407ull; };
  for (int round = 0; round < 6; ++round) {
    for (int i = 0; i < 3000; ++i) {
      const std::uint64_t c = (next() >> 33) % 200000;
      m.add(MetadataKind::active_l2, c << 9, 512);
      ref.insert(c);
    }
    for (int i = 0; i < 2000 && !ref.empty(); ++i) {
      auto it = ref.lower_bound((next() >> 33) % 200000);
      if (it == ref.end()) continue;
      m.remove(MetadataKind::active_l2, *it << 9, 512);
      ref.erase(it);
    }
    REQUIRE(m.registered_clusters() == ref.size());
    for (std::uint64_t c = 0; c < 200000; ++c) {
      if (m.find(c << 9, 512).has_value() != (ref.count(c) != 0)) FAIL("cluster ", c, " round ", round);
    }
    // Ranges of 2 and 8 clusters (the filter and the search paths).
    for (std::uint64_t c = 0; c + 8 < 200000; c += 7) {
      const bool two = ref.count(c) || ref.count(c + 1);
      auto it = ref.lower_bound(c);
      const bool eight = it != ref.end() && *it < c + 8;
      if (m.find(c << 9, 1024).has_value() != two || m.find(c << 9, 4096).has_value() != eight) FAIL("range at ", c);
    }
  }
}

TEST_CASE("overlap: add_clusters registers like one add per range, in any order and with duplicates") {
  // The batch path (one sort and merge instead of an insert per cluster)
  // must leave the same multiset of registrations, and find must agree.
  MetadataMap one(9), batch(9);
  std::uint64_t seed = 7;
  auto next = [&] { return seed = seed * 6364136223846793005ull + 1442695040888963407ull; };
  one.add(MetadataKind::header, 0, 512);
  batch.add(MetadataKind::header, 0, 512);
  one.add(MetadataKind::active_l1, 100 << 9, 4096);  // 8 clusters
  batch.add(MetadataKind::active_l1, 100 << 9, 4096);
  for (int round = 0; round < 3; ++round) {
    std::vector<std::uint64_t> offsets;
    for (int i = 0; i < 5000; ++i) offsets.push_back(((next() >> 33) % 50000) << 9);
    offsets.push_back(offsets.front());  // a duplicate: registered twice, as add() twice
    offsets.push_back(103 << 9);         // inside the L1 table: both kinds stay registered
    const auto kind = round == 1 ? MetadataKind::refcount_block : MetadataKind::active_l2;
    for (std::uint64_t o : offsets) one.add(kind, o, 1024);  // 2 clusters each
    batch.add_clusters(kind, offsets, 1024);
    REQUIRE(batch.registered_clusters() == one.registered_clusters());
  }
  for (std::uint64_t c = 0; c < 50002; ++c) {
    const auto a = one.find(c << 9, 512), b = batch.find(c << 9, 512);
    if (a.has_value() != b.has_value() || (a && (a->kind != b->kind || a->cluster_offset != b->cluster_offset)))
      FAIL("cluster ", c);
    const auto ia = one.find(c << 9, 512, kind_bit(MetadataKind::active_l2));
    const auto ib = batch.find(c << 9, 512, kind_bit(MetadataKind::active_l2));
    if (ia.has_value() != ib.has_value()) FAIL("cluster ", c, " ignoring active_l2");
  }
  // One removal drops one of the duplicate registrations in both.
  const std::uint64_t dup = 103 << 9;
  one.remove(MetadataKind::active_l2, dup, 512);
  batch.remove(MetadataKind::active_l2, dup, 512);
  CHECK(batch.registered_clusters() == one.registered_clusters());
  CHECK(batch.find(dup, 512).has_value());
}

TEST_CASE("overlap: multi-cluster registrations answer as a per-cluster reference, kinds and ignores included") {
  // Spans (one per multi-cluster registration) and single-cluster keys
  // against a brute-force multiset of (cluster, kind): find() must name the
  // lowest registered cluster of the range, the lowest kind there, and skip
  // ignored kinds.
  MetadataMap m(9);
  std::multiset<std::pair<std::uint64_t, unsigned>> ref;
  struct Added {
    MetadataKind kind;
    std::uint64_t offset, bytes;
  };
  std::vector<Added> added;
  std::uint64_t seed = 7;
  auto next = [&] { return (seed = seed * 6364136223846793005ull + 1442695040888963407ull) >> 33; };
  const MetadataKind kinds[] = {MetadataKind::active_l1, MetadataKind::inactive_l1, MetadataKind::bitmap_table,
                                MetadataKind::active_l2};
  auto reg = [&](const Added& a, int delta) {
    const std::uint64_t first = a.offset >> 9, last = (a.offset + a.bytes - 1) >> 9;
    for (std::uint64_t c = first; c <= last; ++c) {
      if (delta > 0)
        ref.insert({c, static_cast<unsigned>(a.kind)});
      else
        ref.erase(ref.find({c, static_cast<unsigned>(a.kind)}));
    }
  };
  for (int round = 0; round < 4; ++round) {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> batch;
    const MetadataKind batch_kind = kinds[round % 4];
    for (int i = 0; i < 300; ++i) {
      // Unaligned offsets and lengths from 1 byte to 40 clusters.
      const Added a{kinds[next() % 4], next() % 4000 * 512 + next() % 512, 1 + next() % (40 * 512)};
      if (i % 3 == 0) {
        batch.emplace_back(a.offset, a.bytes);
        added.push_back({batch_kind, a.offset, a.bytes});
        reg(added.back(), 1);
      } else {
        m.add(a.kind, a.offset, a.bytes);
        added.push_back(a);
        reg(a, 1);
      }
    }
    m.add_ranges(batch_kind, batch);
    for (int i = 0; i < 120 && !added.empty(); ++i) {
      const std::size_t k = next() % added.size();
      m.remove(added[k].kind, added[k].offset, added[k].bytes);
      reg(added[k], -1);
      added.erase(added.begin() + static_cast<std::ptrdiff_t>(k));
    }
    REQUIRE(m.registered_clusters() == ref.size());
    for (int q = 0; q < 4000; ++q) {
      const std::uint64_t off = next() % 4100 * 512 + next() % 512, len = 1 + next() % (8 * 512);
      const KindMask ignore =
          q % 3 == 0 ? 0 : kind_bit(kinds[next() % 4]) | (q % 3 == 2 ? kind_bit(kinds[next() % 4]) : 0);
      const std::uint64_t first = off >> 9, last = (off + len - 1) >> 9;
      std::optional<std::pair<std::uint64_t, unsigned>> want;
      for (auto it = ref.lower_bound({first, 0}); it != ref.end() && it->first <= last; ++it) {
        if (!(ignore & kind_bit(static_cast<MetadataKind>(it->second)))) {
          want = *it;
          break;
        }
      }
      const auto got = m.find(off, len, ignore);
      if (got.has_value() != want.has_value() ||
          (got && (got->cluster_offset != want->first << 9 || static_cast<unsigned>(got->kind) != want->second)))
        FAIL("round ", round, " query ", off, "+", len, " ignore ", ignore);
    }
  }
  // remove_all drops a kind's spans and keys together.
  for (MetadataKind k : kinds) m.remove_all(k);
  CHECK(m.registered_clusters() == 0);
  CHECK_FALSE(m.find(0, UINT64_MAX));
  // A span reaching past 2^64 is clipped there, never wrapped onto cluster 0.
  m.add(MetadataKind::inactive_l1, UINT64_MAX - 511, 32 << 20);
  CHECK_FALSE(m.find(0, 512));
  const auto top = m.find(UINT64_MAX - 511, 1);
  REQUIRE(top);
  CHECK(top->kind == MetadataKind::inactive_l1);
}

TEST_CASE("overlap: 4,096 snapshots each naming a 32 MiB L1 table open writable, and guard it") {
  // 2^28 clusters claimed at 512-byte clusters: registered cluster by
  // cluster that was 2 GiB and minutes at open (65,536 snapshots, 34 GiB);
  // as one span per snapshot it is 4,096 entries.
  constexpr std::uint32_t kSnapshots = 4096;
  constexpr std::uint32_t kL1Entries = 4u << 20;  // 32 MiB, QEMU's limit
  test::HandImage h;
  h.cluster_bits = 9;
  h.size = 32 << 10;
  h.build();
  const std::uint64_t cs = h.cs();
  const std::uint64_t table_offset = h.bytes.size();
  const std::uint64_t l1 = h.data_offset(4);  // every snapshot names the same L1 table
  h.bytes.resize(table_offset + 64 * kSnapshots);
  for (std::uint32_t i = 0; i < kSnapshots; ++i) {
    std::byte* e = h.bytes.data() + table_offset + 64 * i;
    store_be64(e, l1);
    store_be32(e + 8, kL1Entries);
    store_be16(e + 12, 1);       // id_str_size
    store_be32(e + 36, 16);      // extra_data_size: vm_state_size_large, disk_size
    store_be64(e + 48, h.size);  // disk_size
    e[56] = std::byte{'1'};      // id
  }
  store_be32(h.bytes.data() + 60, kSnapshots);
  store_be64(h.bytes.data() + 64, table_offset);
  // Guest cluster 0 points, in place, at a cluster inside the L1 table past
  // the snapshot table (where the snapshot table, the lower kind, is named).
  const std::uint64_t target = l1 + 1000 * cs;
  h.bytes.resize(target + cs);
  h.set_l2(0, target | image::qcow2::QCOW_OFLAG_COPIED);
  auto img = open_mem(h.file(), true);
  if (!img) FAIL(img.error().message);
  const MetadataMap* map = (*img)->metadata_map();
  REQUIRE(map != nullptr);
  // Header, L1, L2, refcount table and block; the snapshot table; the L1s.
  CHECK(map->registered_clusters() == 5 + 64 * kSnapshots / cs + std::uint64_t{kSnapshots} * (kL1Entries * 8 / cs));
  std::vector<std::byte> data(512, std::byte{0x5a});
  auto r = (*img)->write(data, 0, false);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == EIO);
  CHECK(r.error().message.find("overlaps with the inactive L1 table at " + fmt::format("{:#x}", target)) !=
        std::string::npos);
}

TEST_CASE("overlap: a refcount block overlapping other metadata is refused at a writable open") {
  struct Case {
    const char* what;
    std::uint64_t block_cluster;
    const char* message;
  } cases[] = {{"L1", 3, "refcount block 0 at 0x3000 overlaps the active L1 table at 0x3000"},
               {"L2", 4, "refcount block 0 at 0x4000 overlaps the active L2 table at 0x4000"}};
  for (const Case& c : cases) {
    CAPTURE(c.what);
    test::HandImage h;
    h.build();
    store_be64(h.bytes.data() + h.cs(), c.block_cluster * h.cs());
    auto rw = open_mem(h.file(), true);
    REQUIRE_FALSE(rw);
    CHECK(rw.error().message == c.message);
    // Reading needs no refcounts: a read-only open still works.
    CHECK(open_mem(h.file(), false));
  }
  // The refcount table itself on an L2 table, and two table entries naming
  // one block, are refused the same way.
  test::HandImage h;
  h.build();
  store_be64(h.bytes.data() + 48, h.l2_offset());
  auto rw = open_mem(h.file(), true);
  REQUIRE_FALSE(rw);
  CHECK(rw.error().message.find("overlaps") != std::string::npos);
  test::HandImage twice;
  twice.build();
  store_be64(twice.bytes.data() + twice.cs() + 8, 2 * twice.cs());
  rw = open_mem(twice.file(), true);
  REQUIRE_FALSE(rw);
  CHECK(rw.error().message == "refcount block 1 at 0x2000 overlaps the refcount block at 0x2000");
}

TEST_CASE("overlap: a long refcount table of scattered blocks is registered whole, and its clashes named") {
  // 20,480 blocks in shuffled order after the image's own clusters. Each
  // block is checked against the metadata before it and the earlier
  // blocks, then all are registered at once (one at a time, after a lookup
  // each, was quadratic: a million scattered blocks took 93 s to open).
  constexpr std::uint64_t kBlocks = 20480;  // a table of 320 whole clusters
  test::HandImage h;
  h.cluster_bits = 9;
  h.size = 32 << 10;  // what its one L2 table of 64 entries maps
  h.build();
  const std::uint64_t cs = h.cs();
  const std::uint64_t table_offset = h.bytes.size();
  const std::uint64_t table_clusters = kBlocks * 8 / cs;
  const std::uint64_t first_block = table_offset / cs + table_clusters;
  std::vector<std::uint64_t> entries{2 * cs};  // the image's own block first
  for (std::uint64_t i = 1; i < kBlocks; ++i) entries.push_back((first_block + 2 * i) * cs);
  std::uint64_t seed = 1;
  for (std::size_t i = entries.size() - 1; i > 1; --i) {  // shuffle all but entry 0
    seed = seed * 6364136223846793005u + 1442695040888963407u;
    std::swap(entries[i], entries[1 + (seed >> 33) % i]);
  }
  h.bytes.resize((first_block + 2 * kBlocks) * cs);
  store_be64(h.bytes.data() + 48, table_offset);
  store_be32(h.bytes.data() + 56, static_cast<std::uint32_t>(table_clusters));
  auto write_table = [&](test::HandImage& img, const std::vector<std::uint64_t>& e) {
    for (std::size_t i = 0; i < e.size(); ++i) store_be64(img.bytes.data() + table_offset + 8 * i, e[i]);
  };
  write_table(h, entries);
  {
    auto rw = open_mem(h.file(), true);
    if (!rw) FAIL(rw.error().message);
    const MetadataMap* map = (*rw)->metadata_map();
    REQUIRE(map != nullptr);
    for (std::uint64_t e : entries) {
      const auto hit = map->find(e, cs);
      if (!hit || hit->kind != MetadataKind::refcount_block) FAIL("block at ", e, " is not registered");
    }
    const auto table = map->find(table_offset + table_clusters * cs - 1, 1);
    REQUIRE(table);
    CHECK(table->kind == MetadataKind::refcount_table);
    // Header, L1, L2, refcount table and blocks: nothing else, nothing twice.
    CHECK(map->registered_clusters() == 3 + table_clusters + kBlocks);
    CHECK((*rw)->close());
  }
  // The last entry repeating an earlier one, or naming a cluster of the
  // table itself, is refused with the clash named.
  struct Case {
    std::uint64_t last;
    std::string message;
  } cases[] = {{entries[7], fmt::format("refcount block {} at {:#x} overlaps the refcount block at {:#x}", kBlocks - 1,
                                        entries[7], entries[7])},
               {table_offset + 3 * cs, fmt::format("refcount block {} at {:#x} overlaps the refcount table at {:#x}",
                                                   kBlocks - 1, table_offset + 3 * cs, table_offset + 3 * cs)}};
  for (const Case& c : cases) {
    CAPTURE(c.message);
    test::HandImage bad = h;
    std::vector<std::uint64_t> e = entries;
    e.back() = c.last;
    write_table(bad, e);
    auto rw = open_mem(bad.file(), true);
    REQUIRE_FALSE(rw);
    CHECK(rw.error().message == c.message);
  }
}

TEST_CASE("overlap: an allocation that would hand out the header fails with EIO and sets the corrupt bit") {
  for (bool with_l2 : {false, true}) {
    CAPTURE(with_l2);
    test::HandImage h;
    h.build();
    store_be16(h.bytes.data() + 2 * h.cs(), 0);                   // refcount(cluster 0) = 0
    if (!with_l2) store_be64(h.bytes.data() + h.l1_offset(), 0);  // no L2 table yet
    h.set_l2(1, h.data_offset(0) | image::qcow2::QCOW_OFLAG_COPIED);
    h.fill_data(0, 0x42);
    auto file = h.file();
    image::MemFile* mem = file.get();
    auto img = open_mem(std::move(file), true);
    REQUIRE(img);
    std::vector<std::byte> data(4096, std::byte{0x5a});
    auto r = (*img)->write(data, 0, false);  // guest cluster 0 is unallocated
    REQUIRE_FALSE(r);
    CHECK(r.error().code == EIO);
    CHECK(r.error().message.find("Preventing invalid write on metadata (overlaps with the qcow2 header") !=
          std::string::npos);
    CHECK((*img)->header().corrupt());
    check_only_corrupt_bit_added(h.bytes, *mem);
    // Reads still work; writes are refused from now on.
    std::vector<std::byte> got(4096);
    REQUIRE((*img)->read(got, 4096));
    CHECK(got == std::vector<std::byte>(4096, static_cast<std::byte>(with_l2 ? 0x42 : 0)));
    CHECK_FALSE((*img)->write(data, 8192, false));
    CHECK((*img)->close());
    check_only_corrupt_bit_added(h.bytes, *mem);
  }
}

TEST_CASE("overlap: in-place writes through an L2 entry naming metadata fail with EIO") {
  struct Case {
    const char* what;
    std::uint64_t cluster;
    const char* kind;
  } cases[] = {{"refcount block", 2, "refcount block"},
               {"refcount table", 1, "refcount table"},
               {"L1 table", 3, "active L1 table"},
               {"its own L2 table", 4, "active L2 table"}};
  for (const Case& c : cases) {
    CAPTURE(c.what);
    test::HandImage h;
    h.build();
    h.set_l2(0, c.cluster * h.cs() | image::qcow2::QCOW_OFLAG_COPIED);
    auto file = h.file();
    image::MemFile* mem = file.get();
    auto img = open_mem(std::move(file), true);
    REQUIRE(img);
    std::vector<std::byte> data(512, std::byte{0x5a});
    auto r = (*img)->write(data, 512, false);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == EIO);
    CHECK(r.error().message.find(std::string("overlaps with the ") + c.kind) != std::string::npos);
    check_only_corrupt_bit_added(h.bytes, *mem);
  }
}

TEST_CASE("overlap: valid images never trip the check; every guest write misses the metadata map") {
  auto file = std::make_unique<image::MemFile>("v.qcow2");
  image::qcow2::CreateOptions co;
  co.size = 64 << 20;
  co.cluster_size = 4096;  // many L2 tables (2 MiB each) and refcount blocks (2 MiB each)
  co.refcount_bits = 64;
  REQUIRE(image::qcow2::create_qcow2(*file, co));
  auto img = open_mem(std::move(file), true);
  REQUIRE(img);
  const MetadataMap* map = (*img)->metadata_map();
  REQUIRE(map);
  const std::size_t at_open = map->registered_clusters();
  std::uint64_t writes = 0;
  (*img)->set_guest_write_observer([&](std::uint64_t host, std::uint64_t bytes) {
    ++writes;
    auto hit = map->find(host, bytes);
    if (hit) FAIL("guest data at ", host, "+", bytes, " over the ", metadata_kind_name(hit->kind));
  });
  std::uint64_t seed = 7;
  auto next = [&] { return seed = seed * 6364136223846793005ull + 1442695040888963407ull; };
  std::vector<std::byte> buf(64 << 10);
  for (int i = 0; i < 400; ++i) {
    const std::uint64_t len = 512 * (1 + next() % 128);
    const std::uint64_t off = (next() % ((64 << 20) / 512)) * 512;
    const std::uint64_t n = std::min<std::uint64_t>(len, (64 << 20) - off);
    std::memset(buf.data(), static_cast<int>(i), n);
    switch (next() % 4) {
      case 0: REQUIRE((*img)->write_zeroes(off, n, {})); break;
      case 1: REQUIRE((*img)->discard(off, n, {})); break;
      default: REQUIRE((*img)->write(std::span(buf).first(n), off, false)); break;
    }
    if (i % 50 == 0) REQUIRE((*img)->flush());
  }
  CHECK(writes > 100);
  CHECK(map->registered_clusters() > at_open + 20);  // new L2 tables and refcount blocks were registered
  CHECK_FALSE((*img)->header().corrupt());
  REQUIRE((*img)->close());
}

// Fuzz finding (fuzz/corpus/qcow2_write/overlap-l2-table-past-eof): an L1
// entry naming an L2 table past the end of the file was left out of the
// map, so once the file grew that far the allocator handed the cluster out
// for guest data, which the L1 entry then reads as an L2 table. QEMU's
// overlap check counts every active L1 entry's table, wherever it points.
TEST_CASE("overlap: an L2 table named past the end of the file is never handed out for guest data") {
  test::HandImage h;
  h.size = 2 * (h.cs() / 8) * h.cs();  // two L1 entries
  h.build();
  store_be32(h.bytes.data() + 36, 2);  // l1_size
  const std::uint64_t eof = h.bytes.size();
  // L1[1] names the cluster just past the end: the next one allocated.
  store_be64(h.bytes.data() + h.l1_offset() + 8, eof | image::qcow2::QCOW_OFLAG_COPIED);
  auto file = h.file();
  auto img = open_mem(std::move(file), true);
  REQUIRE(img);
  CHECK((*img)->metadata_map()->find(eof, 1));
  std::vector<std::byte> data(4096, std::byte{0x5a});
  auto r = (*img)->write(data, 0, false);  // guest cluster 0 is unallocated
  REQUIRE_FALSE(r);
  CHECK(r.error().code == EIO);
  CHECK(r.error().message.find("overlaps with the active L2 table") != std::string::npos);
  CHECK((*img)->header().corrupt());
}
