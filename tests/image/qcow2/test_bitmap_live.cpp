// Live bitmap edits (image/checkpoint.hpp, bitmap_live.cpp) on qcow2 images
// made by qemu-img: each live command beside its at-rest twin
// (edit_bitmaps) on the same starting image gives the same directory and
// contents; writes are marked on exactly one side of a checkpoint, in the
// order of the calls; the pause writers see is measured.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "image/block_device.hpp"
#include "image/checkpoint.hpp"
#include "image/io/crash_file.hpp"
#include "image/io/file.hpp"
#include "image/io/forwarding_file.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/bitmap.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image/qcow2/bitmap_store.hpp"
#include "image/qcow2/check.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/qcow2_image.hpp"
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
  REQUIRE(run("qemu-img info -U --output=json " + path +
              " | python3 -c 'import json,sys; "
              "b=json.load(sys.stdin).get(\"format-specific\",{}).get(\"data\",{}).get(\"bitmaps\",[]); "
              "[print(x[\"name\"],x[\"granularity\"],*sorted(x[\"flags\"])) for x in b]' > " +
              out) == 0);
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

// The qcow2 image at `path` opened for writing over `file` (a wrapper that
// holds or records its syncs).
std::unique_ptr<Qcow2Image> open_writable_over(std::unique_ptr<File> file, const std::string& path) {
  Qcow2Image::Parts parts;
  parts.file = std::move(file);
  parts.path = path;
  OpenOptions o;
  o.read_only = false;
  auto img = Qcow2Image::open(std::move(parts), o);
  REQUIRE_MESSAGE(img, img.error().message);
  return std::move(*img);
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
      op(K::add, "n1"),          op(K::add, "n2", "", 512, true),
      op(K::merge, "n2", "old"), op(K::merge, "n1", "off"),
      op(K::disable, "old"),     op(K::enable, "off"),
      op(K::clear, "n1"),        op(K::merge, "n1", "n2"),
      op(K::remove, "n2"),       op(K::add, "n2", "", 65536),
      op(K::disable, "n1"),
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
  for (const LiveBitmapOp& s :
       {op(K::add, "x"), op(K::remove, "nope"), op(K::merge, "x", "nope"), op(K::add, "y", "", 1000),
        op(K::add, std::string(1024, 'n')), op(K::clear, "nope"), op(K::enable, "nope")}) {
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
    if (i < kCheckpoints)
      CHECK_MESSAGE(w.sent < calls[i].second, "write sent after checkpoint " << i + 1 << " is before it");
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

namespace {

// A file whose flush(), when called on the thread that armed it, stops
// until the test releases it: the persist step's syncs, held open.
class HeldSyncFile final : public ForwardingFile {
 public:
  using ForwardingFile::ForwardingFile;
  void arm() {
    std::lock_guard l(mu_);
    armed_ = std::this_thread::get_id();
  }
  void finished() {
    std::lock_guard l(mu_);
    armed_ = {};
    finished_ = true;
    cv_.notify_all();
  }
  // Until the armed thread is held in a flush (true) or finished (false).
  bool wait_held() {
    std::unique_lock l(mu_);
    cv_.wait(l, [&] { return holding_ || finished_; });
    return holding_;
  }
  void release() {
    std::lock_guard l(mu_);
    holding_ = false;
    cv_.notify_all();
  }
  qnbd::Result<void> flush() override {
    {
      std::unique_lock l(mu_);
      if (armed_ == std::this_thread::get_id()) {
        holding_ = true;
        cv_.notify_all();
        cv_.wait(l, [&] { return !holding_; });
      }
    }
    return ForwardingFile::flush();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread::id armed_;
  bool holding_ = false;
  bool finished_ = false;
};

}  // namespace

TEST_CASE("a guest write completes while the checkpoint's persist step waits for a sync") {
  // The persist step once held the image's metadata mutex across its
  // fsyncs, so an allocating write waited for them (hundreds of ms under
  // load). Each sync of the persist is held open here until a write that
  // needs the metadata mutex (it allocates a cluster) has completed. A
  // persist holding the mutex across a sync never lets that write finish:
  // after a minute the test gives up and fails (a deadlock guard, not a
  // time limit the correct code could miss).
  if (!qnbd::test::have_qemu_img()) return;
  TempDir t;
  const std::string a = t / "a.qcow2";
  REQUIRE(run("qemu-img create -q -f qcow2 -o cluster_size=65536 " + a + " 64M") == 0);
  auto inner = open_posix_file(a, OpenMode::read_write, CacheMode::writeback);
  REQUIRE(inner);
  auto held = std::make_unique<HeldSyncFile>(std::move(*inner));
  HeldSyncFile& file = *held;
  auto img = open_writable_over(std::move(held), a);
  BlockDevice& dev = *img;
  std::vector<BlockDevice*> devs{&dev};
  REQUIRE(checkpoint(devs, "c0", "", 65536));
  write_at(dev, 0, 4096, 1);  // marks c0 (and the bitmaps in_use on disk)

  bool persisted = false;
  std::thread persist([&] {
    file.arm();
    persisted = checkpoint(devs, "c1", "c0", 65536).has_value();
    file.finished();
  });
  int held_syncs = 0;
  std::uint64_t next = 1ull << 20;  // each write allocates a fresh cluster
  bool stalled = false;
  std::thread late;
  while (file.wait_held()) {
    ++held_syncs;
    if (stalled) {  // failed already: let the persist finish
      file.release();
      continue;
    }
    struct Outcome {  // shared: a stalled writer outlives this iteration
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      qnbd::Result<void> wrote = qnbd::ok();
    };
    auto out = std::make_shared<Outcome>();
    std::thread writer([&dev, out, off = next] {
      std::vector<std::byte> buf(4096, std::byte{2});
      auto r = dev.write(buf, off, false);
      std::lock_guard l(out->mu);
      out->wrote = std::move(r);
      out->done = true;
      out->cv.notify_all();
    });
    next += 1ull << 20;
    {
      std::unique_lock l(out->mu);
      stalled = !out->cv.wait_for(l, std::chrono::seconds(60), [&] { return out->done; });
    }
    CHECK_MESSAGE(!stalled, "a guest write waited for the persist step's sync");
    file.release();
    if (stalled) {
      // The writer waits for the persist, which may stop in its next sync:
      // join it once the persist is done.
      late = std::move(writer);
      continue;
    }
    writer.join();
    CHECK_MESSAGE(out->wrote, out->wrote.error().message);
  }
  persist.join();
  if (late.joinable()) late.join();
  CHECK(persisted);
  CHECK(held_syncs >= 1);
  REQUIRE(dev.close());
  img.reset();
  // The writes made during the syncs came after the checkpoint: c1 has
  // them, c0 only the first write.
  CHECK(dirty_of(a, "c0") == "0,");
  if (!stalled) {
    std::string expect;
    for (int i = 1; i <= held_syncs; ++i) expect += std::to_string(std::uint64_t(i) << 20) + ",";
    CHECK(dirty_of(a, "c1") == expect);
  }
  CHECK(run("qemu-img check -q " + a) == 0);
}

TEST_CASE("power loss at any write of a checkpoint's directory write leaves the old or the new directory") {
  // The directory write after a checkpoint (bitmap_store.cpp, phases 0-5)
  // runs with guest writes going on, so its ordering alone must keep the
  // image consistent: the image is cut at each of its mutating calls, with
  // the unsynced writes dropped, kept or torn per sector (CrashFile). The
  // result must pass the engine's check (leaks allowed, no corruption)
  // and hold either the old directory (c0 enabled, in_use) or the new one
  // (c0 disabled, consistent, holding exactly the write before the
  // checkpoint; c1 enabled, in_use).
  if (!qnbd::test::have_qemu_img()) return;
  TempDir t;
  const std::string path = t / "a.qcow2";
  REQUIRE(run("qemu-img create -q -f qcow2 -o cluster_size=4096 " + path + " 4M") == 0);
  const std::vector<std::byte> base = qnbd::test::read_whole(path);
  std::uint64_t points = 0;
  // The crashed image must pass the engine's check and hold the old or the
  // new directory (see above).
  auto verify = [&](const std::vector<std::byte>& crashed_bytes) {
    const std::vector<std::byte>* crashed = &crashed_bytes;
    MemFile after("a.qcow2", *crashed);
    std::string lines;
    auto c = check_qcow2(after, RepairMode::none, [&](const std::string& l) { lines += l + "\n"; });
    REQUIRE_MESSAGE(c, c.error().message);
    INFO("check:\n", lines);
    CHECK(c->corruptions == 0);
    CHECK(c->check_errors == 0);
    const std::uint64_t size = crashed->size();
    auto h =
        parse_header(std::span<const std::byte>(*crashed).first(std::min<std::size_t>(crashed->size(), 2 << 20)), size);
    REQUIRE_MESSAGE(h, h.error().message);
    auto dir = read_bitmap_directory(after, *h, size);
    REQUIRE_MESSAGE(dir, dir.error().message);
    std::string shape;
    for (const BitmapInfo& b : *dir)
      shape += b.name + (b.auto_enabled ? "+auto" : "") + (b.in_use ? "+in_use" : "") + " ";
    INFO("directory: ", shape);
    const bool old_dir = shape == "c0+auto+in_use ";
    const bool new_dir = shape == "c0 c1+auto+in_use ";
    CHECK((old_dir || new_dir));
    if (new_dir) {
      auto bits = load_bitmap_data(after, 4096, 4 << 20, (*dir)[0], size);
      REQUIRE_MESSAGE(bits, bits.error().message);
      std::string dirty;
      for (std::uint64_t off = 0; off < bits->size(); off += 4096)
        if (bits->is_dirty(off)) dirty += std::to_string(off) + ",";
      CHECK(dirty == "8192,");
    }
  };
  // The image open for writing over `file`, with checkpoint c0 taken and
  // one write (at 8192) made durable: each crash round starts here.
  auto open_after_c0 = [&](std::unique_ptr<File> file) {
    auto img = open_writable_over(std::move(file), path);
    std::vector<BlockDevice*> devs{img.get()};
    REQUIRE(checkpoint(devs, "c0", "", 4096));
    write_at(*img, 8192, 4096, 1);
    REQUIRE(img->flush());
    return img;
  };
  for (std::uint64_t n = 0;; ++n) {
    bool finished = false;
    for (std::uint64_t seed = 0; seed < 4; ++seed) {
      CAPTURE(n);
      CAPTURE(seed);
      CrashFile file("a.qcow2", base);
      // borrowed: the test reads the file afterwards
      auto img = open_after_c0(std::make_unique<ForwardingFile>(file));
      std::vector<BlockDevice*> devs{img.get()};
      file.arm_crash(n, seed);
      auto r = checkpoint(devs, "c1", "c0", 4096);
      auto crashed = file.crashed_image();
      if (!crashed) {  // the directory write made fewer than n mutating calls
        REQUIRE_MESSAGE(r, r.error().message);
        finished = true;  // (still armed: closing would cut the close; the image is dropped)
        break;
      }
      img.reset();  // without close: the file is frozen, as after power loss
      verify(*crashed);
      ++points;
    }
    if (finished) break;
    REQUIRE(n < 1000);
  }
  // Power loss just before each sync of the directory write completes:
  // what was written since the previous sync may or may not be there.
  {
    struct SyncPoints final : ForwardingFile {
      CrashFile& crash_file;
      bool armed = false;
      std::vector<std::vector<std::byte>> images;
      explicit SyncPoints(CrashFile& f) : ForwardingFile(f), crash_file(f) {}
      qnbd::Result<void> flush() override {
        if (armed)
          for (std::uint64_t seed = 0; seed < 8; ++seed) images.push_back(crash_file.crash(seed));
        return ForwardingFile::flush();
      }
    };
    CrashFile file("a.qcow2", base);
    auto sp = std::make_unique<SyncPoints>(file);
    SyncPoints& syncs = *sp;
    auto img = open_after_c0(std::move(sp));
    std::vector<BlockDevice*> devs{img.get()};
    syncs.armed = true;
    REQUIRE(checkpoint(devs, "c1", "c0", 4096));
    syncs.armed = false;
    CHECK(syncs.images.size() >= 8);
    for (const auto& image : syncs.images) {
      verify(image);
      ++points;
    }
    REQUIRE(img->close());
  }
  MESSAGE("crash points checked: " << points);
  CHECK(points >= 4);  // the directory write made mutating calls to cut
}

TEST_CASE("a crash after a live checkpoint recovers the new bitmap from the handed-over write-intent record") {
  if (!qnbd::test::have_qemu_img()) return;
  TempDir t;
  const std::string a = t / "a.qcow2";
  REQUIRE(run("qemu-img create -f qcow2 " + a + " 16M && qemu-img bitmap --add " + a + " b0") == 0);
  using K = LiveBitmapOp::Kind;
  OpenOptions o;
  o.format = ImageFormat::qcow2;
  o.read_only = false;
  o.recovery_chunk = 65536;  // one record bit per granule: exact expectations below
  auto d = open_image(a, o);
  REQUIRE_MESSAGE(d, d.error().message);
  auto& dev = **d;
  write_at(dev, 0, 4096, 1);  // arms the record; b0 and the record mark granule 0
  REQUIRE(live(dev, {op(K::add, "c1", "", 65536), op(K::disable, "b0")}));
  // The record was handed over (renamed), not dropped.
  CHECK(std::filesystem::exists(a + ".qnbd-intent"));
  CHECK_FALSE(std::filesystem::exists(a + ".qnbd-intent.next"));
  write_at(dev, 1 << 20, 4096, 2);  // after the checkpoint: c1 only
  REQUIRE(dev.flush());

  // A SIGKILL now: copy what the files hold while the image is still open.
  const std::string c = t / "c.qcow2";
  REQUIRE(run("cp " + a + " " + c + " && cp " + a + ".qnbd-intent " + c + ".qnbd-intent") == 0);
  CHECK(qemu_bitmaps(c) == "b0 65536\nc1 65536 auto in-use\n");
  {
    auto r = open_image(c, o);
    REQUIRE_MESSAGE(r, r.error().message);
    auto* img = dynamic_cast<Qcow2Image*>(r->get());
    REQUIRE(img != nullptr);
    INFO(img->intent_detail());
    CHECK(img->intent_state() == "recovered");
    REQUIRE((*r)->close());
  }
  CHECK(qemu_bitmaps(c) == "b0 65536\nc1 65536 auto\n");
  CHECK(dirty_of(c, "b0") == "0,");
  // c1: the write after the checkpoint, and (the bounded over-report of the
  // handed-over record) the chunk written before it in this session.
  CHECK(dirty_of(c, "c1") == "0,1048576,");
  CHECK(run("qemu-img check -q " + c) == 0);

  // The crash came after the switch but before the rename: the record is
  // found under the next record's name.
  const std::string n = t / "n.qcow2";
  REQUIRE(run("cp " + a + " " + n + " && cp " + a + ".qnbd-intent " + n + ".qnbd-intent.next") == 0);
  // Bad input there: garbage under the next name, and no record, is
  // refused in one line; the open goes on and c1 stays inconsistent.
  const std::string g = t / "g.qcow2";
  REQUIRE(run("cp " + a + " " + g + " && head -c 4096 /dev/urandom > " + g + ".qnbd-intent.next") == 0);
  for (const auto& [image, expected] : {std::pair{n, "recovered"}, std::pair{g, "stale"}}) {
    // Copies: clang 14 lets no lambda (doctest's INFO) capture a structured binding.
    const std::string path = image;
    const std::string want = expected;
    auto r = open_image(path, o);
    REQUIRE_MESSAGE(r, r.error().message);
    auto* img = dynamic_cast<Qcow2Image*>(r->get());
    REQUIRE(img != nullptr);
    INFO(path, ": ", img->intent_detail());
    CHECK(img->intent_state() == want);
    CHECK(img->intent_detail().find('\n') == std::string::npos);
    REQUIRE((*r)->close());
  }
  CHECK(dirty_of(n, "c1") == "0,1048576,");
  CHECK(qemu_bitmaps(g) == "b0 65536\nc1 65536 auto in-use\n");
  REQUIRE(dev.close());
}
