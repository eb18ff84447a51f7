// The qcow2 read engine on hand-built MemFile images, and on images made by
// qemu-img / qemu-io compared byte for byte with `qemu-img convert -O raw`.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "image/block_device.hpp"
#include "image/io/forwarding_file.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/compress.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image_test_support.hpp"

using namespace qnbd;
using namespace qnbd::image;
using namespace qnbd::image::qcow2;
using qnbd::test::HandImage;

namespace {

Result<std::unique_ptr<Qcow2Image>> open_hand(const HandImage& h) {
  Qcow2Image::Parts parts;
  parts.file = h.file();
  parts.path = "hand.qcow2";
  return Qcow2Image::open(std::move(parts), OpenOptions{});
}

std::vector<std::byte> read_all(BlockDevice& dev) {
  std::vector<std::byte> out(dev.size());
  auto r = dev.read(out, 0);
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  return out;
}

bool all_equal(std::span<const std::byte> s, std::uint8_t v) {
  return std::all_of(s.begin(), s.end(), [v](std::byte b) { return b == std::byte{v}; });
}

// `r` failed, with errno `code` (0: any) and a message naming `words`: the
// defect or the file, so that whoever reads the log can find it.
template <class T>
void check_fails_naming(const Result<T>& r, int code, std::string_view words) {
  REQUIRE_FALSE(r.has_value());
  if (code != 0) CHECK(r.error().code == code);
  CHECK_MESSAGE(r.error().message.find(words) != std::string::npos, r.error().message);
}

}  // namespace

TEST_CASE("qcow2 on MemFile: normal, zero, unallocated and compressed clusters") {
  HandImage h;
  h.build(8);
  const std::uint64_t cs = h.cs();
  h.fill_data(0, 0xaa);
  h.fill_data(1, 0xbb);
  h.set_l2(0, QCOW_OFLAG_COPIED | h.data_offset(0));
  h.set_l2(1, QCOW_OFLAG_COPIED | h.data_offset(1));                    // contiguous with cluster 0
  h.set_l2(3, QCOW_OFLAG_ZERO);                                         // zero, plain
  h.set_l2(4, QCOW_OFLAG_COPIED | h.data_offset(2) | QCOW_OFLAG_ZERO);  // zero, preallocated
  h.fill_data(2, 0xee);                                                 // never read: zero flag wins
  // A deflate-compressed cluster of 0x5c at the start of data cluster 3.
  std::vector<std::byte> plain(cs, std::byte{0x5c}), packed(2 * cs);
  std::size_t n = *compress_cluster(COMPRESSION_DEFLATE, plain, packed);
  REQUIRE(n > 0);
  std::memcpy(h.bytes.data() + h.data_offset(3), packed.data(), n);
  const std::uint64_t coffset = h.data_offset(3);
  const std::uint64_t additional = ((coffset + n - 1) >> 9) - (coffset >> 9);
  h.set_l2(5, QCOW_OFLAG_COMPRESSED | (additional << (70 - h.cluster_bits)) | coffset);

  auto img = open_hand(h);
  REQUIRE_MESSAGE(img.has_value(), img.error().message);
  Qcow2Image& dev = **img;
  CHECK(dev.size() == h.size);
  auto all = read_all(dev);
  CHECK(all_equal(std::span(all).subspan(0, cs), 0xaa));
  CHECK(all_equal(std::span(all).subspan(cs, cs), 0xbb));
  CHECK(all_equal(std::span(all).subspan(2 * cs, 3 * cs), 0));
  CHECK(all_equal(std::span(all).subspan(5 * cs, cs), 0x5c));
  CHECK(all_equal(std::span(all).subspan(6 * cs), 0));

  // One run for the two contiguous clusters; an unaligned start.
  auto m = dev.get_host_offset(100, 10 * cs);
  REQUIRE(m.has_value());
  CHECK(m->type == SubclusterType::normal);
  CHECK(m->host_offset == h.data_offset(0) + 100);
  CHECK(m->bytes == 2 * cs - 100);

  // Block status: data, hole, zero (merged), data (compressed), hole to the end.
  std::array<Extent, 16> ext;
  auto count = dev.block_status(0, dev.size(), ext);
  REQUIRE(count.has_value());
  REQUIRE(*count == 5);
  CHECK(ext[0].length == 2 * cs);
  CHECK((ext[0].allocated && !ext[0].zero && ext[0].depth == 1));
  // Unallocated cluster 2 (no backing: zero, depth 0) then zero clusters 3-4
  // (zero, depth 1): different depth, so not merged.
  CHECK(ext[1].length == cs);
  CHECK((!ext[1].allocated && ext[1].zero && ext[1].depth == 0));
  CHECK(ext[2].length == 2 * cs);
  CHECK((!ext[2].allocated && ext[2].zero && ext[2].depth == 1));
  CHECK((ext[3].allocated && ext[3].depth == 1 && ext[3].length == cs));
  CHECK((!ext[4].allocated && ext[4].zero && ext[4].depth == 0));
  CHECK(ext[4].length == dev.size() - 6 * cs);
  // A one-entry array stops after the first extent.
  std::array<Extent, 1> one;
  CHECK(*dev.block_status(cs / 2, dev.size() - cs / 2, one) == 1);
  CHECK(one[0].length == 2 * cs - cs / 2);

  // Writes are refused for now.
  std::vector<std::byte> buf(512);
  CHECK(dev.write(buf, 0, false).error().code == EROFS);
}

