// Persistent bitmaps on qcow2 images made by qemu-img/qemu-io: table entry
// decoding (incl. all-ones and invalid entries), in_use marking on the first
// write (QEMU's in-place directory update), and storing on close compared with
// what qemu-io records for the same writes; the result passes qemu-img check.
#include <doctest/doctest.h>

#include <fstream>
#include <thread>

#include "common/endian.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/bitmap.hpp"
#include "image/qcow2/bitmap_store.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/refcount.hpp"
#include "image_test_support.hpp"

using namespace qnbd::image;
using namespace qnbd::image::qcow2;
using qnbd::load_be64;
using qnbd::Result;
using qnbd::store_be64;
using qnbd::test::run;

namespace {

struct Loaded {
  std::unique_ptr<MemFile> file;
  Header header;
  std::vector<BitmapInfo> dir;
};

Loaded load(const std::string& path) {
  Loaded l;
  l.file = std::make_unique<MemFile>(path, qnbd::test::read_whole(path));
  auto bytes = l.file->contents();
  auto h = parse_header(std::span(bytes).first(std::min<std::size_t>(bytes.size(), 2 << 20)), bytes.size());
  REQUIRE_MESSAGE(h, h.error().message);
  l.header = *h;
  auto d = read_bitmap_directory(*l.file, l.header, bytes.size());
  REQUIRE_MESSAGE(d, d.error().message);
  l.dir = *d;
  return l;
}

const BitmapInfo& find(const std::vector<BitmapInfo>& dir, const std::string& name) {
  for (const auto& b : dir) {
    if (b.name == name) return b;
  }
  FAIL("no bitmap " << name);
  throw 0;
}

DirtyBitmap data_of(Loaded& l, const std::string& name) {
  auto b =
      load_bitmap_data(*l.file, l.header.cluster_size(), l.header.size, find(l.dir, name), l.file->contents().size());
  REQUIRE_MESSAGE(b, b.error().message);
  return std::move(*b);
}

void save(const MemFile& f, const std::string& path) {
  auto c = f.contents();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(c.data()), static_cast<std::streamsize>(c.size()));
}

