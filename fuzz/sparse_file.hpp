// SparseFile: an in-memory File that stores only the 4 KiB pages that hold
// data, for the image fuzz targets. A fuzzed image describes a file of
// several MiB of which a few KiB are not zero; copying it into a flat
// buffer per input (and once more per backing layer and per reopen) was
// what held the image targets to a few executions per second. Here a copy
// shares the pages (copy on write), absent pages read as zeroes and are
// reported as holes (so the engine's hole paths run too), and the file
// refuses to grow past kMaxBytes (a hostile L2 entry may name any offset
// below 2^56), as a full host file system would: ENOSPC.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "image/io/file.hpp"

namespace qnbd::fuzz {

class SparseFile final : public image::File {
 public:
  static constexpr std::uint64_t kPage = 4096;
  static constexpr std::uint64_t kMaxBytes = 64u << 20;
  using Page = std::array<std::byte, kPage>;

  explicit SparseFile(std::string name = "<sparse>", std::uint64_t size = 0) : name_(std::move(name)), size_(size) {}
  // A copy shares every page until one side writes it.
  SparseFile(const SparseFile& o, std::string name) : name_(std::move(name)) {
    std::lock_guard lock(o.mutex_);
    pages_ = o.pages_;
    size_ = o.size_;
  }

  // Called with every write's bytes and offset before it is stored (the
  // write target records where guest data went).
  std::function<void(std::span<const std::byte>, std::uint64_t)> on_write;
  // Called with every discard's range before it is applied (the write
  // target checks that no discard reaches metadata).
  std::function<void(std::uint64_t, std::uint64_t)> on_discard;