TEST_CASE("qcow2 on MemFile: corrupt entries fail reads with EIO naming the defect") {
  HandImage h;
  h.build(2);
  h.set_l2(0, QCOW_OFLAG_COPIED | (h.data_offset(0) + 512));  // unaligned
  h.set_l2(1, QCOW_OFLAG_COPIED | (1ull << 40));              // beyond EOF
  auto img = open_hand(h);
  REQUIRE(img.has_value());
  std::vector<std::byte> buf(512);
  check_fails_naming((*img)->read(buf, 0), EIO, "unaligned");
  check_fails_naming((*img)->read(buf, h.cs()), EIO, "beyond the end");
  // Other clusters still read.
  CHECK((*img)->read(buf, 2 * h.cs()).has_value());
}

TEST_CASE("qcow2 on MemFile: damaged compressed data is EIO") {
  HandImage h;
  h.build(2);
  std::memset(h.bytes.data() + h.data_offset(0), 0xff, h.cs());
  h.set_l2(0, QCOW_OFLAG_COMPRESSED | h.data_offset(0));
  auto img = open_hand(h);
  REQUIRE(img.has_value());
  std::vector<std::byte> buf(512);
  check_fails_naming((*img)->read(buf, 0), EIO, "compressed");
}

TEST_CASE("qcow2 on MemFile: extended L2 subclusters") {
  HandImage h;
  h.cluster_bits = 14;  // extended L2 needs >= 16 KiB clusters
  h.extended_l2 = true;
  h.build(2);
  const std::uint64_t sc = h.cs() / 32;
  h.fill_data(0, 0x77);
  // Subclusters 0-1 allocated, 2 zero, the rest unallocated.
  h.set_l2(0, QCOW_OFLAG_COPIED | h.data_offset(0), 0x3 | (1ull << 34));
  auto img = open_hand(h);
  REQUIRE_MESSAGE(img.has_value(), img.error().message);
  auto all = read_all(**img);
  CHECK(all_equal(std::span(all).subspan(0, 2 * sc), 0x77));
  CHECK(all_equal(std::span(all).subspan(2 * sc), 0));
  auto m = (*img)->get_host_offset(0, h.cs());
  REQUIRE(m.has_value());
  CHECK(m->type == SubclusterType::normal);
  CHECK(m->bytes == 2 * sc);
  m = (*img)->get_host_offset(3 * sc, h.cs());
  CHECK(m->type == SubclusterType::unallocated_alloc);
  CHECK(m->bytes == h.cs() - 3 * sc);
  CHECK(m->host_offset == h.data_offset(0) + 3 * sc);
  auto st = (*img)->layer_status(3 * sc, h.cs());
  REQUIRE(st.has_value());
  CHECK((st->zero && !st->present && st->offset_valid));
}

