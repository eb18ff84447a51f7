// FaultFile and CrashFile: the test seams the write-engine harness relies on.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "image/io/crash_file.hpp"
#include "image/io/fault_file.hpp"
#include "image/io/forwarding_file.hpp"
#include "image/io/mem_file.hpp"

using namespace qnbd;
using namespace qnbd::image;

namespace {

std::vector<std::byte> pattern(std::size_t n, std::uint8_t v) { return std::vector<std::byte>(n, std::byte{v}); }

// A leaf File that answers every call with something File's defaults never
// give, and counts the calls it saw, so a wrapper that drops a call (falls
// back to File's default) is caught.
class Probe final : public File {
 public:
  Result<std::size_t> pread(std::span<std::byte> b, std::uint64_t) override { return seen("pread", b.size()); }
  Result<void> pwrite(std::span<const std::byte>, std::uint64_t) override { return mark("pwrite"); }
  Result<void> flush() override { return mark("flush"); }
  Result<void> truncate(std::uint64_t) override { return mark("truncate"); }
  Result<std::uint64_t> size() override { return seen("size", 4242); }
  Result<void> write_zeroes(std::uint64_t, std::uint64_t, bool) override { return mark("write_zeroes"); }
  Result<void> write_zeroes_fast(std::uint64_t, std::uint64_t, bool) override { return mark("write_zeroes_fast"); }
  Result<void> discard(std::uint64_t, std::uint64_t) override { return mark("discard"); }
  Result<bool> is_hole(std::uint64_t, std::uint64_t) override { return seen("is_hole", true); }
  Result<Extent> probe_extent(std::uint64_t, std::uint64_t) override { return seen("probe_extent", Extent{7, true}); }
  Result<std::uint64_t> allocated_size() override { return seen("allocated_size", 99); }
  Result<void> set_lock(const LockRequest&) override { return mark("set_lock"); }
  const std::string& name() const override { return name_; }

  std::multiset<std::string> calls;

 private:
  template <typename T>
  T seen(const char* what, T value) {
    calls.insert(what);
    return value;
  }
  Result<void> mark(const char* what) {
    calls.insert(what);
    return ok();
  }
  std::string name_ = "probe";
};

// Every File call made on `f`, checked against what Probe returns.
void call_everything(File& f) {
  std::vector<std::byte> buf(16);
  CHECK(*f.pread(buf, 0) == 16);
  CHECK(f.pwrite(buf, 0));
  CHECK(f.flush());
  CHECK(f.truncate(1));
  CHECK(*f.size() == 4242);
  CHECK(f.write_zeroes(0, 1, false));
  CHECK(f.write_zeroes_fast(0, 1, false));
  CHECK(f.discard(0, 1));
  CHECK(*f.is_hole(0, 1));
  CHECK(f.probe_extent(0, 100)->length == 7);
  CHECK(*f.allocated_size() == 99);
  CHECK(f.set_lock(LockRequest{}));
  CHECK(f.name() == "probe");
}

const std::multiset<std::string> kEveryCall{
    "pread",   "pwrite",  "flush",        "truncate",       "size",    "write_zeroes", "write_zeroes_fast",
    "discard", "is_hole", "probe_extent", "allocated_size", "set_lock"};

}  // namespace

TEST_CASE("ForwardingFile and FaultFile pass every File call to the inner file") {
  // Hand-written forwarding lost set_lock (and, in the tests' wrappers,
  // probe_extent, is_hole, allocated_size, write_zeroes_fast): they fell
  // back to File's defaults instead of reaching the real file.
  Probe borrowed;
  ForwardingFile fw(borrowed);
  call_everything(fw);
  CHECK(borrowed.calls == kEveryCall);

  auto owned = std::make_unique<Probe>();
  Probe& inner = *owned;
  FaultFile::Plan plan;
  plan.ops = 0;  // gate nothing
  FaultFile fault(std::move(owned), plan);
  call_everything(fault);
  CHECK(inner.calls == kEveryCall);
  CHECK(fault.calls() == 0);
}

TEST_CASE("FaultFile fails exactly the Nth matching call with the chosen errno") {
  FaultFile::Plan plan;
  plan.ops = FaultFile::op_write;
  plan.fail_nth = 3;
  plan.error = ENOSPC;
  FaultFile f(std::make_unique<MemFile>(), plan);
  auto buf = pattern(512, 0xab);
  CHECK(f.pwrite(buf, 0));
  CHECK(f.flush());  // not a matching op: never counted, never fails
  CHECK(f.pwrite(buf, 512));
  auto r = f.pwrite(buf, 1024);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == ENOSPC);
  CHECK(f.pwrite(buf, 1536));  // not sticky
  CHECK(f.calls() == 4);
  CHECK(f.faults() == 1);
  // The failed write never reached the inner file.
  std::vector<std::byte> got(512);
  CHECK(*f.pread(got, 1024) == 512);
  CHECK(got == pattern(512, 0));
  CHECK(*f.pread(got, 1536) == 512);
  CHECK(got == buf);
}

TEST_CASE("FaultFile sticky failure keeps failing; reads can be targeted") {
  FaultFile::Plan plan;
  plan.ops = FaultFile::op_read | FaultFile::op_flush;
  plan.fail_nth = 2;
  plan.sticky = true;
  FaultFile f(std::make_unique<MemFile>("m", pattern(4096, 1)), plan);
  std::vector<std::byte> got(512);
  CHECK(f.pread(got, 0));
  CHECK_FALSE(f.flush());
  CHECK_FALSE(f.pread(got, 0));
  CHECK_FALSE(f.flush());
  CHECK(f.pwrite(got, 0));  // writes are not in the mask
  CHECK(f.faults() == 3);
}

