#include "image/qcow2/bitmap_intent.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "image/qcow2/format.hpp"

namespace qnbd::image::qcow2 {
namespace {

constexpr std::size_t kFixedHeader = 72;
constexpr std::uint64_t kSector = 512;
// The chunk bits of a record stay at most this big (2^25 chunks): a larger
// disk gets a larger chunk, and a record claiming more is refused before
// anything is allocated for it.
constexpr std::uint64_t kMaxChunkBitsBytes = 4ull << 20;

std::uint64_t chunk_count(std::uint64_t disk_size, std::uint64_t chunk) { return div_round_up(disk_size, chunk); }

std::uint64_t bits_offset_for(std::uint32_t nb_bitmaps) {
  return align_up(kFixedHeader + div_round_up(std::uint64_t{nb_bitmaps}, 8), kSector);
}

// fsync the directory holding `path`, so a created or removed name is
// durable (POSIX: fsync of the file does not cover its directory entry).
Result<void> sync_parent(const std::string& path) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return make_error(errno, "{}: {}", dir, std::strerror(errno));
  int r = ::fsync(fd);
  int e = errno;
  ::close(fd);
  if (r < 0) return make_error(e, "fsync {}: {}", dir, std::strerror(e));
  return ok();
}

// Create (empty, its name synced) or open read-only a record file, never
// through a symbolic link (open_side_file); a null
// file when it does not exist.
Result<std::unique_ptr<File>> open_record_file(const std::string& name, bool create) {
  if (create) {
    std::unique_ptr<File> f = QNBD_TRY(open_side_file(name, OpenMode::read_write, true));
    QNBD_TRY(sync_parent(name));
    return f;
  }
  auto f = open_side_file(name, OpenMode::read_only, false);
  if (!f && f.error().code == ENOENT) return std::unique_ptr<File>();
  return f;
}

}  // namespace

IntentAccess intent_access(const std::string& image_path, std::uint64_t chunk_size) {
  IntentAccess a;
  a.name = image_path + INTENT_SUFFIX;
  a.chunk_size = chunk_size ? chunk_size : INTENT_DEFAULT_CHUNK;
  a.open = [name = a.name](bool create) { return open_record_file(name, create); };
  const std::string next = a.name + ".next";
  a.remove = [name = a.name, next] {
    if (::unlink(name.c_str()) == 0) (void)sync_parent(name);
    if (::unlink(next.c_str()) == 0) (void)sync_parent(next);
  };
  a.open_next = [next](bool create) { return open_record_file(next, create); };
  // rename(2) replaces the record atomically: a crash leaves one name or
  // the other, and recovery reads both.
  a.promote_next = [name = a.name, next]() -> Result<void> {
    if (::rename(next.c_str(), name.c_str()) != 0) {
      const int e = errno;
      return make_error(e, "rename {} to {}: {}", next, name, std::strerror(e));
    }
    return sync_parent(name);
  };
  a.remove_next = [next] {
    if (::unlink(next.c_str()) == 0) (void)sync_parent(next);
  };
  a.open_writable = [name = a.name]() { return open_side_file(name, OpenMode::read_write, false); };
  return a;
}

std::uint64_t fnv1a64(std::span<const std::byte> data, std::uint64_t h) {
  for (std::byte b : data) {
    h ^= static_cast<std::uint8_t>(b);
    h *= 0x100000001b3ull;
  }
  return h;
}