  // Fill [offset, offset + length) with `value` without going through
  // on_write or the size limit checks of pwrite (building an input).
  void fill(std::uint64_t offset, std::uint64_t length, std::byte value) {
    std::lock_guard lock(mutex_);
    if (value == std::byte{0}) {
      zero_locked(offset, length);
    } else {
      // Whole pages of one value share one buffer.
      std::shared_ptr<Page> shared;
      for (std::uint64_t pos = offset; pos < offset + length;) {
        const std::uint64_t p = pos / kPage, in = pos % kPage, n = std::min(kPage - in, offset + length - pos);
        if (n == kPage) {
          if (!shared) {
            shared = std::make_shared<Page>();
            shared->fill(value);
          }
          pages_[p] = shared;
        } else {
          std::fill_n(page_for_write(p)->begin() + in, n, value);
        }
        pos += n;
      }
    }
    size_ = std::max(size_, offset + length);
  }
  void set_size(std::uint64_t size) {
    std::lock_guard lock(mutex_);
    size_ = size;
  }
  // How many calls changed (or may have changed) the contents or size.
  std::uint64_t mutations() const {
    std::lock_guard lock(mutex_);
    return mutations_;
  }
  // Whether both files hold the same bytes (shared pages compare at once;
  // an absent page equals a stored page of zeroes).
  bool same_contents(const SparseFile& o) const {
    std::scoped_lock lock(mutex_, o.mutex_);
    if (size_ != o.size_) return false;
    static const Page zero{};
    auto a = pages_.begin(), b = o.pages_.begin();
    while (a != pages_.end() || b != o.pages_.end()) {
      if (b == o.pages_.end() || (a != pages_.end() && a->first < b->first)) {
        if (*a->second != zero) return false;
        ++a;
      } else if (a == pages_.end() || b->first < a->first) {
        if (*b->second != zero) return false;
        ++b;
      } else {
        if (a->second != b->second && *a->second != *b->second) return false;
        ++a;
        ++b;
      }
    }
    return true;
  }
  std::size_t page_count() const {
    std::lock_guard lock(mutex_);
    return pages_.size();
  }

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override {
    std::lock_guard lock(mutex_);
    if (offset >= size_) return std::size_t{0};
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), size_ - offset));
    std::size_t done = 0;
    auto it = pages_.lower_bound(offset / kPage);
    while (done < n) {
      const std::uint64_t pos = offset + done, p = pos / kPage, in = pos % kPage;
      const std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(kPage - in, n - done));
      while (it != pages_.end() && it->first < p) ++it;
      if (it != pages_.end() && it->first == p)
        std::memcpy(buf.data() + done, it->second->data() + in, k);
      else
        std::memset(buf.data() + done, 0, k);
      done += k;
    }
    return n;
  }
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override {
    QNBD_TRY(check_range(offset, buf.size()));
    if (on_write) on_write(buf, offset);
    std::lock_guard lock(mutex_);
    ++mutations_;
    for (std::size_t done = 0; done < buf.size();) {
      const std::uint64_t pos = offset + done, in = pos % kPage;
      const std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(kPage - in, buf.size() - done));
      std::memcpy(page_for_write(pos / kPage)->data() + in, buf.data() + done, k);
      done += k;
    }
    size_ = std::max(size_, offset + buf.size());
    return ok();
  }
  Result<void> flush() override { return ok(); }
  Result<void> truncate(std::uint64_t size) override {
    if (size > kMaxBytes) return make_error(ENOSPC, "{}: fuzz file limit", name_);
    std::lock_guard lock(mutex_);
    ++mutations_;
    if (size < size_) zero_locked(size, size_ - size);
    size_ = size;
    return ok();
  }
  Result<std::uint64_t> size() override {
    std::lock_guard lock(mutex_);
    return size_;
  }
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool) override {
    QNBD_TRY(check_range(offset, length));
    std::lock_guard lock(mutex_);
    ++mutations_;
    zero_locked(offset, length);
    size_ = std::max(size_, offset + length);
    return ok();
  }
  // Dropping pages is what fallocate(PUNCH_HOLE | ZERO_RANGE) does on a
  // host file system: always possible here.
  Result<void> write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) override {
    return write_zeroes(offset, length, may_unmap);
  }
  Result<void> discard(std::uint64_t offset, std::uint64_t length) override {
    if (on_discard) on_discard(offset, length);
    std::lock_guard lock(mutex_);
    ++mutations_;
    if (offset >= size_) return ok();
    zero_locked(offset, std::min(length, size_ - offset));
    return ok();
  }
  Result<bool> is_hole(std::uint64_t offset, std::uint64_t length) override {
    if (length == 0) return true;
    auto e = QNBD_TRY(probe_extent(offset, length));
    return e.hole && e.length >= length;
  }
  Result<Extent> probe_extent(std::uint64_t offset, std::uint64_t max_length) override {
    std::lock_guard lock(mutex_);
    if (max_length == 0) return Extent{0, offset >= size_};
    if (offset >= size_) return Extent{max_length, true};
    const std::uint64_t end = offset + std::min(max_length, UINT64_MAX - offset);
    std::uint64_t p = offset / kPage;
    auto it = pages_.lower_bound(p);
    if (it == pages_.end() || it->first != p) {
      // A hole up to the next stored page (past the end counts as a hole).
      const std::uint64_t next = it == pages_.end() ? UINT64_MAX : it->first * kPage;
      return Extent{std::min(end, next) - offset, true};
    }
    while (it != pages_.end() && it->first == p) {
      ++it;
      ++p;
    }
    return Extent{std::min({end, p * kPage, size_}) - offset, false};
  }
  Result<std::uint64_t> allocated_size() override {
    std::lock_guard lock(mutex_);
    return pages_.size() * kPage;
  }
  const std::string& name() const override { return name_; }

 private:
  Result<void> check_range(std::uint64_t offset, std::uint64_t length) const {
    if (offset > kMaxBytes || length > kMaxBytes - offset) return make_error(ENOSPC, "{}: fuzz file limit", name_);
    return ok();
  }
  Page* page_for_write(std::uint64_t p) {
    auto& slot = pages_[p];
    if (!slot)
      slot = std::make_shared<Page>(Page{});
    else if (slot.use_count() > 1)
      slot = std::make_shared<Page>(*slot);
    return slot.get();
  }
  void zero_locked(std::uint64_t offset, std::uint64_t length) {
    const std::uint64_t end = offset + length;
    auto it = pages_.lower_bound(offset / kPage);
    while (it != pages_.end() && it->first * kPage < end) {
      const std::uint64_t start = it->first * kPage;
      const std::uint64_t a = std::max(start, offset), z = std::min(start + kPage, end);
      if (a == start && z == start + kPage) {
        it = pages_.erase(it);
        continue;
      }
      std::fill_n(page_for_write(it->first)->begin() + (a - start), z - a, std::byte{0});
      ++it;
    }
  }

  std::string name_;
  mutable std::mutex mutex_;
  std::map<std::uint64_t, std::shared_ptr<Page>> pages_;
  std::uint64_t size_ = 0;
  std::uint64_t mutations_ = 0;
};

}  // namespace qnbd::fuzz