TEST_CASE("FaultFile 1-in-N is seeded: same seed, same failures; rate near 1/N") {
  auto run = [](std::uint64_t seed) {
    FaultFile::Plan plan;
    plan.ops = FaultFile::op_write;
    plan.one_in = 8;
    plan.seed = seed;
    FaultFile f(std::make_unique<MemFile>(), plan);
    std::vector<bool> failed;
    auto buf = pattern(16, 7);
    for (int i = 0; i < 4000; ++i) failed.push_back(!f.pwrite(buf, 0));
    return failed;
  };
  auto a = run(42), b = run(42), c = run(43);
  CHECK(a == b);
  CHECK(a != c);
  auto n = std::count(a.begin(), a.end(), true);
  CHECK(n > 350);
  CHECK(n < 650);
}

TEST_CASE("CrashFile: flushed data always survives; unflushed writes are applied, dropped or torn per sector") {
  CrashFile f("c");
  auto old_data = pattern(8192, 0x11);
  REQUIRE(f.pwrite(old_data, 0));
  REQUIRE(f.flush());
  auto new_data = pattern(4096, 0x22);
  REQUIRE(f.pwrite(new_data, 1024));  // 8 sectors
  auto tail = pattern(1000, 0x33);
  REQUIRE(f.pwrite(tail, 8192));  // extends the file
  CHECK(f.unflushed_calls() == 2);
  // Reads see everything written.
  std::vector<std::byte> got(4096);
  REQUIRE(*f.pread(got, 1024) == 4096);
  CHECK(got == new_data);

  int applied = 0, dropped = 0, torn = 0;
  std::set<std::size_t> sizes;
  for (std::uint64_t seed = 0; seed < 300; ++seed) {
    auto img = f.crash(seed);
    sizes.insert(img.size());
    REQUIRE(img.size() >= 8192);
    // Outside the unflushed write, the flushed bytes are intact.
    auto is_old = [](std::byte b) { return b == std::byte{0x11}; };
    REQUIRE(std::all_of(img.begin(), img.begin() + 1024, is_old));
    REQUIRE(std::all_of(img.begin() + 5120, img.begin() + 8192, is_old));
    int new_sectors = 0;
    for (std::size_t s = 1024; s < 5120; s += 512) {
      // Every sector is wholly old or wholly new.
      bool all_new =
          std::all_of(img.begin() + s, img.begin() + s + 512, [](std::byte b) { return b == std::byte{0x22}; });
      bool all_old =
          std::all_of(img.begin() + s, img.begin() + s + 512, [](std::byte b) { return b == std::byte{0x11}; });
      REQUIRE((all_new || all_old));
      new_sectors += all_new;
    }
    if (new_sectors == 8)
      ++applied;
    else if (new_sectors == 0)
      ++dropped;
    else
      ++torn;
  }
  CHECK(applied > 0);
  CHECK(dropped > 0);
  CHECK(torn > 0);
  // The extending write lands whole, not at all, or in part.
  CHECK(sizes.count(8192) == 1);
  CHECK(sizes.count(9192) == 1);
  CHECK(sizes.count(8192 + 512) == 1);
  // Deterministic per seed.
  CHECK(f.crash(7) == f.crash(7));

  // After a flush there is nothing left to lose.
  REQUIRE(f.flush());
  CHECK(f.durable() == f.current());
  for (std::uint64_t seed = 0; seed < 20; ++seed) CHECK(f.crash(seed) == f.current());
  // Zeroing and shrinking are made durable by a flush too.
  REQUIRE(f.write_zeroes(0, 100, false));
  REQUIRE(f.truncate(6000));
  REQUIRE(f.flush());
  CHECK(f.durable() == f.current());
  CHECK(f.durable().size() == 6000);
}

TEST_CASE("CrashFile: zeroing and truncation since the flush may or may not survive") {
  CrashFile f("c", pattern(4096, 0x44));
  REQUIRE(f.write_zeroes(0, 512, true));
  REQUIRE(f.truncate(2048));
  bool saw_zero = false, saw_kept = false, saw_short = false, saw_long = false;
  for (std::uint64_t seed = 0; seed < 100; ++seed) {
    auto img = f.crash(seed);
    (img[0] == std::byte{0} ? saw_zero : saw_kept) = true;
    (img.size() == 2048 ? saw_short : saw_long) = true;
    REQUIRE((img.size() == 2048 || img.size() == 4096));
  }
  CHECK(saw_zero);
  CHECK(saw_kept);
  CHECK(saw_short);
  CHECK(saw_long);
}

TEST_CASE("CrashFile: an armed crash freezes the file mid-stream") {
  CrashFile f("c");
  auto a = pattern(512, 0xa1), b = pattern(512, 0xb2);
  REQUIRE(f.pwrite(a, 0));
  REQUIRE(f.flush());
  f.arm_crash(2, 5);
  REQUIRE(f.pwrite(b, 512));
  REQUIRE(f.pwrite(b, 1024));
  CHECK_FALSE(f.crashed_image());
  auto r = f.pwrite(b, 1536);  // the third call hits the crash
  REQUIRE_FALSE(r);
  CHECK(r.error().code == EIO);
  CHECK_FALSE(f.flush());
  CHECK_FALSE(f.write_zeroes(0, 512, false));
  auto img = f.crashed_image();
  REQUIRE(img);
  // The captured image holds the flushed sector and never the refused write.
  REQUIRE(img->size() >= 512);
  CHECK(std::equal(a.begin(), a.end(), img->begin()));
  CHECK(img->size() <= 1536);
  // The durable state did not move.
  CHECK(f.durable().size() == 512);
}
