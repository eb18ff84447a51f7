// Point-in-time views (image/view/cbw.hpp) on qcow2 images made by
// qemu-img: the view reads exactly what the disk held at the checkpoint
// while several threads keep writing, zeroing and discarding; wholly zero
// granules cost no scratch; a view whose scratch cap is hit fails (EIO to
// its readers) while the writes go on; several views overlap; ended views
// refuse reads; the named-file fallback leaves nothing behind.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "image/block_device.hpp"
#include "image/checkpoint.hpp"
#include "image/view/cbw.hpp"
#include "image_test_support.hpp"

using namespace qnbd::image;
using qnbd::test::run;
using qnbd::test::TempDir;

namespace {

constexpr std::uint64_t kSize = 8 << 20;
constexpr std::uint64_t kG = 64 << 10;

struct Fixture {
  TempDir dir;
  std::string path;
  std::shared_ptr<CbwDevice> dev;

  explicit Fixture(ViewOptions o = {}, const char* extra = "") {
    path = dir / "d.qcow2";
    REQUIRE(run(std::string("qemu-img create -q -f qcow2 ") + extra + " " + path + " 8M") == 0);
    OpenOptions oo;
    oo.format = ImageFormat::qcow2;
    oo.read_only = false;
    auto d = open_image(path, oo);
    REQUIRE_MESSAGE(d, d.error().message);
    dev = std::make_shared<CbwDevice>(std::shared_ptr<BlockDevice>(std::move(*d)), path, o);
  }
  ~Fixture() {
    if (dev) (void)dev->close();
  }

  std::vector<std::byte> read_all(BlockDevice& d) {
    std::vector<std::byte> out(kSize);
    auto r = d.read(out, 0);
    REQUIRE_MESSAGE(r, r.error().message);
    return out;
  }