Result<IntentContents> read_intent(File& file, const IntentIdentity& id) {
  std::byte fixed[kFixedHeader];
  if (QNBD_TRY(file.pread(fixed, 0)) != kFixedHeader) return make_error(EINVAL, "the record is truncated");
  if (load_be32(fixed) != INTENT_MAGIC) return make_error(EINVAL, "not a write-intent record (bad magic)");
  if (load_be32(fixed + 4) != INTENT_VERSION)
    return make_error(ENOTSUP, "unknown record version {}", load_be32(fixed + 4));
  IntentContents c;
  c.chunk_size = load_be64(fixed + 8);
  const std::uint32_t nb = load_be32(fixed + 56);
  const std::uint64_t bits_at = load_be32(fixed + 60);
  if (!std::has_single_bit(c.chunk_size) || c.chunk_size < INTENT_MIN_CHUNK || c.chunk_size > INTENT_MAX_CHUNK) {
    return make_error(EINVAL, "invalid chunk size {}", c.chunk_size);
  }
  if (nb != id.nb_bitmaps || bits_at != bits_offset_for(nb)) {
    return make_error(EINVAL, "the record was armed for another bitmap directory");
  }
  std::vector<std::byte> tracked(static_cast<std::size_t>(div_round_up(std::uint64_t{nb}, 8)));
  if (QNBD_TRY(file.pread(tracked, kFixedHeader)) != tracked.size())
    return make_error(EINVAL, "the record is truncated");
  std::uint64_t sum = fnv1a64(std::span(fixed, 64));
  sum = fnv1a64(tracked, sum);
  if (sum != load_be64(fixed + 64)) return make_error(EINVAL, "the record's header checksum does not match");
  if (load_be64(fixed + 16) != id.disk_size) return make_error(EINVAL, "the record was armed for another disk size");
  if (load_be64(fixed + 24) != id.directory_offset || load_be64(fixed + 32) != id.directory_size ||
      (load_be64(fixed + 40) != id.directory_checksum && load_be64(fixed + 48) != id.directory_checksum)) {
    return make_error(EINVAL, "the bitmap directory changed since the record was armed");
  }
  c.before_marking = load_be64(fixed + 40) != id.directory_checksum;
  const std::uint64_t chunks = chunk_count(id.disk_size, c.chunk_size);
  const std::uint64_t nbytes = div_round_up(chunks, 8);
  if (nbytes > kMaxChunkBitsBytes) return make_error(EINVAL, "the record has too many chunks ({})", chunks);
  // Arming syncs the record at its full size before the image names it, so
  // a shorter file was damaged since: its missing bits may have been set,
  // and trusting them as clear would lose changes.
  if (QNBD_TRY(file.size()) < bits_at + nbytes) return make_error(EINVAL, "the record is truncated");
  std::vector<std::byte> bits(static_cast<std::size_t>(nbytes));
  QNBD_TRY(file.read_exact(bits, bits_at, "write-intent record"));
  c.tracked.resize(nb);
  for (std::uint32_t i = 0; i < nb; ++i) c.tracked[i] = (static_cast<unsigned>(tracked[i / 8]) >> (i % 8)) & 1;
  for (std::uint64_t k = 0; k < chunks; ++k) {
    if ((static_cast<unsigned>(bits[k / 8]) >> (k % 8)) & 1) c.chunks.push_back(k);
  }
  return c;
}

