// FaultFile: a File wrapper that makes chosen calls fail with a chosen errno,
// for testing how the engine handles I/O errors (fault injection as a layer,
// not an #ifdef).
//
// Two triggers, combinable: the Nth matching call fails (1-based; optionally
// every later one too, as a device that went away), and a seeded 1-in-N
// chance per matching call. Calls that do not fail pass straight through
// (ForwardingFile forwards everything this class does not gate).
// Thread-safe: the counters are guarded by a mutex; the inner file must be
// thread-safe itself (every File is).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <random>

#include "image/io/forwarding_file.hpp"

namespace qnbd::image {

class FaultFile final : public ForwardingFile {
 public:
  // Which calls a fault may hit (a bit mask of these).
  enum Op : unsigned {
    op_read = 1u << 0,      // pread
    op_write = 1u << 1,     // pwrite
    op_flush = 1u << 2,     // flush
    op_truncate = 1u << 3,  // truncate
    op_zero = 1u << 4,      // write_zeroes, write_zeroes_fast
    op_discard = 1u << 5,   // discard
    op_mutating = op_write | op_truncate | op_zero | op_discard,
    op_all = 0x3f,
  };

  struct Plan {
    unsigned ops = op_all;
    int error = EIO;             // errno the failing call returns
    std::uint64_t fail_nth = 0;  // 0 = off; else the Nth matching call fails
    bool sticky = false;         // with fail_nth: every later matching call fails too
    std::uint32_t one_in = 0;    // 0 = off; else each matching call fails with chance 1/one_in
    std::uint64_t seed = 0;      // for one_in
  };

  FaultFile(std::unique_ptr<File> inner, Plan plan);

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override;
  Result<void> flush() override;
  Result<void> truncate(std::uint64_t size) override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) override;
  Result<void> write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) override;
  Result<void> discard(std::uint64_t offset, std::uint64_t length) override;

  // Matching calls seen so far, and how many of them were made to fail.
  std::uint64_t calls() const;
  std::uint64_t faults() const;

 private:
  // Count a call of kind `op`; an Error if it is to fail.
  Result<void> gate(Op op, const char* what);

  Plan plan_;
  mutable std::mutex mutex_;
  std::mt19937_64 rng_;
  std::uint64_t calls_ = 0;
  std::uint64_t faults_ = 0;
};

}  // namespace qnbd::image
