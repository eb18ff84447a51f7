// check_qcow2 on in-memory images made by create_qcow2 (metadata
// preallocation gives L2 tables and data clusters without a writer), then
// damaged byte by byte.
#include <doctest/doctest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "common/endian.hpp"
#include "image/qcow2/check.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/refcount.hpp"
#include "test_refcount_support.hpp"

using namespace qnbd;
using namespace qnbd::image::qcow2;
using qnbd::test::VecFile;

namespace {

constexpr std::uint64_t kCs = 4096;

struct Img {
  VecFile f;
  std::uint64_t l2 = 0;  // first L2 table
  std::uint64_t block = 0;
};

Img make() {
  Img i;
  CreateOptions o;
  o.cluster_size = kCs;
  o.size = 1 << 20;  // 256 clusters, one L2 table
  o.preallocation = Preallocation::metadata;
  REQUIRE(create_qcow2(i.f, o));
  const std::uint64_t l1 = load_be64(i.f.data.data() + 40);
  i.l2 = load_be64(i.f.data.data() + l1) & L2E_OFFSET_MASK;
  i.block = load_be64(i.f.data.data() + load_be64(i.f.data.data() + 48));
  return i;
}

std::uint64_t l2e(Img& i, int n) { return load_be64(i.f.data.data() + i.l2 + 8 * n); }
void set_l2e(Img& i, int n, std::uint64_t v) { store_be64(i.f.data.data() + i.l2 + 8 * n, v); }
std::uint64_t rc(Img& i, std::uint64_t cluster) { return load_be16(i.f.data.data() + i.block + 2 * cluster); }
void set_rc(Img& i, std::uint64_t cluster, std::uint16_t v) { store_be16(i.f.data.data() + i.block + 2 * cluster, v); }

CheckResult run(Img& i, RepairMode mode, std::vector<std::string>* lines = nullptr) {
  CheckMessageSink sink = [lines](const std::string& l) {
    if (lines) lines->push_back(l);
  };
  auto r = check_qcow2(i.f, mode, sink);
  REQUIRE(r);
  return *r;
}

// A repair as qemu-img check -r is judged: check, check -r `mode`, check
// again. What -r reports as left must be what the following check finds.
struct RepairRound {
  CheckResult before, repaired, after;
};
RepairRound repair_round(Img& i, RepairMode mode) {
  // Braced initialisation runs the three checks in this order.
  return {run(i, RepairMode::none), run(i, mode), run(i, RepairMode::none)};
}

}  // namespace

TEST_CASE("check: a fresh preallocated image is clean, with qemu-img's statistics") {
  Img i = make();
  CheckResult r = run(i, RepairMode::none);
  CHECK(r.corruptions == 0);
  CHECK(r.leaks == 0);
  CHECK(r.check_errors == 0);
  CHECK(r.total_clusters == 256);
  CHECK(r.allocated_clusters == 256);
  CHECK(r.fragmented_clusters == 0);
  CHECK(r.image_end_offset == i.f.data.size());
}

