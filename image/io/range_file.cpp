// RangeFile; see range_file.hpp.
#include "image/io/range_file.hpp"

#include <algorithm>
#include <cerrno>

#include "common/checked.hpp"

namespace qnbd::image {

Result<std::uint64_t> RangeFile::inner_offset_for_write(std::uint64_t offset, std::uint64_t length) const {
  if (size_ && (offset > *size_ || length > *size_ - offset))
    return make_error(ENOSPC, "{}: write past the end of the range ({} bytes at offset {})", name(), *size_, offset_);
  const auto inner = checked_add(offset_, offset);
  if (!inner || !checked_add(*inner, length)) return make_error(EINVAL, "{}: offset out of range", name());
  return *inner;
}

Result<std::size_t> RangeFile::pread(std::span<std::byte> buf, std::uint64_t offset) {
  if (size_) {
    if (offset >= *size_) return std::size_t{0};
    buf = buf.first(static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), *size_ - offset)));
  }
  const auto inner = checked_add(offset_, offset);
  if (!inner) return std::size_t{0};  // past any file's end
  return ForwardingFile::pread(buf, *inner);
}

Result<void> RangeFile::pwrite(std::span<const std::byte> buf, std::uint64_t offset) {
  const std::uint64_t inner = QNBD_TRY(inner_offset_for_write(offset, buf.size()));
  return ForwardingFile::pwrite(buf, inner);
}

Result<void> RangeFile::truncate(std::uint64_t size) {
  // QEMU's raw node refuses this too: the range is what the user gave.
  if (size_) return make_error(ENOTSUP, "{}: cannot resize a fixed-size range", name());
  const auto inner = checked_add(offset_, size);
  if (!inner) return make_error(EFBIG, "{}: size out of range", name());
  return ForwardingFile::truncate(*inner);
}

Result<std::uint64_t> RangeFile::size() {
  if (size_) return *size_;
  const std::uint64_t inner = QNBD_TRY(ForwardingFile::size());
  return inner > offset_ ? inner - offset_ : 0;
}

Result<void> RangeFile::write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) {
  const std::uint64_t inner = QNBD_TRY(inner_offset_for_write(offset, length));
  return ForwardingFile::write_zeroes(inner, length, may_unmap);
}

Result<void> RangeFile::write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) {
  const std::uint64_t inner = QNBD_TRY(inner_offset_for_write(offset, length));
  return ForwardingFile::write_zeroes_fast(inner, length, may_unmap);
}

Result<void> RangeFile::discard(std::uint64_t offset, std::uint64_t length) {
  const std::uint64_t inner = QNBD_TRY(inner_offset_for_write(offset, length));
  return ForwardingFile::discard(inner, length);
}

Result<bool> RangeFile::is_hole(std::uint64_t offset, std::uint64_t length) {
  if (length == 0) return false;
  const Extent e = QNBD_TRY(probe_extent(offset, length));
  return e.hole && e.length >= length;
}

Result<File::Extent> RangeFile::probe_extent(std::uint64_t offset, std::uint64_t max_length) {
  if (max_length == 0) return Extent{0, false};
  if (size_) {
    // Past the end of the range reads as zeroes: a hole, as past EOF.
    if (offset >= *size_) return Extent{max_length, true};
    max_length = std::min(max_length, *size_ - offset);
  }
  const auto inner = checked_add(offset_, offset);
  if (!inner) return Extent{max_length, true};
  return ForwardingFile::probe_extent(*inner, max_length);
}

}  // namespace qnbd::image
