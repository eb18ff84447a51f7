// Image locking that QEMU honours: the open-file-description byte-range
// locks of QEMU's file driver (QEMU 7.2 block/file-posix.c,
// raw_apply_lock_bytes / raw_check_lock_bytes), so qnbd and every QEMU
// process (qemu-img, qemu-io, qemu-nbd, a running VM) see each other.
//
// Layout. Each BLK_PERM_* bit i (include/block/block-common.h) owns two
// bytes of the file: 100 + i, locked while the opener holds the permission,
// and 200 + i, locked while it refuses to share it with anyone else. Byte 0
// is libvirt's; 104/204 belonged to BLK_PERM_GRAPH_MOD up to QEMU 6.1 and
// are left alone. Every lock is a shared one (F_RDLCK), so lockers never
// block each other; a conflict is found by asking F_OFD_GETLK whether a
// write lock could be taken, which reports only locks of *other* open file
// descriptions:
//   - wanting permission P fails if someone holds 200 + P
//     ("Failed to get \"P\" lock");
//   - refusing to share P fails if someone holds 100 + P
//     ("Failed to get shared \"P\" lock").
// OFD locks belong to the open file description, not the process: two
// opens of one image inside one qnbd conflict like two processes, and the
// locks go away when the descriptor is closed (or the process dies).
//
// Which permissions an opener takes is QEMU's choice per format and role,
// reproduced by lock_request() (observed in /proc/locks against qemu-img,
// qemu-io and qemu-nbd 7.2; docs/testing.md, test-lock.sh).
//
// Reuse: open_image() takes the locks of the image, its external data file
// and every backing file (read-only, shared) from OpenOptions::lock, and
// they are held as long as the device lives. Anything that opens an image
// later (the control socket's export-add, backup views) gets the same
// locks by opening it through open_image(), and releases them by closing
// the device. File::set_lock() moves an open file to other permissions
// (QEMU's prepare/commit: new bytes are locked and checked before old ones
// are dropped), and ImageLock works on any descriptor.
#pragma once

#include <cstdint>
#include <string>

#include "common/result.hpp"

namespace qnbd::image {

// BLK_PERM_* of QEMU 7.2 (include/block/block-common.h).
inline constexpr std::uint64_t BLK_PERM_CONSISTENT_READ = 0x01;
inline constexpr std::uint64_t BLK_PERM_WRITE = 0x02;
inline constexpr std::uint64_t BLK_PERM_WRITE_UNCHANGED = 0x04;
inline constexpr std::uint64_t BLK_PERM_RESIZE = 0x08;
inline constexpr std::uint64_t BLK_PERM_ALL = 0x0f;

// file-posix.c's RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE.
inline constexpr std::uint64_t RAW_LOCK_PERM_BASE = 100;
inline constexpr std::uint64_t RAW_LOCK_SHARED_BASE = 200;

// QEMU's file.locking option.
enum class Locking {
  automatic,  // lock; a file system without OFD locks gets a warning and no lock
  on,         // lock; a file system without OFD locks is an error
  off,        // take no lock and check none
};

// Parse "on" / "off" / "auto" (QEMU's spelling); false if unknown.
bool parse_locking(const std::string& text, Locking& out);

// What an opener is, for the permissions QEMU takes.
enum class LockUse {
  tool,     // qemu-img map/check/convert/bitmap, qemu-io: reads, or writes when writable
  info,     // qemu-img info: reads metadata only, holds no permission
  export_,  // qemu-nbd: as tool, and also refuses to share resize
};
enum class LockRole {
  image,      // the file named by the user
  backing,    // a backing file (always read-only)
  data_file,  // a qcow2 external data file
};

// Per-open settings (OpenOptions::lock).
struct LockOptions {
  Locking locking = Locking::automatic;
  bool force_share = false;  // -U / force-share=on: share every permission (read-only opens)
  LockUse use = LockUse::tool;
};

// The permissions one file descriptor holds and shares.
struct LockRequest {
  std::uint64_t perm = 0;               // held: byte RAW_LOCK_PERM_BASE + bit
  std::uint64_t shared = BLK_PERM_ALL;  // shared; each bit NOT here locks RAW_LOCK_SHARED_BASE + bit
  Locking locking = Locking::automatic;
};

// The request QEMU 7.2 makes for one file: `qcow2` is the format of the
// image the file holds (image and backing roles), `writable` whether the
// opener writes it.
LockRequest lock_request(const LockOptions& options, LockRole role, bool qcow2, bool writable);

// BLK_PERM names as bdrv_perm_names() prints them: "consistent read",
// "write", "write unchanged", "resize", joined with ", ".
std::string perm_names(std::uint64_t perm);

// The lock bytes of `request`, ascending (the layout, for tests and logs).
std::string lock_bytes(const LockRequest& request);

// The locks held on one descriptor. Does not own the descriptor; the
// destructor releases nothing (closing the descriptor does), so it is safe
// to destroy after the descriptor is gone.
class ImageLock {
 public:
  ImageLock() = default;
  ImageLock(ImageLock&& other) noexcept;
  ImageLock& operator=(ImageLock&& other) noexcept;
  ImageLock(const ImageLock&) = delete;
  ImageLock& operator=(const ImageLock&) = delete;

  // Lock the bytes of `request` on fd, then check that no other open file
  // description conflicts. Conflict: EAGAIN, one line
  //   NAME: Failed to get "write" lock. Is another process using the image [NAME]?
  // and nothing stays locked. A file system without OFD locks (EINVAL,
  // ENOTSUP, ENOLCK): with Locking::on an error naming NAME and the cause;
  // with Locking::automatic a warning and an inactive lock. Locking::off
  // returns an inactive lock without touching the file.
  [[nodiscard]] static Result<ImageLock> acquire(int fd, const std::string& name, const LockRequest& request);

  // Move to new permissions: lock the added bytes, check, then unlock the
  // ones no longer needed. On failure the old locks are kept. No-op when
  // inactive.
  [[nodiscard]] Result<void> change(std::uint64_t perm, std::uint64_t shared);

  // Unlock every byte; the lock becomes inactive. Call before closing the
  // descriptor, or not at all.
  void release();

  bool active() const { return fd_ >= 0; }
  std::uint64_t perm() const { return perm_; }
  std::uint64_t shared() const { return shared_; }

 private:
  int fd_ = -1;
  std::string name_;
  std::uint64_t perm_ = 0;
  std::uint64_t shared_ = BLK_PERM_ALL;
};

}  // namespace qnbd::image