TEST_CASE("check: leaks, low refcounts, double references and COPIED flags") {
  Img i = make();
  const std::uint64_t c0 = (l2e(i, 0) & L2E_OFFSET_MASK) / kCs;
  const std::uint64_t c1 = (l2e(i, 1) & L2E_OFFSET_MASK) / kCs;

  SUBCASE("leak, repaired by -r leaks") {
    set_rc(i, c1, 2);  // refcount above the one reference
    std::vector<std::string> lines;
    CheckResult r = run(i, RepairMode::none, &lines);
    CHECK(r.leaks == 1);
    CHECK(r.corruptions == 1);  // COPIED set but refcount 2
    CHECK(lines.at(0) == "Leaked cluster " + std::to_string(c1) + " refcount=2 reference=1");
    r = run(i, RepairMode::leaks);
    CHECK(r.leaks_fixed == 1);
    CHECK(rc(i, c1) == 1);
    r = run(i, RepairMode::none);
    CHECK(r.leaks + r.corruptions == 0);
  }
  SUBCASE("refcount 0 needs a rebuild: -r leaks refuses, -r all rebuilds") {
    set_rc(i, c0, 0);
    CheckResult r = run(i, RepairMode::none);
    CHECK(r.corruptions == 2);  // refcount and COPIED
    std::vector<std::string> lines;
    r = run(i, RepairMode::leaks, &lines);
    CHECK(r.check_errors == 1);
    CHECK(lines.back() == "ERROR need to rebuild refcount structures");
    const std::uint64_t old_table = load_be64(i.f.data.data() + 48);
    r = run(i, RepairMode::all);
    CHECK(r.check_errors == 0);
    CHECK(r.corruptions == 0);
    CHECK(load_be64(i.f.data.data() + 48) != old_table);  // new refcount structure
    r = run(i, RepairMode::none);
    CHECK(r.corruptions + r.leaks + r.check_errors == 0);
  }
  SUBCASE("cluster referenced twice") {
    set_l2e(i, 1, l2e(i, 0));
    CheckResult r = run(i, RepairMode::none);
    // Refcount 1 < 2 references; COPIED agrees with the stored refcount 1.
    CHECK(r.corruptions == 1);
    CHECK(r.leaks == 1);  // the old target of entry 1
    r = run(i, RepairMode::all);
    r = run(i, RepairMode::none);
    CHECK(r.corruptions + r.leaks == 0);
    CHECK(rc(i, c0) == 2);
    CHECK((l2e(i, 0) & QCOW_OFLAG_COPIED) == 0);  // shared now
  }
  SUBCASE("COPIED cleared on a cluster with refcount 1") {
    set_l2e(i, 5, l2e(i, 5) & ~QCOW_OFLAG_COPIED);
    std::vector<std::string> lines;
    CheckResult r = run(i, RepairMode::none, &lines);
    CHECK(r.corruptions == 1);
    CHECK(lines.at(0).rfind("ERROR OFLAG_COPIED data cluster: l2_entry=", 0) == 0);
    r = run(i, RepairMode::all);
    CHECK(r.corruptions_fixed == 1);
    CHECK((l2e(i, 5) & QCOW_OFLAG_COPIED) != 0);
  }
  SUBCASE("misaligned data cluster is a corruption") {
    set_l2e(i, 7, l2e(i, 7) + 512);
    CheckResult r = run(i, RepairMode::none);
    CHECK(r.corruptions >= 1);
  }
  SUBCASE("reference far past the end of the file") {
    set_l2e(i, 9, QCOW_OFLAG_COPIED | (i.f.data.size() + 100 * kCs));
    std::vector<std::string> lines;
    CheckResult r = run(i, RepairMode::none, &lines);
    CHECK(r.corruptions >= 1);
    bool found = false;
    for (auto& l : lines) found |= l.find("exceeding the end of the file") != std::string::npos;
    CHECK(found);
  }
}

TEST_CASE("check: refcount table moved by growth is still consistent") {
  // 512-byte clusters and 1-bit refcounts: the allocator moves the table.
  VecFile f;
  CreateOptions o;
  o.cluster_size = 512;
  o.refcount_bits = 1;
  o.size = 128 << 20;
  o.preallocation = Preallocation::metadata;
  REQUIRE(create_qcow2(f, o));
  CHECK(load_be32(f.data.data() + 56) > 1);  // table grew beyond one cluster
  auto r = check_qcow2(f, RepairMode::none, nullptr);
  REQUIRE(r);
  CHECK(r->corruptions == 0);
  CHECK(r->leaks == 0);
  CHECK(r->allocated_clusters == (128 << 20) / 512);
}

TEST_CASE("check -r: references past the end of the file stay reported (fuzz_check seed v3-c2097152)") {
  // A truncated image: the last data clusters lie a cluster or more past the
  // end of the file. No refcount repair can fix that reference, so -r
  // leaks and -r all must report what a following check finds again, as
  // qemu-img check -r does (it used to report "no errors" after -r all).
  for (RepairMode mode : {RepairMode::leaks, RepairMode::all}) {
    Img i = make();
    i.f.data.resize(i.f.data.size() - 3 * kCs);
    auto [before, repaired, after] = repair_round(i, mode);
    REQUIRE(before.corruptions >= 2);
    CHECK(after.corruptions >= 2);
    CHECK(repaired.corruptions == after.corruptions);
  }
}

