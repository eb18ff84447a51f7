// A device that starts `offset` bytes into another: qemu-nbd -o/--offset,
// which puts QEMU's raw node with an offset on top of the image's format
// node (raw over qcow2, or raw over raw).
//
// Everything is forwarded with the offset added: reads, writes (the
// inner device still marks its enabled bitmaps and guards a probed raw
// image's first sector, at the inner device's own offsets), the host runs
// of zero-copy reads.
//
// Block status is the inner device's top layer alone, as QEMU's raw node
// passes the query to the node below (BDRV_BLOCK_RAW) and no further: a
// range that a qcow2 image leaves to its backing file is a hole that may
// not read as zeroes (NBD_STATE_HOLE without NBD_STATE_ZERO) at
// allocation depth 0, although reads return the backing file's data.
// That is what qemu-nbd -o answers, and it is true: a client copies those
// bytes rather than skipping them.
//
// As in QEMU, the persistent bitmaps belong to the node below and are not
// found through this one (qemu-nbd -o -B: "Bitmap 'NAME' is not found"),
// so this device has no bitmaps, no write gate, and no checkpoints or
// point-in-time views.
//
// The offset is a multiple of 512 and at most the inner size (see
// offset_device()): every size here is a multiple of 512, so no request
// can reach past the inner device's end. (qemu-nbd takes any offset and
// rounds the export up to a sector, then cannot answer reads of that last
// partial sector: version 7.2 aborts on an assertion, or hangs in block
// status.)
#pragma once

#include <cstdint>
#include <memory>

#include "image/block_device.hpp"

namespace qnbd::image {

class OffsetDevice final : public BlockDevice {
 public:
  OffsetDevice(std::shared_ptr<BlockDevice> inner, std::uint64_t offset);

  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  const char* format() const override { return inner_->format(); }

  Result<void> read(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  Result<void> discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) override;
  Result<void> flush() override { return inner_->flush(); }
  Result<std::size_t> block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) override;
  Result<LayerStatus> layer_status(std::uint64_t offset, std::uint64_t max_length) override;
  Result<HostRun> host_run(std::uint64_t offset, std::uint64_t max_length) override;
  ImageInfo info() const override;

  Result<std::size_t> export_bitmap(const std::string& name) override;
  Result<void> start_tracking() override { return inner_->start_tracking(); }
  Result<void> close() override { return inner_->close(); }

 private:
  // A request of this device, checked against its size, as an offset of
  // the inner device (EINVAL past the end: the server checks first, so
  // this only guards a caller that does not).
  Result<std::uint64_t> inner_offset(std::uint64_t offset, std::uint64_t length) const;

  std::shared_ptr<BlockDevice> inner_;
  const std::uint64_t offset_;
  const std::uint64_t size_;
};

// qemu-nbd -o OFFSET over `inner`: refused, with one line, when OFFSET is
// past the end (QEMU's words) or not a multiple of 512.
[[nodiscard]] Result<std::shared_ptr<BlockDevice>> offset_device(std::shared_ptr<BlockDevice> inner,
                                                                 std::uint64_t offset, const std::string& name);

}  // namespace qnbd::image
