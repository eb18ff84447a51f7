// ForwardingFile: a File that passes every call to an inner File.
//
// Wrappers (FaultFile, the tests' recording and borrowing files, the
// fuzzers' size-capped file) derive from it and override only the calls
// they change. Forwarding by hand let a wrapper silently drop a call it did
// not list (probe_extent, set_lock, write_zeroes_fast fell back to File's
// defaults instead of reaching the real file); here every virtual of File
// is forwarded, so a new one added to File must be added here too.
//
// The inner file is either owned (unique_ptr) or borrowed (a reference the
// caller keeps alive longer than the wrapper). Thread-safety is the inner
// file's: this class keeps no state of its own besides the pointer.
#pragma once

#include <memory>
#include <utility>

#include "image/io/file.hpp"

namespace qnbd::image {

class ForwardingFile : public File {
 public:
  explicit ForwardingFile(std::unique_ptr<File> inner) : owned_(std::move(inner)), inner_(owned_.get()) {}
  explicit ForwardingFile(File& inner) : inner_(&inner) {}

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override {
    return inner_->pread(buf, offset);
  }
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override {
    return inner_->pwrite(buf, offset);
  }
  Result<void> flush() override { return inner_->flush(); }
  Result<void> truncate(std::uint64_t size) override { return inner_->truncate(size); }
  Result<std::uint64_t> size() override { return inner_->size(); }
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) override {
    return inner_->write_zeroes(offset, length, may_unmap);
  }
  Result<void> write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) override {
    return inner_->write_zeroes_fast(offset, length, may_unmap);
  }
  Result<void> discard(std::uint64_t offset, std::uint64_t length) override { return inner_->discard(offset, length); }
  Result<bool> is_hole(std::uint64_t offset, std::uint64_t length) override { return inner_->is_hole(offset, length); }
  Result<Extent> probe_extent(std::uint64_t offset, std::uint64_t max_length) override {
    return inner_->probe_extent(offset, max_length);
  }
  Result<std::uint64_t> allocated_size() override { return inner_->allocated_size(); }
  Result<void> set_lock(const LockRequest& request) override { return inner_->set_lock(request); }
  const std::string& name() const override { return inner_->name(); }

  File& inner() { return *inner_; }
  const File& inner() const { return *inner_; }

 private:
  std::unique_ptr<File> owned_;  // null when borrowed
  File* inner_;
};

}  // namespace qnbd::image
