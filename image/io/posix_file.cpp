// PosixFile: File over a host file descriptor.
//
// Thread-safety: pread/pwrite/fallocate on one descriptor are safe from
// several threads; the only mutable state is the DataRunCache of what
// SEEK_HOLE reported, which is thread-safe itself.
//
// Cache modes (as qemu's cache= option): writeback and writethrough = page
// cache + fdatasync on flush (writethrough's per-request flushes are the
// device's: file.hpp); unsafe = flush is a no-op; none and directsync =
// O_DIRECT. O_DIRECT needs buffer, offset and length aligned to the device's
// logical block; rather than read-modify-write (which would race with
// concurrent writers of the same block) unaligned requests go through a
// second, buffered descriptor. Linux keeps the two coherent: a direct read
// writes back dirty cached pages of its range first, and a direct write
// invalidates them.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/checked.hpp"
#include "common/log.hpp"
#include "image/io/data_run_cache.hpp"
#include "image/io/file.hpp"
#include "image/io/lock.hpp"

namespace qnbd::image {
namespace {

constexpr std::uint64_t kDirectAlign = 4096;

Error errno_error(int err, const std::string& name, const char* what, std::uint64_t offset) {
  return Error{err, fmt::format("{}: {} at offset {:#x}: {}", name, what, offset, std::strerror(err))};
}

class PosixFile final : public File {
 public:
  PosixFile(std::string name, int fd, int buffered_fd, CacheMode cache)
      : name_(std::move(name)), fd_(fd), buffered_fd_(buffered_fd), cache_(cache) {}
  ~PosixFile() override {
    if (buffered_fd_ >= 0 && buffered_fd_ != fd_) ::close(buffered_fd_);
    ::close(fd_);
  }
  PosixFile(const PosixFile&) = delete;
  PosixFile& operator=(const PosixFile&) = delete;

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override {
    int fd = fd_for(buf.data(), buf.size(), offset);
    std::size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_error(errno, name_, "read", offset + done);
      }
      if (n == 0) break;  // end of file
      done += static_cast<std::size_t>(n);
    }
    return done;
  }

  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override {
    int fd = fd_for(buf.data(), buf.size(), offset);
    std::size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pwrite(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_error(errno, name_, "write", offset + done);
      }
      if (n == 0) return errno_error(EIO, name_, "write made no progress", offset + done);
      done += static_cast<std::size_t>(n);
    }
    return ok();
  }

  Result<void> flush() override {
    if (cache_ == CacheMode::unsafe) return ok();
    if (buffered_fd_ != fd_ && ::fdatasync(buffered_fd_) < 0) return errno_error(errno, name_, "fdatasync", 0);
    if (::fdatasync(fd_) < 0) return errno_error(errno, name_, "fdatasync", 0);
    return ok();
  }

  Result<void> truncate(std::uint64_t size) override {
    while (::ftruncate(fd_, static_cast<off_t>(size)) < 0) {
      if (errno != EINTR) return errno_error(errno, name_, "truncate", size);
    }
    data_runs_.forget(size, UINT64_MAX);
    return ok();
  }

  Result<std::uint64_t> size() override {
    struct stat st;
    if (::fstat(fd_, &st) < 0) return errno_error(errno, name_, "fstat", 0);
    if (S_ISBLK(st.st_mode)) {
      off_t end = ::lseek(fd_, 0, SEEK_END);
      if (end < 0) return errno_error(errno, name_, "seek to end", 0);
      return static_cast<std::uint64_t>(end);
    }
    return static_cast<std::uint64_t>(st.st_size);
  }

  Result<std::uint64_t> allocated_size() override {
    struct stat st;
    if (::fstat(fd_, &st) < 0) return errno_error(errno, name_, "fstat", 0);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
  }

  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool may_unmap) override {
    auto fast = write_zeroes_fast(offset, length, may_unmap);
    if (fast || fast.error().code != ENOTSUP) return fast;
    return File::write_zeroes(offset, length, may_unmap);
  }

  Result<void> write_zeroes_fast(std::uint64_t offset, std::uint64_t length, bool may_unmap) override {
    if (length == 0) return ok();
    if (!checked_add(offset, length)) return make_error(EINVAL, "{}: zero range overflows", name_);
    std::uint64_t file_size = QNBD_TRY(size());
    // Punching a hole never changes the size, so only use it inside the file.
    // Both leave holes (ZERO_RANGE: unwritten extents, which SEEK_HOLE
    // reports as holes), so the cached data runs there are forgotten.
    if (may_unmap && offset + length <= file_size &&
        fallocate_ok(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)) {
      data_runs_.forget(offset, offset + length);
      return ok();
    }
    if (!no_zero_range_.load(std::memory_order_relaxed)) {
      if (fallocate_ok(FALLOC_FL_ZERO_RANGE, offset, length)) {
        data_runs_.forget(offset, offset + length);
        return ok();
      }
      if (errno == EOPNOTSUPP) no_zero_range_.store(true, std::memory_order_relaxed);
    }
    // Without ZERO_RANGE (tmpfs, older file systems), as QEMU's file-posix
    // does for a write of zeroes that must not fall back to writing: punch
    // the range out, then allocate it again, which leaves it allocated and
    // reading as zeroes (and extends the file where it reaches past EOF).
    if (fallocate_ok(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) && fallocate_ok(0, offset, length)) {
      data_runs_.forget(offset, offset + length);
      return ok();
    }
    return make_error(ENOTSUP, "{}: the file system cannot zero quickly", name_);
  }

  Result<void> discard(std::uint64_t offset, std::uint64_t length) override {
    if (length == 0) return ok();
    // Best effort, like qemu: a filesystem without hole punching keeps the data.
    if (fallocate_ok(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)) {
      data_runs_.forget(offset, offset + length);
    }
    return ok();
  }

  Result<bool> is_hole(std::uint64_t offset, std::uint64_t length) override {
    if (length == 0) return true;
    Extent e = QNBD_TRY(probe_extent(offset, length));
    return e.hole && e.length >= length;
  }

  Result<Extent> probe_extent(std::uint64_t offset, std::uint64_t max_length) override {
    if (max_length == 0) return Extent{0, false};
    // Inside a data run SEEK_HOLE already reported: no system call at all
    // (not even fstat; the run ended at or before EOF when it was learned).
    const auto known = data_runs_.lookup(offset);
    if (known.run_end > offset) return Extent{std::min(max_length, known.run_end - offset), false};
    std::uint64_t file_size = QNBD_TRY(size());
    if (offset >= file_size) return Extent{max_length, true};
    const std::uint64_t limit = std::min(max_length, file_size - offset);
    const std::uint64_t epoch = data_runs_.epoch();
    // SEEK_HOLE runs to the end of the data run, however far that is (on
    // tmpfs a page-cache walk under the inode lock, to EOF for a fully
    // written file). So learn whole runs, each once: search from the end of
    // the known run before offset (or 0), which finds where offset's run
    // begins, rather than from offset, which would learn only its tail and
    // walk the rest again for every READ before it.
    const std::uint64_t from = known.prev_end;
    off_t data = ::lseek(fd_, static_cast<off_t>(from), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return Extent{limit, true};  // only a hole up to EOF
      // No SEEK_DATA support (or another error): assume data, as qemu does.
      return Extent{limit, false};
    }
    if (static_cast<std::uint64_t>(data) > offset) {
      return Extent{std::min<std::uint64_t>(limit, static_cast<std::uint64_t>(data) - offset), true};
    }
    off_t hole = ::lseek(fd_, data, SEEK_HOLE);
    if (hole < 0 || hole <= data) return Extent{limit, false};
    data_runs_.add(static_cast<std::uint64_t>(data), static_cast<std::uint64_t>(hole), epoch);
    if (static_cast<std::uint64_t>(hole) > offset) {
      return Extent{std::min<std::uint64_t>(limit, static_cast<std::uint64_t>(hole) - offset), false};
    }
    // That run ended before offset: ask about offset itself (at most four
    // probes in all).
    data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) return Extent{limit, errno == ENXIO};
    if (static_cast<std::uint64_t>(data) > offset) {
      return Extent{std::min<std::uint64_t>(limit, static_cast<std::uint64_t>(data) - offset), true};
    }
    hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
    if (hole < 0 || static_cast<std::uint64_t>(hole) <= offset) return Extent{limit, false};
    data_runs_.add(offset, static_cast<std::uint64_t>(hole), epoch);
    return Extent{std::min<std::uint64_t>(limit, static_cast<std::uint64_t>(hole) - offset), false};
  }

  Result<void> set_lock(const LockRequest& request) override {
    if (lock_.active()) return lock_.change(request.perm, request.shared);
    if (lock_attempted_) return ok();  // locking is off (or unsupported) for this file
    // The locks live on the first descriptor; the O_DIRECT one is a second
    // open file description of this process and holds none.
    lock_ = QNBD_TRY(ImageLock::acquire(buffered_fd_, name_, request));
    lock_attempted_ = true;
    return ok();
  }

  // O_DIRECT files keep their bytes out of the page cache: no splice.
  int splice_fd() const override { return opens_direct(cache_) ? -1 : fd_; }
  const std::string& name() const override { return name_; }

 private:
  // O_DIRECT only takes aligned requests; send the rest to the buffered fd.
  int fd_for(const void* buf, std::size_t len, std::uint64_t offset) const {
    if (buffered_fd_ == fd_) return fd_;
    if (is_aligned(reinterpret_cast<std::uintptr_t>(buf), kDirectAlign) && is_aligned(len, kDirectAlign) &&
        is_aligned(offset, kDirectAlign)) {
      return fd_;
    }
    return buffered_fd_;
  }

  bool fallocate_ok(int mode, std::uint64_t offset, std::uint64_t length) {
    for (;;) {
      if (::fallocate(fd_, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return true;
      if (errno != EINTR) return false;
    }
  }

  std::string name_;
  int fd_;
  int buffered_fd_;
  CacheMode cache_;
  DataRunCache data_runs_;
  // FALLOC_FL_ZERO_RANGE answered EOPNOTSUPP once: not asked again.
  std::atomic<bool> no_zero_range_{false};
  // Closing the descriptors releases the locks; ImageLock needs no cleanup.
  ImageLock lock_;
  bool lock_attempted_ = false;
};

Result<int> open_fd(const std::string& path, int flags) {
  for (;;) {
    int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
    if (fd >= 0) return fd;
    if (errno == EINTR) continue;
    return Error{errno, fmt::format("{}: {}", path, std::strerror(errno))};
  }
}

// Opens path for an image: only a regular file or a block device. Opened
// with O_NONBLOCK (then cleared), so a FIFO or a device named by an image
// (a backing or data file) cannot block the open; its type is checked on
// the open descriptor, so the file cannot be swapped after the check.
Result<int> open_image_fd(const std::string& path, int flags) {
  int fd = QNBD_TRY(open_fd(path, flags | O_NONBLOCK | O_NOCTTY));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return make_error(err, "{}: {}", path, std::strerror(err));
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    ::close(fd);
    if (S_ISDIR(st.st_mode)) return make_error(EISDIR, "{}: is a directory", path);
    const char* kind = S_ISFIFO(st.st_mode)   ? "a FIFO"
                       : S_ISCHR(st.st_mode)  ? "a character device"
                       : S_ISSOCK(st.st_mode) ? "a socket"
                                              : "not a plain file";
    return make_error(EINVAL, "{}: is {}, not a regular file or block device", path, kind);
  }
  if (::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
    int err = errno;
    ::close(fd);
    return make_error(err, "{}: {}", path, std::strerror(err));
  }
  return fd;
}

}  // namespace