bool same_bits(const DirtyBitmap& a, const DirtyBitmap& b) {
  if (a.size() != b.size() || a.granularity() != b.granularity()) return false;
  for (std::uint64_t off = 0; off < a.size(); off += a.granularity()) {
    if (a.is_dirty(off) != b.is_dirty(off)) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("bitmap data: all-ones and all-zeroes table entries, invalid entries refused") {
  if (!qnbd::test::have_qemu_img()) return;
  qnbd::test::TempDir d;
  const std::string p = d / "a.qcow2";
  // 512 B clusters, 512 B granularity, 4 MiB: 8192 bits = 1024 bytes = 2 clusters of data.
  REQUIRE(run("qemu-img create -f qcow2 -o cluster_size=512 " + p + " 4M") == 0);
  REQUIRE(run("qemu-img bitmap --add -g 512 " + p + " b") == 0);
  REQUIRE(run("qemu-io -c 'write 0 512' -c 'write 3M 1' " + p) == 0);
  Loaded l = load(p);
  const BitmapInfo& b = find(l.dir, "b");
  REQUIRE(b.table_size == 2);
  DirtyBitmap bits = data_of(l, "b");
  CHECK(bits.count_dirty() == 2);
  CHECK(bits.is_dirty(0));
  CHECK(bits.is_dirty(3 << 20));

  // Entry 1 := all ones (bit 0, no offset): bits 4096..8191 all dirty.
  std::byte e[8];
  store_be64(e, 1);
  REQUIRE(l.file->pwrite(e, b.table_offset + 8));
  bits = data_of(l, "b");
  CHECK(bits.count_dirty() == 1 + 4096);
  CHECK(bits.is_dirty(4096ull * 512));
  CHECK(!bits.is_dirty(512));
  // Entry 0 := 0: all zeroes.
  store_be64(e, 0);
  REQUIRE(l.file->pwrite(e, b.table_offset));
  CHECK(data_of(l, "b").count_dirty() == 4096);
  // Reserved bits, all-ones with an offset, unaligned offset: refused.
  for (std::uint64_t bad : {0x2ull, (1ull << 56), 0x10001ull * 512 + 1, 0x200ull * 3 + 0x100}) {
    store_be64(e, bad);
    REQUIRE(l.file->pwrite(e, b.table_offset));
    auto r = load_bitmap_data(*l.file, l.header.cluster_size(), l.header.size, b, l.file->contents().size());
    CHECK_MESSAGE(!r, "entry " << bad);
  }
}

TEST_CASE("bitmaps: first write marks enabled bitmaps in_use once; store on close matches qemu-io") {
  if (!qnbd::test::have_qemu_img()) return;
  qnbd::test::TempDir d;
  const std::string p = d / "w.qcow2", ref = d / "ref.qcow2", out = d / "out.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 -o cluster_size=4k " + p + " 64M") == 0);
  REQUIRE(run("qemu-img bitmap --add -g 512 " + p + " fine") == 0);
  REQUIRE(run("qemu-img bitmap --add -g 2M " + p + " coarse") == 0);
  REQUIRE(run("qemu-img bitmap --add --disable " + p + " off") == 0);
  REQUIRE(run("qemu-io -c 'write 1M 64k' " + p) == 0);  // before: in fine, coarse
  REQUIRE(run("cp " + p + " " + ref) == 0);
  // The same guest changes through qemu-io (the reference) and our hook.
  REQUIRE(run("qemu-io -c 'write 1000 3000' -c 'write -z 20M 100k' -c 'discard 40M 8k' -c 'write 67108863 1' " + ref) ==
          0);
  struct W {
    std::uint64_t off, len;
  };
  const std::vector<W> writes{{1000, 3000}, {20 << 20, 100 << 10}, {40 << 20, 8 << 10}, {67108863, 1}};

  Loaded l = load(p);
  const std::uint64_t fsize = l.file->contents().size();
  BitmapStore store(*l.file, l.header, l.dir, fsize, /*writable=*/true);
  const std::uint64_t flushes0 = l.file->flush_count();
  for (const W& w : writes) REQUIRE(store.before_write(w.off, w.len));
  CHECK(store.marked_in_use());
  CHECK(l.file->flush_count() - flushes0 == 3);  // the in-place protocol, once
  {
    auto on_disk = read_bitmap_directory(*l.file, l.header, fsize);
    REQUIRE(on_disk);
    CHECK(find(*on_disk, "fine").in_use);
    CHECK(find(*on_disk, "coarse").in_use);
    CHECK(!find(*on_disk, "off").in_use);  // disabled bitmaps never change
    auto c = l.file->contents();
    CHECK((load_be64(c.data() + 88) & AUTOCLEAR_BITMAPS) != 0);
  }
  // Live status sees the new writes.
  auto h = store.export_bitmap("fine");
  REQUIRE(h);
  std::vector<BitmapExtent> ext(16);
  auto n = store.status(*h, 0, 8192, ext);
  REQUIRE(n);
  REQUIRE(*n >= 2);
  CHECK(!ext[0].dirty);
  CHECK(ext[0].length == 512);
  CHECK(ext[1].dirty);

  auto rc = Refcounts::load(*l.file, RefcountGeometry{l.header.cluster_bits, l.header.refcount_order},
                            l.header.refcount_table_offset, l.header.refcount_table_clusters);
  REQUIRE_MESSAGE(rc, rc.error().message);
  auto st = store.store(*rc, l.header);
  REQUIRE_MESSAGE(st, st.error().message);
  CHECK(!store.marked_in_use());
  save(*l.file, out);
  CHECK(run("qemu-img check " + out) == 0);
  CHECK(run("qemu-img info " + out + " | grep -q in-use") != 0);

  Loaded mine = load(out), theirs = load(ref);
  for (const char* name : {"fine", "coarse", "off"}) {
    CAPTURE(name);
    CHECK(find(mine.dir, name).auto_enabled == find(theirs.dir, name).auto_enabled);
    CHECK(same_bits(data_of(mine, name), data_of(theirs, name)));
  }
  CHECK(data_of(mine, "fine").count_dirty() > 0);
}

TEST_CASE("bitmaps: read-only stores refuse writes, in_use bitmaps are not exported") {
  if (!qnbd::test::have_qemu_img()) return;
  qnbd::test::TempDir d;
  const std::string p = d / "r.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + p + " 1M && qemu-img bitmap --add " + p + " a") == 0);
  REQUIRE(run("qemu-img bitmap --add " + p + " b && qemu-io -c 'write 0 4k' -c abort " + p + " || true") == 0);
  Loaded l = load(p);
  BitmapStore store(*l.file, l.header, l.dir, l.file->contents().size(), false);
  CHECK(!store.before_write(0, 1));
  auto r = store.export_bitmap("a");
  REQUIRE(!r);
  CHECK(r.error().message == "Bitmap 'a' is inconsistent and cannot be used");
  r = store.export_bitmap("zz");
  REQUIRE(!r);
  CHECK(r.error().message == "Bitmap 'zz' is not found");
}

