#include "image/io/fault_file.hpp"

#include <cstring>
#include <utility>

namespace qnbd::image {

FaultFile::FaultFile(std::unique_ptr<File> inner, Plan plan)
    : ForwardingFile(std::move(inner)), plan_(plan), rng_(plan.seed) {}

Result<void> FaultFile::gate(Op op, const char* what) {
  std::lock_guard lock(mutex_);
  if ((plan_.ops & op) == 0) return ok();
  ++calls_;
  bool fail = false;
  if (plan_.fail_nth != 0) fail = plan_.sticky ? calls_ >= plan_.fail_nth : calls_ == plan_.fail_nth;
  // Draw on every matching call so the sequence depends only on the seed
  // and the call order, not on whether fail_nth already fired.
  if (plan_.one_in != 0 && rng_() % plan_.one_in == 0) fail = true;
  if (!fail) return ok();
  ++faults_;
  return make_error(plan_.error, "{}: injected {} failure (call {}): {}", name(), what, calls_,
                    std::strerror(plan_.error));
}

Result<std::size_t> FaultFile::pread(std::span<std::byte> buf, std::uint64_t offset) {
  QNBD_TRY(gate(op_read, "read"));
  return ForwardingFile::pread(buf, offset);
}

Result<void> FaultFile::pwrite(std::span<const std::byte> buf, std::uint64_t offset) {
  QNBD_TRY(gate(op_write, "write"));
  return ForwardingFile::pwrite(buf, offset);
}

Result<void> FaultFile::flush() {
  QNBD_TRY(gate(op_flush, "flush"));
  return ForwardingFile::flush();
}

Result<void> FaultFile::truncate(std::uint64_t size) {
  QNBD_TRY(gate(op_truncate, "truncate"));
  return ForwardingFile::truncate(size);
}

Result<void> FaultFile::write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) {
  QNBD_TRY(gate(op_zero, "write_zeroes"));
  return ForwardingFile::write_zeroes(offset, length, may_unmap);
}

Result<void> FaultFile::write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) {
  QNBD_TRY(gate(op_zero, "write_zeroes"));
  return ForwardingFile::write_zeroes_fast(offset, length, may_unmap);
}

Result<void> FaultFile::discard(std::uint64_t offset, std::uint64_t length) {
  QNBD_TRY(gate(op_discard, "discard"));
  return ForwardingFile::discard(offset, length);
}

std::uint64_t FaultFile::calls() const {
  std::lock_guard lock(mutex_);
  return calls_;
}

std::uint64_t FaultFile::faults() const {
  std::lock_guard lock(mutex_);
  return faults_;
}

}  // namespace qnbd::image
