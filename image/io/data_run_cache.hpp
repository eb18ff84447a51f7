// DataRunCache: the data runs of a host file that SEEK_HOLE has already
// reported, so asking again about a byte inside one costs no system call.
//
// Why: lseek(SEEK_HOLE) is not bounded by the range a caller cares about.
// On tmpfs it walks the page cache up to the next hole under the inode lock
// (for a fully written file: to EOF, about 1 ms per GiB), on ext4/xfs it
// walks the extent tree; a structured READ of 4 KiB that probed every time
// cost more the bigger the file (300 IOPS on a 1 GiB tmpfs file). QEMU
// keeps one such run per protocol node (its block-status cache); this keeps
// up to kCapacity of them, so a file with many data runs stays cheap too.
//
// Only data runs are cached: a write can turn a hole into data at any time
// (so a cached hole would make a READ return zeroes for written bytes), but
// only a hole punch or a truncation turns data into a hole, and the File
// that does those calls forget() afterwards. A stale data run is harmless
// anyway: the bytes are read with pread (zeroes), and reporting a hole as
// data is allowed by NBD proto.md section "base:allocation metadata context".
//
// Thread-safety: lookups take no lock and write nothing shared (a sequence
// lock: they retry, or answer "unknown", when an update races them), so
// concurrent readers on many cores do not bounce a cache line; add() and
// forget() serialise on a mutex.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace qnbd::image {

class DataRunCache {
 public:
  static constexpr std::size_t kCapacity = 1024;

  struct Lookup {
    std::uint64_t run_end = 0;   // end of the cached run containing offset; 0: none does
    std::uint64_t prev_end = 0;  // else the end of the cached run before offset (0: none)
  };
  [[nodiscard]] Lookup lookup(std::uint64_t offset) const;
  [[nodiscard]] std::uint64_t run_end(std::uint64_t offset) const { return lookup(offset).run_end; }
  // Read before probing the file; pass to add(). A forget() in between
  // (a hole punched while the probe ran) makes that add() a no-op.
  [[nodiscard]] std::uint64_t epoch() const { return epoch_.load(std::memory_order_acquire); }
  // [begin, end) is data, as the file system said at epoch_seen.
  void add(std::uint64_t begin, std::uint64_t end, std::uint64_t epoch_seen);
  // [begin, end) may no longer be data (hole punched, file truncated):
  // call after the change, never before.
  void forget(std::uint64_t begin, std::uint64_t end);
  std::size_t size() const;

 private:
  void publish();  // runs_ -> the lock-free arrays; mu_ held

  mutable std::mutex mu_;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> runs_;  // sorted, disjoint, not adjacent; mu_
  std::atomic<std::uint64_t> epoch_{0};
  // What run_end() reads: written only inside publish(), between an odd and
  // the next even value of seq_.
  std::atomic<std::uint64_t> seq_{0};
  std::atomic<std::size_t> count_{0};
  std::array<std::atomic<std::uint64_t>, kCapacity> begin_{};
  std::array<std::atomic<std::uint64_t>, kCapacity> end_{};
};

}  // namespace qnbd::image
