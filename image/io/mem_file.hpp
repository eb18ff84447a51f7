// MemFile: a File held in memory, for unit tests and fuzzing.
//
// Thread-safe: one mutex guards the contents. Holes are not tracked, so
// is_hole() reports false like the File default, except for ranges past the
// end of the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "image/io/file.hpp"

namespace qnbd::image {

class MemFile final : public File {
 public:
  explicit MemFile(std::string name = "<memory>", std::vector<std::byte> contents = {});

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override;
  Result<void> flush() override;
  Result<void> truncate(std::uint64_t size) override;
  Result<std::uint64_t> size() override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) override;
  Result<void> discard(std::uint64_t offset, std::uint64_t length) override;
  const std::string& name() const override { return name_; }

  // A copy of the whole contents (for assertions).
  std::vector<std::byte> contents() const;
  // How many flush() calls were made (for ordering tests).
  std::uint64_t flush_count() const;

 private:
  // Refuse to grow past this (a hostile or buggy caller must not exhaust memory).
  static constexpr std::uint64_t kMaxSize = 1ull << 32;

  Result<void> grow_locked(std::uint64_t size);

  std::string name_;
  mutable std::mutex mutex_;
  std::vector<std::byte> data_;
  std::uint64_t flushes_ = 0;
};

}  // namespace qnbd::image