TEST_CASE("bitmaps: concurrent first writes mark in_use exactly once and lose no granule") {
  if (!qnbd::test::have_qemu_img()) return;
  qnbd::test::TempDir d;
  const std::string p = d / "c.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + p + " 16M && qemu-img bitmap --add -g 4k " + p + " a") == 0);
  Loaded l = load(p);
  BitmapStore store(*l.file, l.header, l.dir, l.file->contents().size(), true);
  const std::uint64_t flushes0 = l.file->flush_count();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (std::uint64_t k = 0; k < 256; ++k) CHECK(store.before_write((k * 4 + t) * 8192, 1));
    });
  }
  for (auto& th : threads) th.join();
  CHECK(l.file->flush_count() - flushes0 == 3);
  auto h = store.export_bitmap("a");
  REQUIRE(h);
  std::vector<BitmapExtent> ext(4096);
  auto n = store.status(*h, 0, 16 << 20, ext);
  REQUIRE(n);
  std::uint64_t dirty = 0;
  for (std::size_t i = 0; i < *n; ++i) dirty += ext[i].dirty ? ext[i].length : 0;
  CHECK(dirty == 1024 * 4096);  // every other 4 KiB granule of the first 8 MiB
}

namespace {

// Forwards to a MemFile and records writes and flushes in order.
class RecordingFile final : public File {
 public:
  explicit RecordingFile(MemFile& inner) : inner_(inner) {}
  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override {
    return inner_.pread(buf, offset);
  }
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override {
    log.push_back({'w', offset, buf.size()});
    return inner_.pwrite(buf, offset);
  }
  Result<void> flush() override {
    log.push_back({'f', 0, 0});
    return inner_.flush();
  }
  Result<void> truncate(std::uint64_t size) override { return inner_.truncate(size); }
  Result<std::uint64_t> size() override { return inner_.size(); }
  const std::string& name() const override { return inner_.name(); }
  struct Event {
    char kind;
    std::uint64_t offset, length;
  };
  std::vector<Event> log;

 private:
  MemFile& inner_;
};

}  // namespace

TEST_CASE("bitmaps: crash ordering of the in_use update and of the store on close") {
  if (!qnbd::test::have_qemu_img()) return;
  qnbd::test::TempDir d;
  const std::string p = d / "o.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + p + " 16M && qemu-img bitmap --add " + p + " a") == 0);
  Loaded l = load(p);
  RecordingFile rec(*l.file);
  const std::uint64_t dir_offset = l.header.bitmaps->bitmap_directory_offset;
  BitmapStore store(rec, l.header, l.dir, l.file->contents().size(), true);
  REQUIRE(store.before_write(4096, 1));
  REQUIRE(store.before_write(8192, 1));
  // QEMU's in-place update (update_ext_header_and_dir_in_place): autoclear bit
  // off + flush, directory + flush, autoclear bit on + flush.
  REQUIRE(rec.log.size() == 6);
  CHECK((rec.log[0].kind == 'w' && rec.log[0].offset == 88));
  CHECK(rec.log[1].kind == 'f');
  CHECK((rec.log[2].kind == 'w' && rec.log[2].offset == dir_offset));
  CHECK(rec.log[3].kind == 'f');
  CHECK((rec.log[4].kind == 'w' && rec.log[4].offset == 88));
  CHECK(rec.log[5].kind == 'f');

  rec.log.clear();
  auto rc = Refcounts::load(rec, RefcountGeometry{l.header.cluster_bits, l.header.refcount_order},
                            l.header.refcount_table_offset, l.header.refcount_table_clusters);
  REQUIRE(rc);
  REQUIRE(store.store(*rc, l.header));
  // Exactly one header write; everything written before it is flushed
  // before it, and it is flushed before anything else is written.
  std::size_t header_at = rec.log.size();
  for (std::size_t i = 0; i < rec.log.size(); ++i) {
    if (rec.log[i].kind == 'w' && rec.log[i].offset == 0) {
      CHECK(header_at == rec.log.size());
      header_at = i;
    }
  }
  REQUIRE(header_at < rec.log.size());
  REQUIRE(header_at > 0);
  CHECK(rec.log[header_at - 1].kind == 'f');
  REQUIRE(header_at + 1 < rec.log.size());
  CHECK(rec.log[header_at + 1].kind == 'f');
  CHECK(l.header.bitmaps->bitmap_directory_offset != dir_offset);  // a new directory
  // The old directory cluster is free again.
  auto refcount = rc->get(dir_offset >> l.header.cluster_bits);
  REQUIRE(refcount);
  CHECK(*refcount == 0);
}