Result<std::unique_ptr<IntentRecord>> IntentRecord::arm(std::unique_ptr<File> file, const IntentIdentity& id,
                                                        std::uint64_t chunk_size, const std::vector<bool>& tracked) {
  if (!std::has_single_bit(chunk_size) || chunk_size < INTENT_MIN_CHUNK || chunk_size > INTENT_MAX_CHUNK) {
    return make_error(EINVAL, "write-intent chunk size {} is not a power of two in [64 KiB, 1 TiB]", chunk_size);
  }
  while (div_round_up(chunk_count(id.disk_size, chunk_size), 8) > kMaxChunkBitsBytes) chunk_size *= 2;
  std::unique_ptr<IntentRecord> r(new IntentRecord());
  r->chunk_size_ = chunk_size;
  r->chunk_shift_ = static_cast<unsigned>(std::countr_zero(chunk_size));
  r->disk_size_ = id.disk_size;
  r->bits_offset_ = bits_offset_for(id.nb_bitmaps);
  const std::uint64_t chunks = chunk_count(id.disk_size, chunk_size);
  r->bits_.assign(static_cast<std::size_t>(div_round_up(chunks, 8)), std::byte{0});
  r->done_words_ = static_cast<std::size_t>(div_round_up(chunks, 64));
  r->done_ = std::make_unique<std::atomic<std::uint64_t>[]>(std::max<std::size_t>(r->done_words_, 1));

  std::vector<std::byte> img(static_cast<std::size_t>(r->bits_offset_ + r->bits_.size()));
  std::byte* p = img.data();
  store_be32(p, INTENT_MAGIC);
  store_be32(p + 4, INTENT_VERSION);
  store_be64(p + 8, chunk_size);
  store_be64(p + 16, id.disk_size);
  store_be64(p + 24, id.directory_offset);
  store_be64(p + 32, id.directory_size);
  store_be64(p + 40, id.directory_checksum);
  store_be64(p + 48, id.directory_checksum_before);
  store_be32(p + 56, id.nb_bitmaps);
  store_be32(p + 60, static_cast<std::uint32_t>(r->bits_offset_));
  for (std::size_t i = 0; i < tracked.size() && i < id.nb_bitmaps; ++i) {
    if (tracked[i]) p[kFixedHeader + i / 8] |= std::byte(1u << (i % 8));
  }
  const std::size_t tracked_bytes = static_cast<std::size_t>(div_round_up(std::uint64_t{id.nb_bitmaps}, 8));
  std::uint64_t sum = fnv1a64(std::span<const std::byte>(p, 64));
  sum = fnv1a64(std::span<const std::byte>(p + kFixedHeader, tracked_bytes), sum);
  store_be64(p + 64, sum);
  // A leftover longer record must not contribute old bits.
  QNBD_TRY(file->truncate(0));
  QNBD_TRY(file->pwrite(img, 0));
  QNBD_TRY(file->flush());
  r->file_ = std::move(file);
  return r;
}

Result<std::unique_ptr<IntentRecord>> IntentRecord::adopt(std::unique_ptr<File> file, const IntentContents& contents,
                                                          std::uint64_t disk_size, std::uint32_t nb_bitmaps) {
  // read_intent checked the chunk size and that the chunk bits are whole in
  // the file; check again, since this record is written to from now on.
  if (!std::has_single_bit(contents.chunk_size) || contents.chunk_size < INTENT_MIN_CHUNK ||
      contents.chunk_size > INTENT_MAX_CHUNK) {
    return make_error(EINVAL, "write-intent chunk size {} is not a power of two in [64 KiB, 1 TiB]",
                      contents.chunk_size);
  }
  const std::uint64_t chunks = chunk_count(disk_size, contents.chunk_size);
  if (div_round_up(chunks, 8) > kMaxChunkBitsBytes) return make_error(EINVAL, "the record has too many chunks");
  std::unique_ptr<IntentRecord> r(new IntentRecord());
  r->chunk_size_ = contents.chunk_size;
  r->chunk_shift_ = static_cast<unsigned>(std::countr_zero(contents.chunk_size));
  r->disk_size_ = disk_size;
  r->bits_offset_ = bits_offset_for(nb_bitmaps);
  r->bits_.assign(static_cast<std::size_t>(div_round_up(chunks, 8)), std::byte{0});
  r->done_words_ = static_cast<std::size_t>(div_round_up(chunks, 64));
  r->done_ = std::make_unique<std::atomic<std::uint64_t>[]>(std::max<std::size_t>(r->done_words_, 1));
  for (std::uint64_t k : contents.chunks) {
    if (k >= chunks) return make_error(EINVAL, "the record marks chunk {} past the disk", k);
    r->bits_[k / 8] |= std::byte(1u << (k % 8));
    // Already durable: read back from the file just now.
    r->done_[k / 64].fetch_or(1ull << (k % 64), std::memory_order_relaxed);
  }
  r->marked_count_.store(contents.chunks.size(), std::memory_order_relaxed);
  r->file_ = std::move(file);
  return r;
}