TEST_CASE("qcow2: the L2 cache stays within its bound") {
  // 2 MiB per L2 table with 4 KiB clusters: a 64 MiB disk with 32 tables.
  HandImage h;
  h.size = 64ull << 20;
  h.build(0);
  const std::uint64_t cs = h.cs();
  const unsigned tables = 32;
  // The L1 table needs 32 entries; the L2 tables follow the header layout.
  store_be32(h.bytes.data() + 36, tables);
  h.bytes.resize((5 + tables) * cs);
  for (unsigned i = 0; i < tables; ++i) {
    store_be64(h.bytes.data() + h.l1_offset() + 8 * i, (5 + i) * cs);
    // Each table maps its first cluster as zero.
    store_be64(h.bytes.data() + (5 + i) * cs, QCOW_OFLAG_ZERO);
  }
  for (unsigned c = 0; c < 5 + tables; ++c) store_be16(h.bytes.data() + 2 * cs + 2 * c, 1);
  auto img = open_hand(h);
  REQUIRE_MESSAGE(img.has_value(), img.error().message);
  TableCache& cache = (*img)->l2_cache();
  const std::size_t cap = cache.capacity();
  CHECK(cap == tables);
  std::vector<std::byte> buf(512);
  for (int pass = 0; pass < 3; ++pass) {
    for (unsigned i = 0; i < tables; ++i) REQUIRE((*img)->read(buf, std::uint64_t{i} << 21).has_value());
  }
  CHECK(cache.cached_tables() <= cap);
  CHECK(cache.misses() == tables);  // everything fits: each table read once
}

TEST_CASE("TableCache: LRU eviction, bounded buffers, pinned entries") {
  MemFile f("tables");
  std::vector<std::byte> data(16 * 512);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = std::byte(i / 512);
  REQUIRE(f.pwrite(data, 0).has_value());
  TableCache cache(f, 512, 3, "test table");
  for (unsigned round = 0; round < 4; ++round) {
    for (unsigned t = 0; t < 16; ++t) {
      auto h = cache.get(t * 512);
      REQUIRE(h.has_value());
      CHECK(h->data()[0] == std::byte(t));
    }
  }
  CHECK(cache.cached_tables() == 3);
  CHECK(cache.allocated_buffers() == 3);
  CHECK(cache.misses() == 64);
  // With every slot pinned, a miss fails instead of growing.
  auto a = cache.get(0), b = cache.get(512), c = cache.get(1024);
  REQUIRE((a && b && c));
  auto d = cache.get(2048);
  REQUIRE_FALSE(d.has_value());
  CHECK(d.error().code == EAGAIN);
  // Dirty entries go through the writeback hook before eviction.
  std::vector<std::uint64_t> written;
  cache.set_writeback([&](std::uint64_t off, std::span<const std::byte>) -> Result<void> {
    written.push_back(off);
    return ok();
  });
  cache.mark_dirty(*a);
  a->reset();
  b->reset();
  c->reset();
  REQUIRE(cache.get(4096).has_value());  // evicts the LRU entry: table 0, dirty
  CHECK(written == std::vector<std::uint64_t>{0});
}