TEST_CASE(
    "check -r all: a fixed COPIED flag on a compressed cluster is not reported as left (found by the check fuzz target)") {
  Img i = make();
  const std::uint64_t host = l2e(i, 4) & L2E_OFFSET_MASK;
  set_l2e(i, 4, QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | host);
  auto [before, repaired, after] = repair_round(i, RepairMode::all);
  REQUIRE(before.corruptions >= 1);
  CHECK(repaired.corruptions == after.corruptions);
}

TEST_CASE("check -r: an L2 entry with reserved bits stays reported (fuzz_check crash-repair-count-reserved-bits)") {
  for (RepairMode mode : {RepairMode::leaks, RepairMode::all}) {
    Img i = make();
    set_l2e(i, 3, l2e(i, 3) | (1ull << 57));  // reserved bits 56-61
    auto [before, repaired, after] = repair_round(i, mode);
    REQUIRE(before.corruptions >= 1);
    CHECK(after.corruptions >= 1);
    CHECK(repaired.corruptions == after.corruptions);
  }
}

TEST_CASE("check: random metadata damage never crashes, and repair never makes things worse") {
  // Untrusted input: flip bytes in the metadata clusters (header excluded,
  // parse_header has its own tests) and run check, -r leaks and -r all.
  std::uint64_t seed = 12345;
  auto next = [&seed] {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    return seed >> 33;
  };
  for (int iter = 0; iter < 300; iter++) {
    CAPTURE(iter);
    Img i = make();
    const std::uint64_t metadata_end = i.l2 + kCs;  // table, block, L1, first L2
    const int flips = 1 + static_cast<int>(next() % 6);
    for (int k = 0; k < flips; k++) {
      const std::uint64_t at = kCs + next() % (metadata_end - kCs);
      i.f.data[at] = static_cast<std::byte>(next());
    }
    VecFile copy = i.f;
    auto before = check_qcow2(i.f, RepairMode::none, nullptr);
    if (!before) continue;  // refused outright: fine
    auto leaks = check_qcow2(copy, RepairMode::leaks, nullptr);
    auto all = check_qcow2(i.f, RepairMode::all, nullptr);
    if (!all || all->check_errors) continue;
    auto after = check_qcow2(i.f, RepairMode::none, nullptr);
    REQUIRE(after);
    CHECK(after->corruptions + after->leaks <= before->corruptions + before->leaks);
    (void)leaks;
  }
}

TEST_CASE(
    "check -r all: a rebuild puts no refcount structure on a cluster an L2 entry names past the end of the file (fuzz_check repair-rebuild-over-data-past-eof)") {
  // The last data clusters lie past the end of the file (refused, counted
  // as corruptions) and a zero refcount forces a rebuild. The rebuild used
  // to place its new refcount block right at the end of the file, i.e. on
  // the first of those data clusters: the next check found that cluster
  // referenced twice and more corruptions than the repair reported left.
  Img i = make();
  i.f.data.resize(i.f.data.size() - 3 * kCs);
  set_rc(i, (l2e(i, 5) & L2E_OFFSET_MASK) / kCs, 0);
  CheckResult before = run(i, RepairMode::none);
  REQUIRE(before.corruptions >= 4);
  std::vector<std::string> lines;
  CheckResult repaired = run(i, RepairMode::all, &lines);
  REQUIRE(std::find(lines.begin(), lines.end(), "Rebuilding refcount structure") != lines.end());
  CheckResult after = run(i, RepairMode::none);
  CHECK(repaired.check_errors == 0);
  CHECK(repaired.corruptions == after.corruptions);

  std::set<std::uint64_t> data;
  for (int n = 0; n < int(kCs / 8); n++) data.insert(l2e(i, n) & L2E_OFFSET_MASK);
  const std::uint64_t table = load_be64(i.f.data.data() + 48);
  const std::uint32_t table_clusters = load_be32(i.f.data.data() + 56);
  for (std::uint64_t c = 0; c < table_clusters; c++) CHECK(data.count(table + c * kCs) == 0);
  for (std::uint64_t e = 0; e < table_clusters * kCs / 8; e++) {
    const std::uint64_t block = load_be64(i.f.data.data() + table + 8 * e);
    if (block) CHECK(data.count(block) == 0);
  }
}
