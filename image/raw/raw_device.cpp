#include "image/raw/raw_device.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>

#include "common/checked.hpp"
#include "image/probe.hpp"

namespace qnbd::image {

namespace {
// open_image() probes the first sector (image/probe.hpp).
constexpr std::uint64_t kProbeBytes = kProbeSectorSize;
}  // namespace

RawDevice::RawDevice(std::unique_ptr<File> file, std::uint64_t size, const OpenOptions& options, bool probed)
    : file_(std::move(file)), size_(size), writable_(!options.read_only),
      writes_through_(writes_through(options.cache)), discard_unmap_(options.discard_unmap), probed_(probed) {}

Result<std::unique_ptr<RawDevice>> RawDevice::open(std::unique_ptr<File> file, const OpenOptions& options,
                                                   bool probed) {
  // QEMU counts sizes in 512-byte sectors and rounds a raw file's size up
  // (qemu-img info, qemu-nbd's export size); the tail past EOF reads as
  // zeroes, and a write there extends the file.
  std::uint64_t size = align_up(QNBD_TRY(file->size()), 512);
  return std::make_unique<RawDevice>(std::move(file), size, options, probed);
}

Capabilities RawDevice::capabilities() const {
  Capabilities c;
  c.writable = writable_;
  c.can_trim = writable_ && discard_unmap_;
  c.can_write_zeroes = writable_;
  c.can_fast_zero = writable_;
  // QEMU's raw driver checks whole first sectors of a probed image, so its
  // request_alignment is 512 and qemu-nbd advertises that minimum block.
  if (probed_) c.min_block = 512;
  return c;
}

Result<void> RawDevice::check_range(std::uint64_t offset, std::uint64_t length) const {
  if (!range_within(offset, length, size_)) {
    return make_error(EINVAL, "{}: range {:#x}+{} is outside the image ({} bytes)", file_->name(), offset, length,
                      size_);
  }
  return ok();
}

Result<void> RawDevice::read(std::span<std::byte> buf, std::uint64_t offset) {
  QNBD_TRY(check_range(offset, buf.size()));
  // The file may have shrunk underneath us; read what is there as zeroes.
  return file_->read_zero_fill(buf, offset);
}

Result<void> RawDevice::check_probe_bytes(std::span<const std::byte> buf, std::uint64_t offset, std::uint64_t length) {
  // The sector the probe will see after this change: the file's, overlaid
  // with what lands on it (buf, or zeroes where buf is empty: a zeroing or
  // a punched hole). QEMU checks whole-sector writes (raw_co_pwritev; its
  // block layer turns a partial one into a read-modify-write); qnbd takes
  // partial ones as they come, so the overlay stands in for that.
  std::array<std::byte, kProbeBytes> head{};
  QNBD_TRY(file_->read_zero_fill(head, 0));
  const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(length, kProbeBytes - offset));
  if (buf.empty()) {
    std::memset(head.data() + offset, 0, n);
  } else {
    std::memcpy(head.data() + offset, buf.data(), n);
  }
  const std::string_view probed_as = probe_format(head);
  if (probed_as != "raw") {
    return make_error(EPERM,
                      "{}: write to the first sector refused: it would make this probed raw image open as {} "
                      "(give the format explicitly to allow it)",
                      file_->name(), probed_as);
  }
  return ok();
}

// Holds the probe lock over a change that reaches the probed sector, so
// two changes each supplying part of a signature cannot both pass.
std::unique_lock<std::mutex> RawDevice::lock_probe_sector(std::uint64_t offset, std::uint64_t length) {
  if (!probed_ || offset >= kProbeBytes || length == 0) return {};
  return std::unique_lock(probe_mutex_);
}

Result<void> RawDevice::write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) {
  if (!writable_) return make_error(EROFS, "{}: image is read-only", file_->name());
  QNBD_TRY(check_range(offset, buf.size()));
  const auto probe_lock = lock_probe_sector(offset, buf.size());
  if (probe_lock) QNBD_TRY(check_probe_bytes(buf, offset, buf.size()));
  QNBD_TRY(file_->pwrite(buf, offset));
  if (fua || writes_through_) QNBD_TRY(file_->flush());
  return ok();
}

Result<void> RawDevice::write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) {
  if (!writable_) return make_error(EROFS, "{}: image is read-only", file_->name());
  QNBD_TRY(check_range(offset, length));
  // A zero that may unmap punches a hole whatever --discard says, as
  // qemu-nbd's: QEMU opens the protocol node under a format node with
  // discard=unmap by default (bdrv_inherited_options), so the request's
  // MAY_UNMAP reaches file-posix; --discard only governs TRIM.
  const bool unmap = flags.may_unmap;
  const auto probe_lock = lock_probe_sector(offset, length);
  if (probe_lock) QNBD_TRY(check_probe_bytes({}, offset, length));
  if (flags.fast_only) {
    QNBD_TRY(file_->write_zeroes_fast(offset, length, unmap));
  } else {
    QNBD_TRY(file_->write_zeroes(offset, length, unmap));
  }
  if (flags.fua || writes_through_) QNBD_TRY(file_->flush());
  return ok();
}

Result<void> RawDevice::discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) {
  if (!writable_) return make_error(EROFS, "{}: image is read-only", file_->name());
  QNBD_TRY(check_range(offset, length));
  if (!discard_unmap_) return ok();  // discard=ignore, as qemu-nbd's default
  // A punched hole may zero a partial block (the file system's choice).
  const auto probe_lock = lock_probe_sector(offset, length);
  if (probe_lock) QNBD_TRY(check_probe_bytes({}, offset, length));
  QNBD_TRY(file_->discard(offset, length));
  if (flags.fua || writes_through_) QNBD_TRY(file_->flush());
  return ok();
}

Result<void> RawDevice::flush() { return file_->flush(); }

Result<LayerStatus> RawDevice::layer_status(std::uint64_t offset, std::uint64_t max_length) {
  QNBD_TRY(check_range(offset, max_length));
  File::Extent e = QNBD_TRY(file_->probe_extent(offset, max_length));
  LayerStatus st;
  st.length = std::max<std::uint64_t>(1, std::min(e.length, max_length));
  st.data = !e.hole;
  st.zero = e.hole;
  st.present = true;
  st.offset_valid = true;
  st.host_offset = offset;
  st.file = file_.get();
  return st;
}

Result<HostRun> RawDevice::host_run(std::uint64_t offset, std::uint64_t max_length) {
  QNBD_TRY(check_range(offset, max_length));
  return HostRun{max_length, file_->splice_fd(), offset};
}

Result<std::size_t> RawDevice::block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) {
  QNBD_TRY(check_range(offset, length));
  return chain_block_status(*this, offset, length, out);
}

ImageInfo RawDevice::info() const {
  ImageInfo i;
  i.format = "raw";
  i.filename = file_->name();
  i.virtual_size = size_;
  auto allocated = file_->allocated_size();
  if (allocated) i.actual_size = *allocated;
  return i;
}

}  // namespace qnbd::image