namespace {

// Logs every write ('w' at offset) and flush ('f') that reaches a MemFile.
class OrderFile final : public ForwardingFile {
 public:
  OrderFile() : ForwardingFile(std::make_unique<MemFile>("order", std::vector<std::byte>(16 * 512))) {}
  Result<void> pwrite(std::span<const std::byte> b, std::uint64_t o) override {
    log.push_back(std::string("w").append(std::to_string(o)));
    return ForwardingFile::pwrite(b, o);
  }
  Result<void> flush() override {
    log.push_back("f");
    return ForwardingFile::flush();
  }
  std::vector<std::string> log;
};

}  // namespace

TEST_CASE("TableCache: a table is written back only after its dependency and a sync (refcounts before pointers)") {
  // The L2 cache depends on the refcount block cache, as QEMU's
  // qcow2_cache_set_dependency: an L2 entry on disk must never point at a
  // cluster whose refcount is not on disk.
  OrderFile f;
  TableCache refcounts(f, 512, 4, "refcount block");
  TableCache l2(f, 512, 2, "L2 table");
  l2.set_dependency(&refcounts);
  auto dirty = [](TableCache& c, std::uint64_t off) {
    auto h = c.get(off);
    REQUIRE(h.has_value());
    c.mark_dirty(*h);
  };

  // flush(): the dirty refcount block, a sync, then the L2 table.
  dirty(refcounts, 0);
  dirty(l2, 1024);
  REQUIRE(l2.flush());
  CHECK(f.log == std::vector<std::string>{"w0", "f", "w1024"});
  CHECK_FALSE(refcounts.has_dirty());

  // depends_on_flush() alone (data written): a sync, then the table.
  f.log.clear();
  dirty(l2, 1024);
  l2.depends_on_flush();
  REQUIRE(l2.flush());
  CHECK(f.log == std::vector<std::string>{"f", "w1024"});

  // Nothing pending: no sync.
  f.log.clear();
  dirty(l2, 1024);
  REQUIRE(l2.flush());
  CHECK(f.log == std::vector<std::string>{"w1024"});

  // Eviction of a dirty table follows the same rule.
  f.log.clear();
  dirty(l2, 1536);  // l2 now holds 1024 (clean) and 1536 (dirty)
  dirty(refcounts, 512);
  REQUIRE(l2.get(2048).has_value());  // evicts 1024 (clean): nothing written
  CHECK(f.log.empty());
  REQUIRE(l2.get(2560).has_value());  // evicts 1536 (dirty)
  CHECK(f.log == std::vector<std::string>{"w512", "f", "w1536"});

  // A table being created is not read and starts zeroed and clean.
  f.log.clear();
  auto e = l2.get_empty(4096);
  REQUIRE(e.has_value());
  CHECK(std::all_of(e->data().begin(), e->data().end(), [](std::byte b) { return b == std::byte{0}; }));
  e->reset();
  REQUIRE(l2.flush());
  CHECK(f.log.empty());
}

