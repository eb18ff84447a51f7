#include "image/io/mem_file.hpp"

#include <algorithm>
#include <cstring>

#include "common/checked.hpp"

namespace qnbd::image {

MemFile::MemFile(std::string name, std::vector<std::byte> contents)
    : name_(std::move(name)), data_(std::move(contents)) {}

Result<std::size_t> MemFile::pread(std::span<std::byte> buf, std::uint64_t offset) {
  std::lock_guard lock(mutex_);
  if (offset >= data_.size()) return std::size_t{0};
  std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), data_.size() - offset));
  // An empty span may carry a null pointer, which memcpy must not get.
  if (n) std::memcpy(buf.data(), data_.data() + offset, n);
  return n;
}

Result<void> MemFile::grow_locked(std::uint64_t size) {
  if (size > kMaxSize) return make_error(EFBIG, "{}: size {} is too large for a memory file", name_, size);
  if (size > data_.size()) data_.resize(static_cast<std::size_t>(size));
  return ok();
}

Result<void> MemFile::pwrite(std::span<const std::byte> buf, std::uint64_t offset) {
  std::lock_guard lock(mutex_);
  auto end = checked_add(offset, buf.size());
  if (!end) return make_error(EINVAL, "{}: write offset overflows", name_);
  QNBD_TRY(grow_locked(*end));
  if (!buf.empty()) std::memcpy(data_.data() + offset, buf.data(), buf.size());
  return ok();
}

Result<void> MemFile::flush() {
  std::lock_guard lock(mutex_);
  ++flushes_;
  return ok();
}

Result<void> MemFile::truncate(std::uint64_t size) {
  std::lock_guard lock(mutex_);
  if (size > kMaxSize) return make_error(EFBIG, "{}: size {} is too large for a memory file", name_, size);
  data_.resize(static_cast<std::size_t>(size));
  return ok();
}

Result<std::uint64_t> MemFile::size() {
  std::lock_guard lock(mutex_);
  return static_cast<std::uint64_t>(data_.size());
}

Result<void> MemFile::write_zeroes(std::uint64_t offset, std::uint64_t length, bool) {
  std::lock_guard lock(mutex_);
  auto end = checked_add(offset, length);
  if (!end) return make_error(EINVAL, "{}: zero range overflows", name_);
  QNBD_TRY(grow_locked(*end));
  std::fill_n(data_.begin() + static_cast<std::ptrdiff_t>(offset), length, std::byte{0});
  return ok();
}

Result<void> MemFile::discard(std::uint64_t offset, std::uint64_t length) {
  std::lock_guard lock(mutex_);
  // Discarded ranges read as zeroes, like a punched hole; never grows the file.
  if (offset >= data_.size()) return ok();
  std::uint64_t n = std::min<std::uint64_t>(length, data_.size() - offset);
  std::fill_n(data_.begin() + static_cast<std::ptrdiff_t>(offset), n, std::byte{0});
  return ok();
}

std::vector<std::byte> MemFile::contents() const {
  std::lock_guard lock(mutex_);
  return data_;
}

std::uint64_t MemFile::flush_count() const {
  std::lock_guard lock(mutex_);
  return flushes_;
}

}  // namespace qnbd::image
