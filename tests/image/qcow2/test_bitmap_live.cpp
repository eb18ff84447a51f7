// Live bitmap edits (image/checkpoint.hpp, bitmap_live.cpp) on qcow2 images
// made by qemu-img: each live command beside its at-rest twin
// (edit_bitmaps) on the same starting image gives the same directory and
// contents; writes are marked on exactly one side of a checkpoint, in the
// order of the calls; the pause writers see is measured.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <map>
#include <thread>

#include "image/block_device.hpp"
#include "image/checkpoint.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image_test_support.hpp"

using namespace qnbd::image;
using namespace qnbd::image::qcow2;
using qnbd::test::run;
using qnbd::test::TempDir;

namespace {

// "c<i>", built without `"c" + std::to_string(i)`: g++ 12 at -O3 reports a
// false -Wrestrict on that concatenation (GCC bug 105329).
std::string checkpoint_name(int i) {
  std::string s = std::to_string(i);
  s.insert(s.begin(), 'c');
  return s;
}

std::unique_ptr<BlockDevice> open_rw(const std::string& path) {
  OpenOptions o;
  o.format = ImageFormat::qcow2;
  o.read_only = false;
  auto d = open_image(path, o);
  REQUIRE_MESSAGE(d, d.error().message);
  return std::move(*d);
}

LiveBitmapOp op(LiveBitmapOp::Kind k, std::string name, std::string source = "", std::uint64_t g = 0,
                bool disabled = false) {
  LiveBitmapOp o;
  o.kind = k;
  o.name = std::move(name);
  o.source = std::move(source);
  o.granularity = g;
  o.disabled = disabled;
  return o;
}

qnbd::Result<EditTiming> live(BlockDevice& d, std::vector<LiveBitmapOp> ops) {
  return apply_bitmap_edits({DeviceEdit{&d, std::move(ops)}});
}

qnbd::Result<void> at_rest(const std::string& path, const LiveBitmapOp& o) {
  auto f = open_posix_file(path, OpenMode::read_write, CacheMode::writeback);
  REQUIRE_MESSAGE(f, f.error().message);
  BitmapEdit e;
  e.bitmap = o.name;
  e.granularity = o.granularity;
  e.ops.push_back(BitmapOp{static_cast<BitmapOp::Kind>(o.kind), o.source});
  if (o.disabled) e.ops.push_back(BitmapOp{BitmapOp::Kind::disable, ""});
  return edit_bitmaps(**f, e);
}

// qemu-img info's view of the bitmaps: "name granularity flags..." lines.
std::string qemu_bitmaps(const std::string& path) {
  TempDir t;
  const std::string out = t / "info";
  REQUIRE(run("qemu-img info -U --output=json " + path + " | python3 -c 'import json,sys; "
              "b=json.load(sys.stdin).get(\"format-specific\",{}).get(\"data\",{}).get(\"bitmaps\",[]); "
              "[print(x[\"name\"],x[\"granularity\"],*sorted(x[\"flags\"])) for x in b]' > " + out) == 0);
  auto bytes = qnbd::test::read_whole(out);
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// Dirty granules of bitmap `name` as "offset,offset,...", read from the
// image at rest.
std::string dirty_of(const std::string& path, const std::string& name) {
  auto f = open_posix_file(path, OpenMode::read_only, CacheMode::writeback);
  REQUIRE_MESSAGE(f, f.error().message);
  auto b = load_named_bitmap(**f, name);
  REQUIRE_MESSAGE(b, b.error().message);
  std::string s;
  for (std::uint64_t off = 0; off < b->size(); off += b->granularity()) {
    if (b->is_dirty(off)) s += std::to_string(off) + ",";
  }
  return s;
}

void write_at(BlockDevice& d, std::uint64_t off, std::size_t len, std::uint8_t v) {
  std::vector<std::byte> buf(len, std::byte{v});
  auto r = d.write(buf, off, false);
  REQUIRE_MESSAGE(r, r.error().message);
}

}  // namespace

TEST_CASE("live bitmap commands leave the image as their at-rest twins do") {
  if (!qnbd::test::have_qemu_img()) return;
  TempDir t;
  const std::string a = t / "live.qcow2", b = t / "rest.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + a + " 8M") == 0);
  REQUIRE(run("qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1M 8k' " + a) == 0);
  REQUIRE(run("qemu-img bitmap --add " + a + " old && qemu-io -c 'write -P 3 2M 4k' " + a) == 0);
  REQUIRE(run("qemu-img bitmap --add -g 4096 " + a + " off && qemu-img bitmap --disable " + a + " off") == 0);
  REQUIRE(run("qemu-io -c 'write -P 4 3M 4k' " + a + " && cp " + a + " " + b) == 0);

  using K = LiveBitmapOp::Kind;
  const std::vector<LiveBitmapOp> steps = {
      op(K::add, "n1"),          op(K::add, "n2", "", 512, true), op(K::merge, "n2", "old"),
      op(K::merge, "n1", "off"), op(K::disable, "old"),           op(K::enable, "off"),
      op(K::clear, "n1"),        op(K::merge, "n1", "n2"),        op(K::remove, "n2"),
      op(K::add, "n2", "", 65536), op(K::disable, "n1"),
  };
  auto dev = open_rw(a);
  for (const LiveBitmapOp& s : steps) {
    INFO("op " << int(s.kind) << " " << s.name);
    auto r = live(*dev, {s});
    REQUIRE_MESSAGE(r, r.error().message);
    auto q = at_rest(b, s);
    REQUIRE_MESSAGE(q, q.error().message);
  }
  // The live image shows its enabled bitmaps in_use while open.
  CHECK(qemu_bitmaps(a).find("in-use") != std::string::npos);
  REQUIRE(dev->close());
  dev.reset();
  CHECK(qemu_bitmaps(a) == qemu_bitmaps(b));
  CHECK(qemu_bitmaps(a).find("n1 65536\n") != std::string::npos);  // disabled: no flags
  for (const char* n : {"n1", "old", "off", "n2"}) CHECK(dirty_of(a, n) == dirty_of(b, n));
  CHECK(dirty_of(a, "n1") == "2097152,3145728,");  // n2 took old: the writes after old was added
  CHECK(run("qemu-img check " + a) == 0);
}

TEST_CASE("live bitmap commands refuse what the at-rest ones refuse, in the same words") {
  if (!qnbd::test::have_qemu_img()) return;
  TempDir t;
  const std::string a = t / "live.qcow2", b = t / "rest.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + a + " 4M && qemu-img bitmap --add " + a + " x && cp " + a + " " + b) == 0);
  using K = LiveBitmapOp::Kind;
  auto dev = open_rw(a);
  for (const LiveBitmapOp& s : {op(K::add, "x"), op(K::remove, "nope"), op(K::merge, "x", "nope"),
                                op(K::add, "y", "", 1000), op(K::add, std::string(1024, 'n')),
                                op(K::clear, "nope"), op(K::enable, "nope")}) {
    auto r = live(*dev, {s});
    auto q = at_rest(b, s);
    REQUIRE(!r);
    REQUIRE(!q);
    CHECK(r.error().message == q.error().message);
    CHECK(r.error().code == q.error().code);
  }
  // A refused checkpoint changes nothing on any device.
  auto r = checkpoint({dev.get()}, "c1", "nope");
  REQUIRE(!r);
  auto st = dev->bitmap_states();
  REQUIRE(st);
  CHECK(st->size() == 1);
  REQUIRE(dev->close());
}

TEST_CASE("checkpoints split concurrent writes exactly, in call order, on every device") {
  if (!qnbd::test::have_qemu_img()) return;
  TempDir t;
  const std::string pa = t / "a.qcow2", pb = t / "b.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + pa + " 64M && qemu-img create -f qcow2 " + pb + " 64M") == 0);
  auto da = open_rw(pa), db = open_rw(pb);
  std::vector<BlockDevice*> devs{da.get(), db.get()};
  REQUIRE(checkpoint(devs, "c0", "", 4096));

  using clock = std::chrono::steady_clock;
  struct Write {
    int dev;
    std::uint64_t off;
    clock::time_point sent, acked;
  };
  constexpr int kThreads = 4, kCheckpoints = 10;
  std::mutex log_mu;
  std::vector<Write> log;
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  for (int w = 0; w < kThreads; ++w) {
    writers.emplace_back([&, w] {
      // Each write its own 4 KiB granule, so a granule names one write.
      for (std::uint64_t k = 0; !stop.load() && k < 2000; ++k) {
        const int dev = int(k % 2);
        const std::uint64_t off = (k * kThreads + w) * 4096 % (64ull << 20);
        Write rec{dev, off, clock::now(), {}};
        std::vector<std::byte> buf(4096, std::byte(w + 1));
        auto r = devs[dev]->write(buf, off, false);
        if (!r) FAIL(r.error().message);
        rec.acked = clock::now();
        std::lock_guard lock(log_mu);
        log.push_back(rec);
      }
    });
  }
  std::vector<std::pair<clock::time_point, clock::time_point>> calls;  // checkpoint i's start and return
  std::chrono::nanoseconds max_pause{0};
  for (int i = 1; i <= kCheckpoints; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const auto s = clock::now();
    auto r = checkpoint(devs, checkpoint_name(i), checkpoint_name(i - 1), 4096);
    REQUIRE_MESSAGE(r, r.error().message);
    calls.emplace_back(s, clock::now());
    max_pause = std::max(max_pause, r->pause);
  }
  stop = true;
  for (auto& th : writers) th.join();
  REQUIRE(da->close());
  REQUIRE(db->close());
  da.reset();  // releases the image locks for qemu-img
  db.reset();
  MESSAGE("writes: " << log.size() << ", longest checkpoint pause: "
                     << std::chrono::duration<double, std::milli>(max_pause).count() << " ms");
  // The pause is reported, not asserted: a time limit in a test fails on a
  // loaded machine (bench/checkpoint.py measures it).

  // Which checkpoint's bitmap holds each granule, read back from disk.
  const std::string paths[2] = {pa, pb};
  std::vector<std::map<std::uint64_t, int>> holder(2);
  for (int dev = 0; dev < 2; ++dev) {
    auto f = open_posix_file(paths[dev], OpenMode::read_only, CacheMode::writeback);
    REQUIRE(f);
    for (int i = 0; i <= kCheckpoints; ++i) {
      auto b = load_named_bitmap(**f, checkpoint_name(i));
      REQUIRE_MESSAGE(b, b.error().message);
      for (std::uint64_t off = 0; off < b->size(); off += 4096) {
        if (!b->is_dirty(off)) continue;
        CHECK_MESSAGE(holder[dev].count(off) == 0, "granule " << off << " in two checkpoints");
        holder[dev][off] = i;
      }
    }
  }
  std::size_t granules = 0;
  for (const Write& w : log) {
    auto it = holder[w.dev].find(w.off);
    REQUIRE_MESSAGE(it != holder[w.dev].end(), "write at " << w.off << " missed");
    const int i = it->second;  // recorded in c_i: after checkpoint i, before checkpoint i+1
    if (i > 0) CHECK_MESSAGE(w.acked > calls[i - 1].first, "write acked before checkpoint " << i << " is after it");
    if (i < kCheckpoints) CHECK_MESSAGE(w.sent < calls[i].second, "write sent after checkpoint " << i + 1 << " is before it");
    ++granules;
  }
  CHECK(holder[0].size() + holder[1].size() == granules);  // nothing but the writes
  CHECK(run("qemu-img check " + pa + " && qemu-img check " + pb) == 0);
}

TEST_CASE("a live-added bitmap records writes until it is disabled, and again once enabled") {
  if (!qnbd::test::have_qemu_img()) return;
  TempDir t;
  const std::string a = t / "a.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + a + " 4M") == 0);
  using K = LiveBitmapOp::Kind;
  auto dev = open_rw(a);
  write_at(*dev, 0, 4096, 1);  // before the bitmap exists
  REQUIRE(live(*dev, {op(K::add, "w", "", 65536)}));
  write_at(*dev, 1 << 20, 4096, 2);
  REQUIRE(live(*dev, {op(K::disable, "w")}));
  // Disabled: consistent on disk now, while the image is still open.
  CHECK(dirty_of(a, "w") == "1048576,");
  write_at(*dev, 2 << 20, 4096, 3);
  REQUIRE(live(*dev, {op(K::enable, "w")}));
  write_at(*dev, 3 << 20, 100, 4);
  auto st = dev->bitmap_states();
  REQUIRE(st);
  REQUIRE(st->size() == 1);
  CHECK((*st)[0].enabled);
  CHECK((*st)[0].dirty_bytes == 2 * 65536);
  REQUIRE(dev->close());
  dev.reset();
  CHECK(dirty_of(a, "w") == "1048576,3145728,");
  CHECK(run("qemu-img check " + a) == 0);
}
