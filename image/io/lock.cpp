// ImageLock and lock_request(): see lock.hpp for the layout and the rules.
#include "image/io/lock.hpp"

#include <fcntl.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "common/log.hpp"

namespace qnbd::image {
namespace {

constexpr unsigned kPermBits = 4;  // bits of BLK_PERM_ALL

// Errors that mean "this file system (or kernel) has no OFD locks" rather
// than "someone else holds the byte": EINVAL (no F_OFD_* in the kernel),
// ENOTSUP/EOPNOTSUPP (a file system refusing fcntl locks), ENOLCK (NFS
// without a lock manager).
bool no_ofd_locks(int err) { return err == EINVAL || err == ENOTSUP || err == EOPNOTSUPP || err == ENOLCK; }

// F_OFD_SETLK on one byte; 0 or an errno.
int set_byte(int fd, std::uint64_t offset, short type) {
  struct flock fl = {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(offset);
  fl.l_len = 1;
  for (;;) {
    if (::fcntl(fd, F_OFD_SETLK, &fl) == 0) return 0;
    if (errno != EINTR) return errno;
  }
}

// 0 if no other open file description holds a lock on the byte (a write
// lock could be taken), EAGAIN if one does, another errno on failure.
int test_byte(int fd, std::uint64_t offset) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(offset);
  fl.l_len = 1;
  for (;;) {
    if (::fcntl(fd, F_OFD_GETLK, &fl) == 0) return fl.l_type == F_UNLCK ? 0 : EAGAIN;
    if (errno != EINTR) return errno;
  }
}

struct Failure {
  int err = 0;
  std::uint64_t offset = 0;
};

// raw_apply_lock_bytes: bring the bytes locked on fd from `locked_*` to
// (perm, unshared). Without `unlock` bytes are only added. Updates
// locked_* as it goes, so a failure leaves them describing the file.
Failure apply_bytes(int fd, std::uint64_t& locked_perm, std::uint64_t& locked_unshared, std::uint64_t perm,
                    std::uint64_t unshared, bool unlock) {
  struct Set {
    std::uint64_t base;
    std::uint64_t& locked;
    std::uint64_t want;
  };
  Set sets[] = {{RAW_LOCK_PERM_BASE, locked_perm, perm}, {RAW_LOCK_SHARED_BASE, locked_unshared, unshared}};
  for (Set& s : sets) {
    for (unsigned i = 0; i < kPermBits; ++i) {
      const std::uint64_t bit = std::uint64_t{1} << i;
      if ((s.want & bit) && !(s.locked & bit)) {
        if (int e = set_byte(fd, s.base + i, F_RDLCK)) return {e, s.base + i};
        s.locked |= bit;
      } else if (unlock && (s.locked & bit) && !(s.want & bit)) {
        if (int e = set_byte(fd, s.base + i, F_UNLCK)) return {e, s.base + i};
        s.locked &= ~bit;
      }
    }
  }
  return {};
}

// raw_check_lock_bytes: another opener refusing to share what we want, or
// holding what we refuse to share. Returns the conflict (err EAGAIN) with
// `shared_conflict` saying which of the two, or a fcntl failure.
struct Conflict {
  int err = 0;
  std::uint64_t bit = 0;
  bool shared_conflict = false;
  std::uint64_t offset = 0;
};
Conflict check_bytes(int fd, std::uint64_t perm, std::uint64_t shared) {
  for (unsigned i = 0; i < kPermBits; ++i) {
    const std::uint64_t bit = std::uint64_t{1} << i;
    if (perm & bit) {
      if (int e = test_byte(fd, RAW_LOCK_SHARED_BASE + i)) return {e, bit, false, RAW_LOCK_SHARED_BASE + i};
    }
  }
  for (unsigned i = 0; i < kPermBits; ++i) {
    const std::uint64_t bit = std::uint64_t{1} << i;
    if (!(shared & bit)) {
      if (int e = test_byte(fd, RAW_LOCK_PERM_BASE + i)) return {e, bit, true, RAW_LOCK_PERM_BASE + i};
    }
  }
  return {};
}

Error conflict_error(const std::string& name, const Conflict& c) {
  return Error{EAGAIN, fmt::format("{}: Failed to get {}\"{}\" lock. Is another process using the image [{}]?", name,
                                   c.shared_conflict ? "shared " : "", perm_names(c.bit), name)};
}

// A fcntl failure that is not a conflict: ok() means "go on unlocked"
// (Locking::automatic on a file system without OFD locks, with a warning);
// anything else is the error to report.
Result<void> fcntl_failure(const std::string& name, int err, std::uint64_t offset, Locking locking) {
  if (no_ofd_locks(err)) {
    if (locking == Locking::automatic) {
      log::warn("{}: the file system does not support OFD locks ({}); the image is not locked "
                "(locking=auto)",
                name, std::strerror(err));
      return ok();
    }
    return make_error(err,
                      "{}: cannot lock the image: {} (the file system has no OFD locks; locking=off opens it "
                      "without)",
                      name, std::strerror(err));
  }
  if (err == EAGAIN || err == EACCES) {
    // A write lock (not QEMU's) on one of the bytes.
    return make_error(EAGAIN, "{}: Failed to lock byte {}. Is another process using the image [{}]?", name, offset,
                      name);
  }
  return make_error(err, "{}: Failed to lock byte {}: {}", name, offset, std::strerror(err));
}

}  // namespace

bool parse_locking(const std::string& text, Locking& out) {
  if (text == "auto") {
    out = Locking::automatic;
  } else if (text == "on") {
    out = Locking::on;
  } else if (text == "off") {
    out = Locking::off;
  } else {
    return false;
  }
  return true;
}

LockRequest lock_request(const LockOptions& options, LockRole role, bool qcow2, bool writable) {
  constexpr std::uint64_t CR = BLK_PERM_CONSISTENT_READ, W = BLK_PERM_WRITE, RS = BLK_PERM_RESIZE;
  LockRequest r;
  r.locking = options.locking;
  if (options.use == LockUse::info) {
    // qemu-img info (and --backing-chain) holds nothing, but the qcow2
    // metadata it reads must not change under it; raw and data files are
    // not touched.
    r.perm = 0;
    r.shared = qcow2 && role != LockRole::data_file ? BLK_PERM_ALL & ~(W | RS) : BLK_PERM_ALL;
  } else {
    switch (role) {
      case LockRole::image:
        if (qcow2) {
          // The qcow2 driver's metadata child: writers grow the file, and
          // nobody else may write or resize it.
          r.perm = CR | (writable ? W | RS : 0);
          r.shared = BLK_PERM_ALL & ~(W | RS);
        } else {
          // Raw passes its user's permissions through: qemu-io shares
          // everything, an NBD export refuses resizes (fixed size).
          r.perm = CR | (writable ? W : 0);
          r.shared = options.use == LockUse::export_ ? BLK_PERM_ALL & ~RS : BLK_PERM_ALL;
        }
        break;
      case LockRole::backing:
        // bdrv_default_perms_for_cow: consistent reads only; a qcow2
        // backing file's own metadata child still refuses writers.
        r.perm = CR;
        r.shared = qcow2 ? BLK_PERM_ALL & ~(W | RS) : BLK_PERM_ALL;
        break;
      case LockRole::data_file:
        // qcow2's data child: written (and grown) by a writer; nobody
        // else may resize it, writes are shared.
        r.perm = CR | (writable ? W | RS : 0);
        r.shared = BLK_PERM_ALL & ~RS;
        break;
    }
  }
  if (options.force_share) r.shared = BLK_PERM_ALL;
  return r;
}

std::string perm_names(std::uint64_t perm) {
  static const char* const names[kPermBits] = {"consistent read", "write", "write unchanged", "resize"};
  std::string out;
  for (unsigned i = 0; i < kPermBits; ++i) {
    if (!(perm & (std::uint64_t{1} << i))) continue;
    if (!out.empty()) out += ", ";
    out += names[i];
  }
  return out;
}

std::string lock_bytes(const LockRequest& request) {
  std::string out;
  auto add = [&out](std::uint64_t byte) {
    if (!out.empty()) out += ' ';
    out += std::to_string(byte);
  };
  for (unsigned i = 0; i < kPermBits; ++i) {
    if (request.perm & (std::uint64_t{1} << i)) add(RAW_LOCK_PERM_BASE + i);
  }
  for (unsigned i = 0; i < kPermBits; ++i) {
    if (!(request.shared & (std::uint64_t{1} << i))) add(RAW_LOCK_SHARED_BASE + i);
  }
  return out;
}

ImageLock::ImageLock(ImageLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), name_(std::move(other.name_)), perm_(std::exchange(other.perm_, 0)),
      shared_(std::exchange(other.shared_, BLK_PERM_ALL)) {}

ImageLock& ImageLock::operator=(ImageLock&& other) noexcept {
  if (this != &other) {
    fd_ = std::exchange(other.fd_, -1);
    name_ = std::move(other.name_);
    perm_ = std::exchange(other.perm_, 0);
    shared_ = std::exchange(other.shared_, BLK_PERM_ALL);
  }
  return *this;
}

Result<ImageLock> ImageLock::acquire(int fd, const std::string& name, const LockRequest& request) {
  ImageLock lock;
  if (request.locking == Locking::off) return lock;
  const std::uint64_t perm = request.perm & BLK_PERM_ALL;
  const std::uint64_t shared = request.shared | ~BLK_PERM_ALL;
  std::uint64_t locked_perm = 0, locked_unshared = 0;
  auto undo = [&] {
    std::uint64_t none = 0;
    (void)apply_bytes(fd, locked_perm, locked_unshared, none, none, true);
  };
  if (Failure f = apply_bytes(fd, locked_perm, locked_unshared, perm, ~shared & BLK_PERM_ALL, false); f.err) {
    undo();
    QNBD_TRY(fcntl_failure(name, f.err, f.offset, request.locking));
    return lock;  // no OFD locks here: inactive
  }
  if (Conflict c = check_bytes(fd, perm, shared); c.err) {
    undo();
    if (c.err == EAGAIN) return conflict_error(name, c);
    QNBD_TRY(fcntl_failure(name, c.err, c.offset, request.locking));
    return lock;
  }
  lock.fd_ = fd;
  lock.name_ = name;
  lock.perm_ = perm;
  lock.shared_ = shared & BLK_PERM_ALL;
  return lock;
}

Result<void> ImageLock::change(std::uint64_t perm, std::uint64_t shared) {
  if (!active()) return ok();
  perm &= BLK_PERM_ALL;
  shared &= BLK_PERM_ALL;
  std::uint64_t locked_perm = perm_, locked_unshared = ~shared_ & BLK_PERM_ALL;
  auto restore = [&] { (void)apply_bytes(fd_, locked_perm, locked_unshared, perm_, ~shared_ & BLK_PERM_ALL, true); };
  // Prepare: hold the union of old and new, so there is no window in which
  // another opener could slip in.
  if (Failure f =
          apply_bytes(fd_, locked_perm, locked_unshared, perm_ | perm, (~shared_ | ~shared) & BLK_PERM_ALL, false);
      f.err) {
    restore();
    return fcntl_failure(name_, f.err, f.offset, Locking::on);  // always an error
  }
  if (Conflict c = check_bytes(fd_, perm, shared); c.err) {
    restore();
    if (c.err == EAGAIN) return conflict_error(name_, c);
    return fcntl_failure(name_, c.err, c.offset, Locking::on);
  }
  // Commit: drop what is no longer needed. Unlocking cannot conflict.
  if (Failure f = apply_bytes(fd_, locked_perm, locked_unshared, perm, ~shared & BLK_PERM_ALL, true); f.err) {
    log::warn("{}: could not unlock byte {}: {}", name_, f.offset, std::strerror(f.err));
  }
  perm_ = perm;
  shared_ = shared;
  return ok();
}

void ImageLock::release() {
  if (!active()) return;
  std::uint64_t locked_perm = perm_, locked_unshared = ~shared_ & BLK_PERM_ALL;
  (void)apply_bytes(fd_, locked_perm, locked_unshared, 0, 0, true);
  fd_ = -1;
  perm_ = 0;
  shared_ = BLK_PERM_ALL;
}

}  // namespace qnbd::image
