// CrashFile: an in-memory File that simulates power loss.
//
// It keeps two states: the durable image (the contents as of the last
// completed flush()) and the current contents that reads see, plus a log of
// every mutating call since that flush. crash(seed) builds one possible
// post-crash file: starting from the durable image, each logged write is
// independently applied, dropped, or torn (a random subset of its 512-byte
// sectors lands), chosen by the seed, the way a volatile disk cache may
// persist any subset of unflushed writes in any order. Truncates and
// zeroing calls are applied or dropped whole.
//
// arm_crash(n, seed) freezes the file after its nth mutating call from now:
// the post-crash bytes are captured at that moment and every later mutating
// call or flush fails with EIO, so a crash can land inside an engine
// operation (between its metadata writes), not only between requests.
//
// Thread-safe: one mutex guards everything.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "image/io/file.hpp"

namespace qnbd::image {

class CrashFile final : public File {
 public:
  static constexpr std::uint64_t kSectorSize = 512;

  explicit CrashFile(std::string name = "<crash>", std::vector<std::byte> contents = {});

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override;
  Result<void> flush() override;
  Result<void> truncate(std::uint64_t size) override;
  Result<std::uint64_t> size() override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) override;
  // A memory file zeroes cheaply (fallocate's ZERO_RANGE, as the engine
  // asks of a host file): the same logged zeroing.
  Result<void> write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) override {
    return write_zeroes(offset, length, may_unmap);
  }
  Result<void> discard(std::uint64_t offset, std::uint64_t length) override;
  const std::string& name() const override { return name_; }

  // One possible file after power loss now (does not change this file).
  std::vector<std::byte> crash(std::uint64_t seed) const;
  // Freeze after `mutating_calls` more mutating calls (0 = now), capturing
  // crash(seed) at that point.
  void arm_crash(std::uint64_t mutating_calls, std::uint64_t seed);
  // The bytes captured when an armed crash fired, if it did.
  std::optional<std::vector<std::byte>> crashed_image() const;
  // Count each flush as a mutating call too, checked before it takes
  // effect: an armed crash can then fire while a sync runs, with the writes
  // since the last one still unsynced (a header written whole and then
  // synced can land torn).
  void set_cut_inside_flush(bool on);

  std::vector<std::byte> current() const;
  std::vector<std::byte> durable() const;
  std::uint64_t flush_count() const;
  std::uint64_t mutating_calls() const;  // since construction
  std::size_t unflushed_calls() const;   // logged since the last flush

 private:
  enum class Kind { write, zero, truncate };
  struct Logged {
    Kind kind;
    std::uint64_t offset = 0;  // truncate: the new size
    std::uint64_t length = 0;
    std::vector<std::byte> data;  // write only
  };
  static constexpr std::uint64_t kMaxSize = 1ull << 32;

  // Count one mutating call; EIO when frozen. Fires an armed crash.
  Result<void> before_mutation_locked();
  Result<void> grow_locked(std::vector<std::byte>& v, std::uint64_t size) const;
  std::vector<std::byte> crash_locked(std::uint64_t seed) const;

  std::string name_;
  mutable std::mutex mutex_;
  std::vector<std::byte> current_;
  std::vector<std::byte> durable_;
  std::vector<Logged> log_;
  std::uint64_t flushes_ = 0;
  std::uint64_t mutations_ = 0;
  std::optional<std::uint64_t> crash_at_;  // value of mutations_ at which to freeze
  std::uint64_t crash_seed_ = 0;
  std::optional<std::vector<std::byte>> crashed_;
  bool cut_inside_flush_ = false;
};

}  // namespace qnbd::image