TEST_CASE("qcow2: concurrent readers see consistent data") {
  HandImage h;
  h.build(8);
  for (unsigned i = 0; i < 8; ++i) {
    h.fill_data(i, static_cast<std::uint8_t>(i + 1));
    h.set_l2(i, QCOW_OFLAG_COPIED | h.data_offset(i));
  }
  auto img = open_hand(h);
  REQUIRE(img.has_value());
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> buf(h.cs());
      for (int k = 0; k < 500; ++k) {
        unsigned c = static_cast<unsigned>((k + t) % 8);
        if (!(*img)->read(buf, c * h.cs()) || !all_equal(buf, static_cast<std::uint8_t>(c + 1))) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(bad == 0);
}

// ---- qemu-img fixtures ------------------------------------------------------

namespace {

void compare_with_qemu(const std::string& image) {
  qnbd::test::TempDir tmp;
  const std::string ref = tmp / "ref.raw";
  REQUIRE(qnbd::test::run("qemu-img convert -O raw " + image + " " + ref) == 0);
  OpenOptions o;
  auto dev = open_image(image, o);
  REQUIRE_MESSAGE(dev.has_value(), dev.error().message);
  auto ours = read_all(**dev);
  auto theirs = qnbd::test::read_whole(ref);
  REQUIRE(ours.size() == theirs.size());
  CHECK(ours == theirs);
}

}  // namespace

TEST_CASE("qemu-img images read exactly like qemu-img convert") {
  if (!qnbd::test::have_qemu_img()) {
    MESSAGE("qemu-img not installed: skipped");
    return;
  }
  using qnbd::test::run;
  qnbd::test::TempDir d;
  struct Case {
    std::string name, create, io;
  };
  std::vector<Case> cases = {
      {"v2.qcow2", "-o compat=0.10,cluster_size=512", "-c 'write -P 1 0 3k' -c 'write -P 2 100k 1k'"},
      {"c4k.qcow2", "-o cluster_size=4096", "-c 'write -P 3 4k 10k' -c 'write -z 20k 8k' -c 'write -c -P 4 64k 4k'"},
      {"c2m.qcow2", "-o cluster_size=2M", "-c 'write -P 5 1M 3M' -c 'discard 2M 2M'"},
      {"rb1.qcow2", "-o refcount_bits=1", "-c 'write -P 6 0 200k'"},
      {"zstd.qcow2", "-o compression_type=zstd", "-c 'write -c -P 7 0 64k' -c 'write -c -P 8 128k 64k'"},
      {"extl2.qcow2", "-o extended_l2=on,cluster_size=64k", "-c 'write -P 9 1k 3k' -c 'write -z 8k 2k'"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.name);
    const std::string p = d / c.name;
    REQUIRE(run("qemu-img create -f qcow2 " + c.create + " " + p + " 5000k") == 0);
    REQUIRE(run("qemu-io " + c.io + " " + p) == 0);
    compare_with_qemu(p);
  }
  // A chain: short raw base <- qcow2 with a relative backing name.
  REQUIRE(run("qemu-img create -f raw " + (d / "base.raw") + " 300k") == 0);
  REQUIRE(run("qemu-io -f raw -c 'write -P 1 0 300k' " + (d / "base.raw")) == 0);
  REQUIRE(run("cd " + d.path.string() + " && qemu-img create -f qcow2 -b base.raw -F raw top.qcow2 1M") == 0);
  REQUIRE(run("qemu-io -c 'write -P 2 64k 64k' " + (d / "top.qcow2")) == 0);
  compare_with_qemu(d / "top.qcow2");
  // Its allocation depth: 2 for the base's bytes, 1 for the top's; past the
  // short base its zeroes count as the base's (depth 2), as qemu-nbd says.
  auto dev = open_image(d / "top.qcow2", OpenOptions{});
  REQUIRE(dev.has_value());
  std::array<Extent, 8> ext;
  auto n = (*dev)->block_status(0, (*dev)->size(), ext);
  REQUIRE(n.has_value());
  REQUIRE(*n >= 4);
  CHECK((ext[0].length == 64 * 1024 && ext[0].depth == 2 && ext[0].allocated));
  CHECK((ext[1].length == 64 * 1024 && ext[1].depth == 1));
  CHECK(ext[*n - 1].depth == 2);
  CHECK(ext[*n - 1].zero);
  CHECK_FALSE(ext[*n - 1].allocated);
}

TEST_CASE("backing chain errors: missing file, loop, depth bound, writable qcow2") {
  if (!qnbd::test::have_qemu_img()) {
    MESSAGE("qemu-img not installed: skipped");
    return;
  }
  using qnbd::test::run;
  qnbd::test::TempDir d;
  const std::string dir = d.path.string();
  REQUIRE(run("cd " + dir +
              " && qemu-img create -f raw b.raw 1M && qemu-img create -f qcow2 -b b.raw -F raw t.qcow2 1M") == 0);
  REQUIRE(run("cd " + dir + " && rm b.raw") == 0);
  check_fails_naming(open_image(d / "t.qcow2", OpenOptions{}), 0, "b.raw");

  // a -> b -> a
  REQUIRE(run("cd " + dir +
              " && qemu-img create -f qcow2 a.qcow2 1M && qemu-img create -f qcow2 -b a.qcow2 -F qcow2 c.qcow2 1M"
              " && qemu-img rebase -u -b c.qcow2 -F qcow2 a.qcow2") == 0);
  check_fails_naming(open_image(d / "c.qcow2", OpenOptions{}), 0, "loop");

  REQUIRE(run("cd " + dir +
              " && qemu-img create -f qcow2 l0.qcow2 1M && qemu-img create -f qcow2 -b l0.qcow2 -F qcow2 l1.qcow2 1M"
              " && qemu-img create -f qcow2 -b l1.qcow2 -F qcow2 l2.qcow2 1M") == 0);
  OpenOptions shallow;
  shallow.max_backing_depth = 1;
  check_fails_naming(open_image(d / "l2.qcow2", shallow), 0, "too deep");
  CHECK(open_image(d / "l2.qcow2", OpenOptions{}).has_value());

  // A writable open of the top of a chain works (backing files stay read-only).
  OpenOptions rw;
  rw.read_only = false;
  auto r = open_image(d / "l1.qcow2", rw);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  CHECK((*r)->capabilities().writable);
  REQUIRE((*r)->backing() != nullptr);
  CHECK_FALSE((*r)->backing()->capabilities().writable);
}

TEST_CASE("snapshot table and bitmap directory are parsed and exposed") {
  if (!qnbd::test::have_qemu_img()) {
    MESSAGE("qemu-img not installed: skipped");
    return;
  }
  using qnbd::test::run;
  qnbd::test::TempDir d;
  const std::string p = d / "s.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 -o cluster_size=4k " + p + " 3M") == 0);
  REQUIRE(run("qemu-io -c 'write -P 1 0 64k' " + p) == 0);
  REQUIRE(run("qemu-img snapshot -c first " + p + " && qemu-img snapshot -c second " + p) == 0);
  REQUIRE(run("qemu-img bitmap --add -g 64k " + p + " b0 && qemu-img bitmap --add --disable " + p + " b1") == 0);
  auto dev = open_image(p, OpenOptions{});
  REQUIRE_MESSAGE(dev.has_value(), dev.error().message);
  ImageInfo info = (*dev)->info();
  REQUIRE(info.snapshots.size() == 2);
  CHECK(info.snapshots[0].name == "first");
  CHECK(info.snapshots[1].name == "second");
  CHECK(info.snapshots[0].id == "1");
  CHECK(info.snapshots[0].disk_size == std::optional<std::uint64_t>(3u << 20));
  REQUIRE(info.bitmaps.size() == 2);
  CHECK(info.bitmaps[0].name == "b0");
  CHECK(info.bitmaps[0].granularity == 65536);
  CHECK(info.bitmaps[0].auto_enabled);
  CHECK_FALSE(info.bitmaps[0].in_use);
  CHECK(info.bitmaps[1].name == "b1");
  CHECK_FALSE(info.bitmaps[1].auto_enabled);
  CHECK(info.bitmaps[1].table_size == 1);
  CHECK(info.compat == "1.1");
  CHECK(info.cluster_size == 4096);

  // A bitmap left in use by a crashed writer is listed with its flag.
  // (Closed first: our open holds the image lock qemu-io would refuse.)
  dev->reset();
  REQUIRE(run("qemu-io -c 'write 0 4k' -c abort " + p + " || true") == 0);
  dev = open_image(p, OpenOptions{});
  REQUIRE_MESSAGE(dev.has_value(), dev.error().message);
  info = (*dev)->info();
  REQUIRE(info.bitmaps.size() == 2);
  CHECK(info.bitmaps[0].in_use);
}

