// RangeFile: a range of another file seen as a whole file, as QEMU's raw
// format node with `offset` and `size` (BlockdevOptionsRaw) presents it to
// the node above: a raw disk that is a slice of a larger file, or a qcow2
// image stored at an offset inside one (json:/--image-opts, see
// config/image_spec.hpp).
//
// Offsets are shifted by `offset`. Without a size the range runs to the end
// of the inner file and grows with it (a qcow2 image inside may allocate);
// with one it is fixed: reads stop at its end as at the end of a file, and
// a write or zeroing past it fails with ENOSPC, as QEMU's raw node refuses
// it, so nothing above can reach bytes outside the range. Host hole probes
// are shifted and clipped the same way.
//
// splice_fd() stays -1 (File's default): the page cache of the inner file
// does not hold this file's bytes at the same offsets.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "image/io/forwarding_file.hpp"

namespace qnbd::image {

class RangeFile final : public ForwardingFile {
 public:
  RangeFile(std::unique_ptr<File> inner, std::uint64_t offset, std::optional<std::uint64_t> size)
      : ForwardingFile(std::move(inner)), offset_(offset), size_(size) {}

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override;
  Result<void> truncate(std::uint64_t size) override;
  Result<std::uint64_t> size() override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) override;
  Result<void> write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) override;
  Result<void> discard(std::uint64_t offset, std::uint64_t length) override;
  Result<bool> is_hole(std::uint64_t offset, std::uint64_t length) override;
  Result<Extent> probe_extent(std::uint64_t offset, std::uint64_t max_length) override;

 private:
  // The inner file's offset for a change of [offset, offset + length):
  // ENOSPC where that passes the end of a fixed-size range.
  Result<std::uint64_t> inner_offset_for_write(std::uint64_t offset, std::uint64_t length) const;

  const std::uint64_t offset_;
  const std::optional<std::uint64_t> size_;
};

}  // namespace qnbd::image
