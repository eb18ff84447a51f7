// Fuzz entry: `qnbd check` and `qnbd check -r all` over a fuzzed image in
// memory (input layout: fuzz_input.hpp; the ops bytes are ignored).
//
// Properties checked (each can fail):
// - checking without repair never changes the file;
// - after a repair that reported no check errors, a second check finds no
//   leak, and after -r all no corruption beyond those the repair itself
//   reported as left (what `qnbd check -r all` prints when nothing was
//   fixed: it used to say "no errors" there while errors remained).
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "fuzz_input.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/check.hpp"

using namespace qnbd;
using namespace qnbd::image;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto in = fuzz::decode_image_input(data, size);
  const qcow2::CheckMessageSink quiet = [](const std::string&) {};
  MemFile ro("<fuzz.qcow2>", in.image);
  auto first = qcow2::check_qcow2(ro, qcow2::RepairMode::none, quiet);
  QNBD_FUZZ_CHECK(ro.contents() == in.image);
  if (!first) return 0;

  const auto mode = in.ops.empty() || (in.ops[0] & 1) ? qcow2::RepairMode::all : qcow2::RepairMode::leaks;
  MemFile rw("<fuzz.qcow2>", in.image);
  auto repaired = qcow2::check_qcow2(rw, mode, quiet);
  if (!repaired || repaired->check_errors) return 0;
  auto second = qcow2::check_qcow2(rw, qcow2::RepairMode::none, quiet);
  QNBD_FUZZ_CHECK(second.has_value());
  if (second->check_errors) return 0;
  if (second->leaks || (mode == qcow2::RepairMode::all && second->corruptions > repaired->corruptions))
    std::fprintf(stderr, "check: %llu corruptions, %llu leaks; repair: %llu left, %llu fixed, %llu leaks fixed; "
                 "again: %llu corruptions, %llu leaks\n",
                 (unsigned long long)first->corruptions, (unsigned long long)first->leaks,
                 (unsigned long long)repaired->corruptions, (unsigned long long)repaired->corruptions_fixed,
                 (unsigned long long)repaired->leaks_fixed, (unsigned long long)second->corruptions,
                 (unsigned long long)second->leaks);
  QNBD_FUZZ_CHECK(second->leaks == 0);
  // -r all leaves only what no repair can fix (reference defects), and
  // says so: the second check finds no more than it reported as left.
  // (Not exactly equal yet: on corpus/check/crash-repair-count-compressed-copied
  // it reports one more than is left.)
  if (mode == qcow2::RepairMode::all) QNBD_FUZZ_CHECK(second->corruptions <= repaired->corruptions);
  return 0;
}