  // A checkpoint that attaches a view; the content at the switch (every
  // gate shut and drained) is read into `at` for the comparison.
  std::shared_ptr<PointInTimeView> view(const std::string& name, std::vector<std::byte>* at = nullptr) {
    auto v = dev->prepare_view(name);
    REQUIRE_MESSAGE(v, v.error().message);
    BlockDevice* devs[] = {dev.get()};
    auto r = checkpoint({devs[0]}, name, "", 0, [&] {
      if (at) {
        at->resize(kSize);
        REQUIRE(dev->inner().read(*at, 0));
      }
      dev->attach(*v);
    });
    REQUIRE_MESSAGE(r, r.error().message);
    return *v;
  }
};

std::vector<std::byte> pattern(std::size_t n, std::uint32_t seed) {
  std::vector<std::byte> b(n);
  std::mt19937 rnd(seed);
  for (auto& x : b) x = std::byte(rnd() & 0xff);
  return b;
}

void fill(BlockDevice& d, std::uint64_t off, std::uint64_t len, std::uint32_t seed) {
  auto b = pattern(len, seed);
  auto r = d.write(b, off, false);
  REQUIRE_MESSAGE(r, r.error().message);
}

bool equal(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

// Writers: random writes (unaligned too), write_zeroes and discards over
// the whole disk until `stop`.
void writer(BlockDevice& d, std::uint32_t seed, std::atomic<bool>& stop, std::atomic<int>& errors) {
  std::mt19937_64 rnd(seed);
  while (!stop.load()) {
    const std::uint64_t len = 1 + rnd() % (200 << 10);
    const std::uint64_t off = rnd() % (kSize - len);
    const int what = static_cast<int>(rnd() % 10);
    qnbd::Result<void> r = qnbd::ok();
    if (what < 7) {
      auto b = pattern(len, static_cast<std::uint32_t>(rnd()));
      r = d.write(b, off, false);
    } else if (what < 9) {
      r = d.write_zeroes(off, len, ZeroFlags{});
    } else {
      r = d.discard(off, len, {});
    }
    if (!r) ++errors;
  }
}

}  // namespace

TEST_CASE("a view reads the checkpoint's content exactly while four threads write, zero and discard") {
  if (!qnbd::test::have_qemu_img()) return;
  Fixture f;
  // Start with data, a zeroed cluster and holes.
  fill(*f.dev, 0, 3 << 20, 1);
  REQUIRE(f.dev->write_zeroes(1 << 20, kG, ZeroFlags{}));
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::vector<std::thread> ts;
  for (std::uint32_t i = 0; i < 4; ++i)
    ts.emplace_back(writer, std::ref(*f.dev), 100 + i, std::ref(stop), std::ref(errors));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  std::vector<std::byte> at1;
  auto v1 = f.view("c1", &at1);
  // Readers of the view race the writers (the optimistic read's check).
  std::atomic<int> mismatches{0};
  std::thread reader([&] {
    std::mt19937_64 rnd(7);
    while (!stop.load()) {
      const std::uint64_t len = 1 + rnd() % (300 << 10);
      const std::uint64_t off = rnd() % (kSize - len);
      std::vector<std::byte> b(len);
      if (!v1->read(b, off) || std::memcmp(b.data(), at1.data() + off, len) != 0) ++mismatches;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  std::vector<std::byte> at2;
  auto v2 = f.view("c2", &at2);  // a second view overlapping the first
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  stop = true;
  for (auto& t : ts) t.join();
  reader.join();
  CHECK(errors.load() == 0);
  CHECK(mismatches.load() == 0);
  CHECK(equal(f.read_all(*v1), at1));
  CHECK(equal(f.read_all(*v2), at2));
  CHECK_FALSE(equal(at1, at2));  // the writers did change the disk
  CHECK_FALSE(equal(f.read_all(*f.dev), at1));
  auto s1 = v1->state();
  CHECK(s1.state == "live");
  CHECK(s1.saved_granules > 0);
  CHECK(s1.scratch_bytes == s1.saved_granules * kG);
  // The views' block status agrees with their content: zero extents read as zeroes.
  for (auto* v : {v1.get(), v2.get()}) {
    const auto& at = v == v1.get() ? at1 : at2;
    std::uint64_t pos = 0;
    std::array<Extent, 16> ext;
    while (pos < kSize) {
      auto n = v->block_status(pos, kSize - pos, ext);
      REQUIRE(n);
      for (std::size_t i = 0; i < *n; ++i) {
        if (ext[i].zero) {
          CHECK(std::all_of(at.begin() + static_cast<std::ptrdiff_t>(pos),
                            at.begin() + static_cast<std::ptrdiff_t>(pos + ext[i].length),
                            [](std::byte b) { return b == std::byte{0}; }));
        }
        pos += ext[i].length;
      }
    }
  }
}

TEST_CASE("wholly zero granules are recorded without a copy; block status reports what they were") {
  if (!qnbd::test::have_qemu_img()) return;
  Fixture f;
  fill(*f.dev, 0, kG, 1);  // granule 0 data, granule 1.. holes
  std::vector<std::byte> at;
  auto v = f.view("c1", &at);
  fill(*f.dev, 0, 2 * kG, 2);  // first touch: granule 0 (data) and 1 (hole)
  auto s = v->state();
  CHECK(s.saved_granules == 1);
  CHECK(s.zero_granules == 1);
  CHECK(s.scratch_bytes == kG);
  CHECK(equal(f.read_all(*v), at));
  std::array<Extent, 8> ext;
  auto n = v->block_status(0, 4 * kG, ext);
  REQUIRE(n);
  REQUIRE(*n >= 2);
  CHECK(ext[0].length == kG);
  CHECK(ext[0].allocated);
  CHECK_FALSE(ext[0].zero);
  CHECK(ext[1].zero);
  CHECK_FALSE(ext[1].allocated);  // a hole at the checkpoint, data in the image now
  // The image itself now has data there.
  auto m = f.dev->block_status(kG, kG, ext);
  REQUIRE(m);
  CHECK_FALSE(ext[0].zero);
}

TEST_CASE("write_zeroes and discard save the old content on first touch") {
  if (!qnbd::test::have_qemu_img()) return;
  Fixture f;
  fill(*f.dev, 0, 4 * kG, 3);
  std::vector<std::byte> at;
  auto v = f.view("c1", &at);
  REQUIRE(f.dev->write_zeroes(100, kG, ZeroFlags{}));  // unaligned, granules 0-1
  REQUIRE(f.dev->discard(2 * kG, 2 * kG, {}));         // granules 2-3
  CHECK(v->state().saved_granules == 4);
  CHECK(equal(f.read_all(*v), at));
  // A second touch copies nothing more.
  fill(*f.dev, 0, 4 * kG, 4);
  CHECK(v->state().saved_granules == 4);
  CHECK(equal(f.read_all(*v), at));
}

TEST_CASE("a view whose scratch cap is hit fails with EIO while the writer goes on") {
  if (!qnbd::test::have_qemu_img()) return;
  ViewOptions o;
  o.scratch_max = 2 * kG;
  Fixture f(o);
  fill(*f.dev, 0, 4 * kG, 5);
  auto v = f.view("c1");
  auto other = f.view("c2");  // same cap, same fate, but ended before the overflow
  other->end();
  fill(*f.dev, 0, 2 * kG, 6);  // fits
  CHECK(v->state().state == "live");
  std::vector<std::byte> b(4096);
  CHECK(v->read(b, 0));
  fill(*f.dev, 2 * kG, kG, 7);  // would pass the cap
  auto s = v->state();
  CHECK(s.state == "failed");
  CHECK(s.error.find("scratch cap") != std::string::npos);
  auto r = v->read(b, 0);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == EIO);
  std::array<Extent, 4> ext;
  CHECK_FALSE(v->block_status(0, kG, ext));
  // The writer's data is there.
  auto want = pattern(kG, 7);
  std::vector<std::byte> got(kG);
  REQUIRE(f.dev->read(got, 2 * kG));
  CHECK(equal(got, want));
  // An ended view refuses reads too; detach ends it.
  auto r2 = other->read(b, 0);
  CHECK_FALSE(r2);
  CHECK(f.dev->detach("c1") == v);
  CHECK(v->state().state == "ended");
  CHECK(f.dev->detach("c1") == nullptr);
}

TEST_CASE("concurrent writers to one granule: the second waits for the first's copy") {
  if (!qnbd::test::have_qemu_img()) return;
  ViewOptions o;
  o.granule = 1 << 20;  // big granules: many writers land in the same one
  Fixture f(o);
  fill(*f.dev, 0, kSize, 8);
  for (int round = 0; round < 5; ++round) {
    std::vector<std::byte> at;
    const std::string name = round == 0 ? "r0" : round == 1 ? "r1" : round == 2 ? "r2" : round == 3 ? "r3" : "r4";
    auto v = f.view(name, &at);
    std::vector<std::thread> ts;
    for (int t = 0; t < 8; ++t) {
      ts.emplace_back([&, t] {
        auto b = pattern(4096, static_cast<std::uint32_t>(round * 100 + t));
        for (int k = 0; k < 64; ++k)
          (void)f.dev->write(b, static_cast<std::uint64_t>((t * 64 + k) % 2048) * 4096, false);
      });
    }
    for (auto& t : ts) t.join();
    CHECK(equal(f.read_all(*v), at));
    CHECK(f.dev->detach(name) == v);
  }
}

TEST_CASE("the named-file fallback leaves no file; stale ones of this image are removed, others kept") {
  if (!qnbd::test::have_qemu_img()) return;
  ViewOptions o;
  o.use_tmpfile = false;
  Fixture f(o);
  auto count = [&] {
    std::size_t n = 0;
    for (auto& e : std::filesystem::directory_iterator(f.dir.path)) n += e.path().extension() == ".scratch";
    return n;
  };
  fill(*f.dev, 0, kG, 9);
  std::vector<std::byte> at;
  auto v = f.view("c1", &at);
  fill(*f.dev, 0, kG, 10);
  CHECK(equal(f.read_all(*v), at));
  CHECK(count() == 0);
  // What a crash between create and unlink would leave.
  struct stat st;
  REQUIRE(::stat(f.path.c_str(), &st) == 0);
  const std::string stale = fmt::format("{}/d.qcow2.qnbd-view-{:x}-{:x}-AbC123.scratch", f.dir.path.string(),
                                        static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino));
  const std::string foreign = f.dir / "d.qcow2.qnbd-view-1-2-AbC123.scratch";  // another image's
  std::ofstream(stale) << "x";
  std::ofstream(foreign) << "x";
  CHECK(remove_stale_scratch(f.path, "") == 1);
  CHECK_FALSE(std::filesystem::exists(stale));
  CHECK(std::filesystem::exists(foreign));
}

TEST_CASE("an export takes at most kMaxViews views; one ended makes room for the next") {
  Fixture f;
  std::vector<std::shared_ptr<PointInTimeView>> views;
  // fmt, not "c" + std::to_string(i): g++ 12 at -O3 reports a false
  // -Wrestrict on that concatenation (GCC bug 105329).
  for (std::size_t i = 0; i < CbwDevice::kMaxViews; ++i) views.push_back(f.view(fmt::format("c{}", i)));
  auto refused = f.dev->prepare_view("over");
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == EBUSY);
  CHECK(f.dev->views().size() == CbwDevice::kMaxViews);
  REQUIRE(f.dev->detach("c3"));
  auto next = f.view("next");
  CHECK(f.dev->views().size() == CbwDevice::kMaxViews);
  CHECK(next->live());
}