Result<void> IntentRecord::mark_from(IntentRecord& other) {
  if (other.chunk_size_ != chunk_size_ || other.disk_size_ != disk_size_) {
    return make_error(EINVAL, "write-intent record: chunk size or disk size differs");
  }
  if (test_skip_fill.load(std::memory_order_relaxed)) return ok();
  std::vector<std::byte> bits;
  {
    // Under its mutex every set bit is durable there (a mark that fails
    // clears its bits before it lets go).
    std::lock_guard lock(other.mutex_);
    bits = other.bits_;
  }
  std::lock_guard lock(mutex_);
  std::uint64_t added = 0;
  for (std::size_t i = 0; i < bits_.size(); ++i) {
    added += static_cast<std::uint64_t>(std::popcount(static_cast<unsigned>(bits[i] & ~bits_[i])));
    bits_[i] |= bits[i];
  }
  if (added == 0) return ok();
  QNBD_TRY(file_->pwrite(bits_, bits_offset_));
  QNBD_TRY(file_->flush());
  marked_count_.fetch_add(added, std::memory_order_relaxed);
  const std::uint64_t chunks = chunk_count(disk_size_, chunk_size_);
  for (std::uint64_t k = 0; k < chunks; ++k) {
    if ((static_cast<unsigned>(bits_[k / 8]) >> (k % 8)) & 1) done_[k / 64].fetch_or(1ull << (k % 64));
  }
  return ok();
}

Result<void> IntentRecord::mark(std::uint64_t offset, std::uint64_t length) {
  if (length == 0 || offset >= disk_size_) return ok();
  if (test_skip_mark.load(std::memory_order_relaxed)) return ok();
  const std::uint64_t first = offset >> chunk_shift_;
  const std::uint64_t last = (std::min(offset + length, disk_size_) - 1) >> chunk_shift_;
  auto published = [&](std::uint64_t k) { return (done_[k / 64].load(std::memory_order_acquire) >> (k % 64)) & 1; };
  // Steady state: every chunk already durable, no lock, no I/O.
  std::uint64_t k = first;
  while (k <= last && published(k)) ++k;
  if (k > last) return ok();

  std::lock_guard lock(mutex_);
  std::uint64_t lo = UINT64_MAX, hi = 0, added = 0;
  for (; k <= last; ++k) {
    std::byte& b = bits_[k / 8];
    const std::byte bit{static_cast<std::uint8_t>(1u << (k % 8))};
    if ((b & bit) != std::byte{0}) continue;  // written (and synced) by another caller meanwhile
    b |= bit;
    lo = std::min(lo, k / 8);
    hi = k / 8 + 1;
    ++added;
  }
  if (added) {
    // Whole sectors, so a torn write can only leave a sector old or new:
    // both keep every bit synced before.
    const std::uint64_t a = align_down(lo, kSector), e = std::min<std::uint64_t>(align_up(hi, kSector), bits_.size());
    auto part = std::span<const std::byte>(bits_).subspan(static_cast<std::size_t>(a), static_cast<std::size_t>(e - a));
    auto w = file_->pwrite(part, bits_offset_ + a);
    if (w && !test_drop_sync.load(std::memory_order_relaxed)) w = file_->flush();
    if (!w) {
      // Not known durable: forget the bits so the next caller writes them again.
      for (std::uint64_t j = first; j <= last; ++j) {
        if (!published(j)) bits_[j / 8] &= ~std::byte{static_cast<std::uint8_t>(1u << (j % 8))};
      }
      return make_error(w.error().code, "write-intent record: {}", w.error().message);
    }
    marked_count_.fetch_add(added, std::memory_order_relaxed);
  }
  // Durable now: publish, so later writes of these chunks skip the lock.
  for (std::uint64_t j = first; j <= last; ++j) done_[j / 64].fetch_or(1ull << (j % 64), std::memory_order_release);
  return ok();
}

Result<bool> intent_bit_set(File& file) {
  std::byte raw[8];
  if (QNBD_TRY(file.pread(raw, kAutoclearFeaturesOffset)) != sizeof raw) return false;
  return (load_be64(raw) & AUTOCLEAR_QNBD_INTENT) != 0;
}

Result<void> clear_intent_bit(File& file) {
  std::byte raw[8];
  QNBD_TRY(file.read_exact(raw, kAutoclearFeaturesOffset, "header"));
  store_be64(raw, load_be64(raw) & ~AUTOCLEAR_QNBD_INTENT);
  QNBD_TRY(file.pwrite(raw, kAutoclearFeaturesOffset));
  return file.flush();
}

}  // namespace qnbd::image::qcow2
