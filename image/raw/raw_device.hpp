// RawDevice: a BlockDevice whose guest bytes are the file's bytes.
//
// Thread-safe: it only forwards to File, which is. Block status asks the
// host file for holes (SEEK_HOLE/SEEK_DATA): holes read as zero, data is
// data; both are "present" (depth 1), as QEMU's raw driver over file-posix.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "image/block_device.hpp"

namespace qnbd::image {

class RawDevice final : public BlockDevice {
 public:
  // size: the virtual size (open() uses the file size rounded up to 512).
  // probed: the format was detected, not given (see above).
  RawDevice(std::unique_ptr<File> file, std::uint64_t size, const OpenOptions& options, bool probed = false);

  static Result<std::unique_ptr<RawDevice>> open(std::unique_ptr<File> file, const OpenOptions& options,
                                                 bool probed = false);

  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  const char* format() const override { return "raw"; }

  Result<void> read(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  Result<void> discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) override;
  Result<void> flush() override;
  Result<std::size_t> block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) override;
  Result<LayerStatus> layer_status(std::uint64_t offset, std::uint64_t max_length) override;
  // Guest offset = host offset, always: every run is the file's.
  Result<HostRun> host_run(std::uint64_t offset, std::uint64_t max_length) override;
  ImageInfo info() const override;

  File& file() { return *file_; }

 private:
  Result<void> check_range(std::uint64_t offset, std::uint64_t length) const;
  // EPERM if writing buf (length bytes), or zeroes where buf is empty, at
  // offset would make the image probe as another format (image/probe.hpp).
  Result<void> check_probe_bytes(std::span<const std::byte> buf, std::uint64_t offset, std::uint64_t length);
  // The probe lock when the change reaches the probed sector of a probed
  // image, else an empty lock.
  std::unique_lock<std::mutex> lock_probe_sector(std::uint64_t offset, std::uint64_t length);

  std::unique_ptr<File> file_;
  std::uint64_t size_;
  bool writable_;
  bool writes_through_;  // cache=writethrough/directsync: every change FUA (file.hpp)
  bool discard_unmap_;
  bool probed_;
  // Serializes changes that touch the probed sector, so two writes each
  // supplying part of a signature cannot both pass the check.
  std::mutex probe_mutex_;
};

}  // namespace qnbd::image