Result<std::unique_ptr<File>> open_posix_file(const std::string& path, OpenMode mode, CacheMode cache) {
  int flags = mode == OpenMode::read_write ? O_RDWR : O_RDONLY;
  int fd = QNBD_TRY(open_image_fd(path, flags));
  int buffered_fd = fd;
  if (opens_direct(cache)) {
    auto direct = open_image_fd(path, flags | O_DIRECT);
    if (direct) {
      fd = *direct;
    } else {
      log::warn("{}: O_DIRECT refused ({}); using the page cache", path, direct.error().message);
    }
  }
  return std::unique_ptr<File>(new PosixFile(path, fd, buffered_fd, cache));
}

Result<std::unique_ptr<File>> create_posix_file(const std::string& path) {
  int fd = QNBD_TRY(open_fd(path, O_RDWR | O_CREAT | O_TRUNC));
  return std::unique_ptr<File>(new PosixFile(path, fd, fd, CacheMode::writeback));
}

Result<std::unique_ptr<File>> open_side_file(const std::string& path, OpenMode mode, bool create) {
  int flags = (mode == OpenMode::read_write ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY;
  if (create) flags |= O_CREAT;
  auto opened = open_fd(path, flags);
  if (!opened) {
    if (opened.error().code == ELOOP) return make_error(ELOOP, "{}: a symbolic link, not followed", path);
    return opened.error();
  }
  const int fd = *opened;
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return make_error(EINVAL, "{}: not a regular file", path);
  }
  // Truncated only once known to be a regular file (O_TRUNC at open would
  // act on whatever the name was).
  if (create && ::ftruncate(fd, 0) != 0) {
    const int err = errno;
    ::close(fd);
    return make_error(err, "{}: {}", path, std::strerror(err));
  }
  if (::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    return make_error(err, "{}: {}", path, std::strerror(err));
  }
  return std::unique_ptr<File>(new PosixFile(path, fd, fd, CacheMode::writeback));
}

}  // namespace qnbd::image
