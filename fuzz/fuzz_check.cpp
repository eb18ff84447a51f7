// Fuzz entry: `qnbd check` and `qnbd check -r all` over a fuzzed image in
// memory (input layout: fuzz_image.hpp; bit 0 of the first ops byte picks
// -r leaks instead of -r all).
//
// Properties checked (each can fail):
// - checking without repair never changes the file;
// - after a `check -r all` that reports nothing left, nothing is left:
//   running it again fixes nothing and does not write;
// - after a repair that reported no check errors, a second check finds no
//   more leaks and (after -r all) no more corruptions than the repair
//   itself reported as left (what `qnbd check -r all` prints when nothing
//   was fixed: it used to say "no errors" there while errors remained);
//   and a repair that leaves the refcount structure sound leaves no leak.
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "fuzz_image.hpp"
#include "image/qcow2/check.hpp"

using namespace qnbd;
using namespace qnbd::image;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::ImageInput in;
  fuzz::decode_image_input(data, size, in);
  // No sink: check then formats none of its messages (a crafted image can
  // produce hundreds of thousands of them per pass).
  const qcow2::CheckMessageSink quiet;
  fuzz::SparseFile ro(in.image, "<fuzz.qcow2>");
  auto first = qcow2::check_qcow2(ro, qcow2::RepairMode::none, quiet);
  QNBD_FUZZ_CHECK(ro.mutations() == 0);
  if (!first) return 0;

  const auto mode = in.ops.empty() || (in.ops[0] & 1) ? qcow2::RepairMode::all : qcow2::RepairMode::leaks;
  fuzz::SparseFile rw(in.image, "<fuzz.qcow2>");
  auto repaired = qcow2::check_qcow2(rw, mode, quiet);
  if (!repaired || repaired->check_errors) return 0;
  auto second = qcow2::check_qcow2(rw, qcow2::RepairMode::none, quiet);
  QNBD_FUZZ_CHECK(second.has_value());
  if (second->check_errors) return 0;
  if (second->leaks > repaired->leaks || (repaired->corruptions == 0 && second->leaks) ||
      (mode == qcow2::RepairMode::all && second->corruptions > repaired->corruptions))
    std::fprintf(stderr,
                 "check: %llu corruptions, %llu leaks; repair: %llu left, %llu fixed, %llu leaks left, %llu leaks "
                 "fixed; again: %llu corruptions, %llu leaks\n",
                 (unsigned long long)first->corruptions, (unsigned long long)first->leaks,
                 (unsigned long long)repaired->corruptions, (unsigned long long)repaired->corruptions_fixed,
                 (unsigned long long)repaired->leaks, (unsigned long long)repaired->leaks_fixed,
                 (unsigned long long)second->corruptions, (unsigned long long)second->leaks);
  // A rebuild that leaves corruptions it cannot fix may leave a leak, and
  // says so (corpus/check/repair-still-broken-snapshot-table-over-header:
  // the snapshot table lies over the header, so rewriting the header to
  // point at the new refcount table changes what the snapshot entries
  // reference; qemu-img 7.2 `check -r all` fails with EIO on that image).
  QNBD_FUZZ_CHECK(second->leaks <= repaired->leaks);
  // Where nothing is left broken, nothing may be left leaked.
  QNBD_FUZZ_CHECK(repaired->corruptions != 0 || second->leaks == 0);
  // -r all leaves only what no repair can fix (reference defects), and
  // says so: the second check finds no more than it reported as left.
  // (Not exactly equal yet: on corpus/check/crash-repair-count-compressed-copied
  // it reports one more than is left.)
  if (mode != qcow2::RepairMode::all) return 0;
  QNBD_FUZZ_CHECK(second->corruptions <= repaired->corruptions);
  // And when the repair says nothing is left, nothing is: `check -r all`
  // once more fixes nothing and leaves the file as it was. (When it reports
  // corruptions left, e.g. L2 entries past the end of the file, a further
  // pass may fix a few more, as a further qemu-img 7.2 `check -r all` does
  // on corpus/check/repair-rebuild-over-data-past-eof.)
  if (repaired->corruptions) return 0;
  const std::uint64_t before = rw.mutations();
  auto again = qcow2::check_qcow2(rw, qcow2::RepairMode::all, quiet);
  QNBD_FUZZ_CHECK(again.has_value());
  if (again->check_errors) return 0;
  if (again->corruptions_fixed || again->leaks_fixed)
    std::fprintf(stderr, "check -r all again: %llu corruptions fixed, %llu leaks fixed\n",
                 (unsigned long long)again->corruptions_fixed, (unsigned long long)again->leaks_fixed);
  QNBD_FUZZ_CHECK(again->corruptions_fixed == 0 && again->leaks_fixed == 0);
  QNBD_FUZZ_CHECK(rw.mutations() == before);
  return 0;
}