// get_host_offset's runs over long stretches of unallocated entries (which
// it skips a word at a time) against a per-subcluster model: the same type
// and the same length for every start and limit, with the nonzero entries
// placed around the 8-entry blocks the skip reads, and, with extended L2,
// entries whose first word is zero and whose bitmap is not.
TEST_CASE("qcow2 on MemFile: runs across unallocated stretches match a per-subcluster model") {
  for (const bool extended : {false, true}) {
    CAPTURE(extended);
    HandImage h;
    h.extended_l2 = extended;
    h.cluster_bits = extended ? 14 : 12;  // 1,024 and 512 entries in the one L2 table
    const std::uint64_t entries = h.cs() / h.l2_entry_size();
    h.size = entries * h.cs();
    constexpr unsigned kData = 6;
    h.build(kData);
    const unsigned spc = extended ? 32 : 1;
    const std::uint64_t sc_size = h.cs() / spc;
    // The model: one type per subcluster. Data clusters take host clusters
    // in descending order, so no two are contiguous and a data run ends
    // with its cluster.
    std::vector<SubclusterType> model(entries * spc, SubclusterType::unallocated_plain);
    std::vector<std::uint64_t> cluster_of_data(entries, ~0ull);
    const std::uint64_t nonzero[] = {7, 8, 9, 16, 63, 64, 65, 200, 201, 311, entries - 1};
    unsigned next_data = kData;
    for (std::size_t i = 0; i < std::size(nonzero); ++i) {
      const std::uint64_t c = nonzero[i];
      if (i % 3 == 0 && next_data > 0) {
        const std::uint64_t host = h.data_offset(--next_data);
        // Standard: the whole cluster. Extended: its first 3 subclusters.
        h.set_l2(c, QCOW_OFLAG_COPIED | host, extended ? 0x7 : 0);
        for (unsigned s = 0; s < (extended ? 3u : 1u); ++s) model[c * spc + s] = SubclusterType::normal;
        if (extended) {
          for (unsigned s = 3; s < spc; ++s) model[c * spc + s] = SubclusterType::unallocated_alloc;
        }
        cluster_of_data[c] = host;
      } else if (extended) {
        // Entry word 0, bitmap: subclusters 5 and 6 read as zeroes.
        h.set_l2(c, 0, (std::uint64_t{0x60}) << 32);
        model[c * spc + 5] = model[c * spc + 6] = SubclusterType::zero_plain;
      } else {
        h.set_l2(c, QCOW_OFLAG_ZERO);
        model[c] = SubclusterType::zero_plain;
      }
    }
    auto img = open_hand(h);
    REQUIRE_MESSAGE(img.has_value(), img.error().message);
    auto expected_bytes = [&](std::uint64_t offset, std::uint64_t max_bytes) {
      const std::uint64_t first = offset / sc_size;
      std::uint64_t s = first + 1;
      while (s < model.size() && model[s] == model[first] &&
             !(model[first] == SubclusterType::normal && s / spc != first / spc) &&
             !(model[first] == SubclusterType::unallocated_alloc && s / spc != first / spc)) {
        ++s;
      }
      return std::min(max_bytes, s * sc_size - offset);
    };
    std::mt19937_64 rng(extended ? 2 : 1);
    for (int i = 0; i < 4000; ++i) {
      const std::uint64_t offset = rng() % h.size;
      const std::uint64_t max_bytes = 1 + rng() % (i % 2 ? h.size : 64 * h.cs());
      auto m = (*img)->get_host_offset(offset, max_bytes);
      REQUIRE_MESSAGE(m.has_value(), m.error().message);
      const std::uint64_t want = expected_bytes(offset, std::min(max_bytes, h.size - offset));
      if (m->type != model[offset / sc_size] || m->bytes != want) {
        FAIL_CHECK(fmt::format("offset {} max {}: got {} bytes of {}, want {} of {}", offset, max_bytes, m->bytes,
                               to_string(m->type), want, to_string(model[offset / sc_size])));
      }
    }
  }
}
