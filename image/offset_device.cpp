#include "image/offset_device.hpp"

#include <cerrno>
#include <utility>

namespace qnbd::image {

OffsetDevice::OffsetDevice(std::shared_ptr<BlockDevice> inner, std::uint64_t offset)
    : inner_(std::move(inner)), offset_(offset), size_(inner_->size() > offset ? inner_->size() - offset : 0) {}

Capabilities OffsetDevice::capabilities() const {
  Capabilities c = inner_->capabilities();
  // QEMU's raw node with an offset keeps a request alignment of 1 whatever
  // the node below needs (a probed raw image's 512, O_DIRECT's): the
  // block layer below does the read-modify-write, as the inner device does
  // here. qemu-nbd -o advertises that minimum block size.
  c.min_block = 1;
  return c;
}

Result<std::uint64_t> OffsetDevice::inner_offset(std::uint64_t offset, std::uint64_t length) const {
  if (offset > size_ || length > size_ - offset) {
    return make_error(EINVAL, "request {:#x}+{} is past the end of the device ({} bytes)", offset, length, size_);
  }
  return offset + offset_;
}

Result<void> OffsetDevice::read(std::span<std::byte> buf, std::uint64_t offset) {
  return inner_->read(buf, QNBD_TRY(inner_offset(offset, buf.size())));
}

Result<void> OffsetDevice::write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) {
  return inner_->write(buf, QNBD_TRY(inner_offset(offset, buf.size())), fua);
}

Result<void> OffsetDevice::write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) {
  return inner_->write_zeroes(QNBD_TRY(inner_offset(offset, length)), length, flags);
}

Result<void> OffsetDevice::discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) {
  return inner_->discard(QNBD_TRY(inner_offset(offset, length)), length, flags);
}

Result<std::size_t> OffsetDevice::block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) {
  std::uint64_t at = QNBD_TRY(inner_offset(offset, length));
  std::size_t n = 0;
  while (length > 0) {
    const LayerStatus st = QNBD_TRY(inner_->layer_status(at, length));
    if (st.length == 0 || st.length > length) {
      return make_error(EIO, "block status of {:#x} returned a bad length {}", at - offset_, st.length);
    }
    const Extent x{st.length, st.data, st.zero, st.present ? 1u : 0u};
    if (!append_extent(out, n, x)) break;
    at += x.length;
    length -= x.length;
  }
  return n;
}

Result<LayerStatus> OffsetDevice::layer_status(std::uint64_t offset, std::uint64_t max_length) {
  return inner_->layer_status(QNBD_TRY(inner_offset(offset, max_length)), max_length);
}

Result<HostRun> OffsetDevice::host_run(std::uint64_t offset, std::uint64_t max_length) {
  return inner_->host_run(QNBD_TRY(inner_offset(offset, max_length)), max_length);
}

ImageInfo OffsetDevice::info() const {
  ImageInfo i = inner_->info();
  i.virtual_size = size_;
  return i;
}

Result<std::size_t> OffsetDevice::export_bitmap(const std::string& name) {
  return make_error(ENOENT, "Bitmap '{}' is not found", name);
}

Result<std::shared_ptr<BlockDevice>> offset_device(std::shared_ptr<BlockDevice> inner, std::uint64_t offset,
                                                   const std::string& name) {
  if (offset > inner->size()) {
    return make_error(EINVAL, "{}: Offset ({}) cannot be greater than size of the containing file ({})", name, offset,
                      inner->size());
  }
  if (offset % 512) return make_error(EINVAL, "{}: offset {} is not a multiple of 512", name, offset);
  return std::shared_ptr<BlockDevice>(std::make_shared<OffsetDevice>(std::move(inner), offset));
}

}  // namespace qnbd::image
