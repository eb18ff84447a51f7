// The I/O seam: every byte the engine reads or writes goes through File.
//
// The qcow2 and raw drivers never see a descriptor, so tests substitute
// MemFile (in memory), and fault- or crash-injecting wrappers. Implementations
// must be safe for concurrent pread/pwrite from several threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/result.hpp"
#include "image/io/lock.hpp"

namespace qnbd::image {

class File {
 public:
  virtual ~File() = default;

  // Read up to buf.size() bytes at offset. Returns the number read, which is
  // short only at end of file.
  [[nodiscard]] virtual Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) = 0;
  // Write all of buf at offset, extending the file if needed.
  [[nodiscard]] virtual Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) = 0;
  // Make every completed write durable (fdatasync).
  [[nodiscard]] virtual Result<void> flush() = 0;
  [[nodiscard]] virtual Result<void> truncate(std::uint64_t size) = 0;
  [[nodiscard]] virtual Result<std::uint64_t> size() = 0;
  // Make [offset, offset+length) read as zeroes. may_unmap allows releasing
  // the space (punching a hole). The default writes zero buffers.
  [[nodiscard]] virtual Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap);
  // Zero [offset, offset+length) only if the host can do it without
  // writing data (fallocate); ENOTSUP otherwise (NBD FAST_ZERO). Default:
  // ENOTSUP.
  [[nodiscard]] virtual Result<void> write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap);
  // Release [offset, offset+length); contents afterwards are unspecified
  // (implementations here make them read as zeroes). Default: no-op.
  [[nodiscard]] virtual Result<void> discard(std::uint64_t offset, std::uint64_t length);
  // True if [offset, offset+length) is known to be a hole in the host file
  // (reads as zeroes, not allocated). Default: false (unknown).
  [[nodiscard]] virtual Result<bool> is_hole(std::uint64_t offset, std::uint64_t length);
  // The run starting at offset that is all data or all hole in the host
  // file, at most max_length bytes long (and at least 1 byte when
  // max_length > 0). Bytes past the end of the file count as a hole. The
  // default knows nothing and reports everything before EOF as data.
  struct Extent {
    std::uint64_t length = 0;
    bool hole = false;
  };
  [[nodiscard]] virtual Result<Extent> probe_extent(std::uint64_t offset, std::uint64_t max_length);
  // Bytes of storage the host file occupies (st_blocks * 512), for `info`.
  // Default: size().
  [[nodiscard]] virtual Result<std::uint64_t> allocated_size();
  // Hold the QEMU-compatible image lock `request` (image/io/lock.hpp) on
  // this file, or move an already held one to the new permissions.
  // Conflicts with other openers are errors naming the file. Not to be
  // called concurrently with itself (I/O may run meanwhile). The default
  // (files that are not host files) has nothing to lock.
  [[nodiscard]] virtual Result<void> set_lock(const LockRequest& /*request*/) { return ok(); }
  // A descriptor whose page cache holds exactly this file's bytes, for
  // splice(2) (BlockDevice::host_run); -1 where reads must go through
  // pread(): memory files, O_DIRECT files, and wrappers (which change what
  // a read returns or see every call).
  virtual int splice_fd() const { return -1; }
  // Name for messages (the path for real files).
  virtual const std::string& name() const = 0;

  // Read exactly buf.size() bytes; a short read is an error naming `what`.
  [[nodiscard]] Result<void> read_exact(std::span<std::byte> buf, std::uint64_t offset, const char* what);
  // Read buf.size() bytes; bytes past end of file read as zeroes.
  [[nodiscard]] Result<void> read_zero_fill(std::span<std::byte> buf, std::uint64_t offset);
};

enum class OpenMode { read_only, read_write };

// QEMU's cache modes (cache.direct and cache.writeback). The file keeps only
// the first half: O_DIRECT or not, flushes honoured or not. "Every change
// durable before it completes" belongs to the device (writes_through):
// as QEMU's block layer with the write cache off, it makes every write,
// zeroing and discard FUA (a flush of data and metadata once it is done)
// rather than opening the file O_DSYNC, which would leave a qcow2 image's
// cached metadata and every fallocate() out of it.
enum class CacheMode {
  writeback,     // page cache, flush on request (default, as qemu-nbd)
  none,          // O_DIRECT, flush on request
  writethrough,  // page cache; every change durable before it completes
  directsync,    // O_DIRECT; every change durable before it completes
  unsafe,        // flush requests are ignored
};
inline bool writes_through(CacheMode c) { return c == CacheMode::writethrough || c == CacheMode::directsync; }
inline bool opens_direct(CacheMode c) { return c == CacheMode::none || c == CacheMode::directsync; }

// Open a host file. O_DIRECT where the mode says (opens_direct); falls back
// to buffered I/O with a warning if the filesystem refuses O_DIRECT.
[[nodiscard]] Result<std::unique_ptr<File>> open_posix_file(const std::string& path, OpenMode mode,
                                                            CacheMode cache = CacheMode::writeback);
// Create (or truncate) a host file for writing.
[[nodiscard]] Result<std::unique_ptr<File>> create_posix_file(const std::string& path);
// A file the server names itself beside an image (the write-intent
// record): never opened through a symbolic link, since a name planted in
// the image's folder must not make the server truncate or write another
// file, and only a regular file. `create`: created or truncated (mode
// 0644). ENOENT when it does not exist and `create` is false.
[[nodiscard]] Result<std::unique_ptr<File>> open_side_file(const std::string& path, OpenMode mode, bool create);

}  // namespace qnbd::image
