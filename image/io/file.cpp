#include "image/io/file.hpp"

#include <algorithm>
#include <array>

namespace qnbd::image {

Result<void> File::write_zeroes(std::uint64_t offset, std::uint64_t length, bool /*may_unmap*/) {
  static const std::array<std::byte, 64 * 1024> zeroes{};
  while (length > 0) {
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(length, zeroes.size()));
    QNBD_TRY(pwrite(std::span<const std::byte>(zeroes.data(), n), offset));
    offset += n;
    length -= n;
  }
  return ok();
}

Result<void> File::write_zeroes_fast(std::uint64_t, std::uint64_t, bool) {
  return make_error(ENOTSUP, "{}: fast zeroing is not supported", name());
}

Result<void> File::discard(std::uint64_t, std::uint64_t) { return ok(); }

Result<bool> File::is_hole(std::uint64_t, std::uint64_t) { return false; }

Result<File::Extent> File::probe_extent(std::uint64_t offset, std::uint64_t max_length) {
  std::uint64_t file_size = QNBD_TRY(size());
  if (offset >= file_size) return Extent{max_length, true};
  return Extent{std::min(max_length, file_size - offset), false};
}

Result<std::uint64_t> File::allocated_size() { return size(); }

Result<void> File::read_exact(std::span<std::byte> buf, std::uint64_t offset, const char* what) {
  std::size_t n = QNBD_TRY(pread(buf, offset));
  if (n != buf.size()) {
    return make_error(EIO, "{}: {} at offset {:#x} ({} bytes) runs past the end of the file", name(), what, offset,
                      buf.size());
  }
  return ok();
}

Result<void> File::read_zero_fill(std::span<std::byte> buf, std::uint64_t offset) {
  std::size_t n = QNBD_TRY(pread(buf, offset));
  std::fill(buf.begin() + static_cast<std::ptrdiff_t>(n), buf.end(), std::byte{0});
  return ok();
}

}  // namespace qnbd::image
