// Copy-before-write and point-in-time views (see cbw.hpp and
// docs/backup-views.md).
#include "image/view/cbw.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "common/log.hpp"

namespace qnbd::image {
namespace {

std::string dir_of(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string base_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// The stale-file name's stem: the image's basename plus its device and
// inode, so images of the same name elsewhere sharing a scratch directory
// never claim each other's files.
Result<std::string> scratch_stem(const std::string& image_path) {
  struct stat st;
  if (::stat(image_path.c_str(), &st) != 0) return make_error(errno, "{}: {}", image_path, std::strerror(errno));
  return fmt::format("{}.qnbd-view-{:x}-{:x}-", base_of(image_path), static_cast<std::uint64_t>(st.st_dev),
                     static_cast<std::uint64_t>(st.st_ino));
}

constexpr std::string_view kScratchSuffix = ".scratch";

Result<int> open_scratch(const std::string& image_path, const ViewOptions& o) {
  const std::string dir = o.scratch_dir.empty() ? dir_of(image_path) : o.scratch_dir;
  if (o.use_tmpfile) {
    const int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0) return fd;
    // File systems without O_TMPFILE say EOPNOTSUPP (or EISDIR on old
    // kernels); anything else is a real error.
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
      return make_error(errno, "view scratch in {}: {}", dir, std::strerror(errno));
  }
  std::string name = dir + "/" + QNBD_TRY(scratch_stem(image_path)) + "XXXXXX" + std::string(kScratchSuffix);
  const int fd = ::mkostemps(name.data(), static_cast<int>(kScratchSuffix.size()), O_CLOEXEC);
  if (fd < 0) return make_error(errno, "view scratch in {}: {}", dir, std::strerror(errno));
  // Unlinked at once: the open descriptor keeps the space; a crash in the
  // window between the two calls is what remove_stale_scratch is for.
  ::unlink(name.c_str());
  return fd;
}

unsigned log2_of(std::uint64_t v) {
  unsigned b = 0;
  while ((1ull << b) < v) ++b;
  return b;
}

Result<void> pread_all(int fd, std::byte* p, std::size_t n, std::uint64_t off) {
  while (n) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return make_error(errno, "view scratch read: {}", std::strerror(errno));
    if (r == 0) return make_error(EIO, "view scratch read: short file");
    p += r;
    n -= static_cast<std::size_t>(r);
    off += static_cast<std::uint64_t>(r);
  }
  return ok();
}

Result<void> pwrite_all(int fd, const std::byte* p, std::size_t n, std::uint64_t off) {
  while (n) {
    const ssize_t r = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return make_error(errno, "view scratch write: {}", std::strerror(errno));
    p += r;
    n -= static_cast<std::size_t>(r);
    off += static_cast<std::uint64_t>(r);
  }
  return ok();
}

}  // namespace

// ---------------------------------------------------------------------------
// PointInTimeView

Result<std::shared_ptr<PointInTimeView>> PointInTimeView::create(std::shared_ptr<BlockDevice> image,
                                                                 std::string checkpoint, const std::string& image_path,
                                                                 const ViewOptions& options) {
  const std::uint64_t g = options.granule;
  if (g < 4096 || g > (1u << 20) || (g & (g - 1)))
    return make_error(EINVAL, "view granule {} is not a power of two from 4 KiB to 1 MiB", g);
  const int fd = QNBD_TRY(open_scratch(image_path, options));
  return std::shared_ptr<PointInTimeView>(new PointInTimeView(std::move(image), std::move(checkpoint), options, fd));
}

PointInTimeView::PointInTimeView(std::shared_ptr<BlockDevice> image, std::string checkpoint, const ViewOptions& o,
                                 int fd)
    : image_(std::move(image)), checkpoint_(std::move(checkpoint)), size_(image_->size()), granule_(o.granule),
      granule_bits_(log2_of(o.granule)), scratch_max_(o.scratch_max ? o.scratch_max : image_->size()),
      batch_(std::clamp<std::uint64_t>((1u << 20) >> granule_bits_, 1, kCopyBatch)), fd_(fd) {
  const std::uint64_t granules = (size_ + granule_ - 1) >> granule_bits_;
  table_.resize((granules + kChunk - 1) / kChunk);
}

PointInTimeView::~PointInTimeView() { end(); }

std::uint64_t PointInTimeView::get_locked(std::uint64_t g) const {
  const auto& c = table_[g / kChunk];
  return c ? c[g % kChunk] : 0;
}

void PointInTimeView::set_locked(std::uint64_t g, std::uint64_t e) {
  auto& c = table_[g / kChunk];
  if (!c) c = std::make_unique<std::uint64_t[]>(kChunk);  // zeroed: every granule shared
  c[g % kChunk] = e;
}

void PointInTimeView::fail_locked(std::string why) {
  if (state_.load(std::memory_order_relaxed) != kLive) return;
  error_ = std::move(why);
  state_.store(kFailed, std::memory_order_release);
  log::warn("view @{} failed: {}", checkpoint_, error_);
}

void PointInTimeView::fail(std::string why) {
  {
    std::lock_guard lk(mu_);
    fail_locked(std::move(why));
  }
  cv_.notify_all();
}

Error PointInTimeView::dead_error() const {
  if (state_.load(std::memory_order_acquire) == kEnded) return make_error(EIO, "view @{} has ended", checkpoint_);
  return make_error(EIO, "view @{} failed: {}", checkpoint_, error_);
}

void PointInTimeView::end() {
  {
    std::lock_guard lk(mu_);
    state_.store(kEnded, std::memory_order_release);
  }
  cv_.notify_all();
  std::unique_lock fl(fd_mu_);  // waits for scratch I/O in progress
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

ViewState PointInTimeView::state() const {
  std::lock_guard lk(mu_);
  ViewState s;
  s.checkpoint = checkpoint_;
  const int st = state_.load(std::memory_order_acquire);
  s.state = st == kLive ? "live" : st == kFailed ? "failed" : "ended";
  s.error = error_;
  s.scratch_bytes = used_;
  s.scratch_max = scratch_max_;
  s.granule = granule_;
  s.saved_granules = saved_;
  s.zero_granules = zeroes_;
  return s;
}

Capabilities PointInTimeView::capabilities() const {
  Capabilities c = image_->capabilities();
  c.writable = false;
  c.can_trim = c.can_write_zeroes = c.can_fast_zero = false;
  c.can_multi_conn = true;
  return c;
}

Result<void> PointInTimeView::write(std::span<const std::byte>, std::uint64_t, bool) {
  return make_error(EPERM, "view @{} is read-only", checkpoint_);
}
Result<void> PointInTimeView::write_zeroes(std::uint64_t, std::uint64_t, ZeroFlags) {
  return make_error(EPERM, "view @{} is read-only", checkpoint_);
}
Result<void> PointInTimeView::discard(std::uint64_t, std::uint64_t, DiscardFlags) {
  return make_error(EPERM, "view @{} is read-only", checkpoint_);
}

void PointInTimeView::save_before_write(std::uint64_t offset, std::uint64_t length) noexcept {
  if (length == 0 || offset >= size_ || state_.load(std::memory_order_acquire) != kLive) return;
  const std::uint64_t last = (std::min(size_, offset + length) - 1) >> granule_bits_;
  for (std::uint64_t g = offset >> granule_bits_; g <= last;) {
    const std::uint64_t gend = std::min(last + 1, g + batch_);
    std::array<bool, kCopyBatch> mine{};
    bool others = false;
    {
      std::lock_guard lk(mu_);
      if (state_.load(std::memory_order_relaxed) != kLive) return;
      for (std::uint64_t i = g; i < gend; ++i) {
        const std::uint64_t e = get_locked(i);
        if (kind(e) == kShared) {
          set_locked(i, kCopying);
          mine[i - g] = true;
        } else if (kind(e) == kCopying) {
          others = true;
        }
      }
    }
    // Copy this thread's runs; the image is not written there until the
    // copy is recorded (the caller writes after we return).
    for (std::uint64_t i = g; i < gend;) {
      if (!mine[i - g]) {
        ++i;
        continue;
      }
      std::uint64_t j = i;
      while (j < gend && mine[j - g]) ++j;
      copy_run(i, j);
      i = j;
    }
    if (others) {
      // Another writer is copying a granule this write changes: its old
      // content must be saved before this write may go on.
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] {
        if (state_.load(std::memory_order_relaxed) != kLive) return true;
        for (std::uint64_t i = g; i < gend; ++i)
          if (kind(get_locked(i)) == kCopying) return false;
        return true;
      });
      if (state_.load(std::memory_order_relaxed) != kLive) return;
    }
    g = gend;
  }
}

void PointInTimeView::copy_run(std::uint64_t a, std::uint64_t b) {
  const std::uint64_t start = a << granule_bits_;
  const std::uint64_t end = std::min(size_, b << granule_bits_);
  const std::size_t n = static_cast<std::size_t>(b - a);
  // What the granules were at the checkpoint: wholly zero ones need no
  // copy; the rest are remembered as data, with their allocation depth.
  std::array<bool, kCopyBatch> zero{}, alloc{};
  std::array<std::uint32_t, kCopyBatch> depth{};
  for (std::size_t k = 0; k < n; ++k) {
    zero[k] = true;
    depth[k] = ~0u;
  }
  {
    std::array<Extent, 32> ext;
    std::uint64_t pos = start;
    while (pos < end) {
      auto r = image_->block_status(pos, end - pos, ext);
      if (!r) return fail(fmt::format("block status of the image at {}: {}", pos, r.error().message));
      if (*r == 0) return fail(fmt::format("block status of the image at {}: no extent", pos));
      for (std::size_t i = 0; i < *r && pos < end; ++i) {
        const std::uint64_t e_end = std::min(end, pos + ext[i].length);
        for (std::uint64_t k = (pos - start) >> granule_bits_; k <= ((e_end - 1 - start) >> granule_bits_); ++k) {
          if (!ext[i].zero) zero[k] = false;
          if (ext[i].allocated) alloc[k] = true;
          depth[k] = depth[k] == ~0u || depth[k] == ext[i].depth ? ext[i].depth : 1;
        }
        pos = e_end;
      }
    }
  }
  std::size_t data = 0;
  for (std::size_t k = 0; k < n; ++k) data += !zero[k];
  std::uint64_t base = 0;
  if (data) {
    thread_local std::vector<std::byte> buf;
    buf.resize(static_cast<std::size_t>(batch_ << granule_bits_));
    if (auto r = image_->read(std::span(buf.data(), static_cast<std::size_t>(end - start)), start); !r)
      return fail(fmt::format("reading the image at {}: {}", start, r.error().message));
    // Compact the data granules, in order, into consecutive slots.
    std::size_t to = 0;
    for (std::size_t k = 0; k < n; ++k) {
      if (zero[k]) continue;
      if (to != k) std::memmove(buf.data() + (to << granule_bits_), buf.data() + (k << granule_bits_), granule_);
      ++to;
    }
    const std::uint64_t bytes = static_cast<std::uint64_t>(data) << granule_bits_;
    {
      std::lock_guard lk(mu_);
      if (state_.load(std::memory_order_relaxed) != kLive) return;
      if (used_ + bytes > scratch_max_) {
        fail_locked(
            fmt::format("scratch cap of {} bytes reached ({} used, {} more needed)", scratch_max_, used_, bytes));
        cv_.notify_all();
        return;
      }
      base = used_;
      used_ += bytes;
    }
    // The slot's tail past the end of a short last granule is whatever
    // the buffer held: never read back (reads stop at the device end).
    std::shared_lock fl(fd_mu_);
    if (fd_ < 0) return;  // ended meanwhile
    if (auto r = pwrite_all(fd_, buf.data(), static_cast<std::size_t>(bytes), base); !r) {
      fl.unlock();
      return fail(r.error().message);
    }
  }
  {
    std::lock_guard lk(mu_);
    if (state_.load(std::memory_order_relaxed) != kLive) return;
    std::uint64_t slot = base >> granule_bits_;
    for (std::size_t k = 0; k < n; ++k) {
      const std::uint64_t d = (depth[k] == ~0u ? 0 : std::min<std::uint32_t>(depth[k], 255)) << 8;
      const std::uint64_t al = alloc[k] ? 4 : 0;
      if (zero[k]) {
        set_locked(a + k, kZero | al | d);
        ++zeroes_;
      } else {
        set_locked(a + k, kSaved | 4 | d | (slot++ << 16));
        ++saved_;
      }
    }
  }
  cv_.notify_all();
}

Result<void> PointInTimeView::read(std::span<std::byte> buf, std::uint64_t offset) {
  if (offset > size_ || buf.size() > size_ - offset) return make_error(EINVAL, "read past the end of the view");
  if (!live()) {
    std::lock_guard lk(mu_);
    return dead_error();
  }
  // Optimistic: the image first, then what was saved meanwhile (cbw.hpp).
  QNBD_TRY(image_->read(buf, offset));
  std::uint64_t pos = offset;
  const std::uint64_t end = offset + buf.size();
  while (pos < end) {
    const std::uint64_t g = pos >> granule_bits_;
    const std::uint64_t gend = std::min(end, (g + 1) << granule_bits_);
    std::uint64_t e;
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return !live() || kind(get_locked(g)) != kCopying; });
      if (!live()) return dead_error();
      e = get_locked(g);
    }
    std::byte* p = buf.data() + (pos - offset);
    const std::size_t n = static_cast<std::size_t>(gend - pos);
    if (kind(e) == kZero) {
      std::memset(p, 0, n);
    } else if (kind(e) == kSaved) {
      std::shared_lock fl(fd_mu_);
      if (fd_ < 0) return make_error(EIO, "view @{} has ended", checkpoint_);
      QNBD_TRY(pread_all(fd_, p, n, ((e >> 16) << granule_bits_) + (pos - (g << granule_bits_))));
    }
    pos = gend;
  }
  return ok();
}

Result<std::size_t> PointInTimeView::block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) {
  if (offset >= size_ || out.empty() || length == 0) return make_error(EINVAL, "block status outside the view");
  length = std::min({length, size_ - offset, kStatusWindow});
  if (!live()) {
    std::lock_guard lk(mu_);
    return dead_error();
  }
  std::array<Extent, 64> in;
  const std::size_t m = QNBD_TRY(image_->block_status(offset, length, in));
  if (m == 0) return make_error(EIO, "block status of the image at {}: no extent", offset);
  std::uint64_t covered = 0;
  for (std::size_t i = 0; i < m; ++i) covered += in[i].length;
  const std::uint64_t end = offset + std::min(covered, length);
  std::unique_lock lk(mu_);
  const std::uint64_t g0 = offset >> granule_bits_, g1 = (end - 1) >> granule_bits_;
  cv_.wait(lk, [&] {
    if (!live()) return true;
    for (std::uint64_t g = g0; g <= g1; ++g)
      if (kind(get_locked(g)) == kCopying) return false;
    return true;
  });
  if (!live()) return dead_error();
  std::size_t count = 0;
  auto emit = [&](Extent x, std::uint64_t len) {
    x.length = len;
    return append_extent(out, count, x);
  };
  std::uint64_t pos = offset;
  std::size_t i = 0;
  std::uint64_t in_end = offset + in[0].length;
  while (pos < end) {
    while (pos >= in_end) in_end += in[++i].length;
    const std::uint64_t g = pos >> granule_bits_;
    const std::uint64_t gend = std::min(end, (g + 1) << granule_bits_);
    const std::uint64_t e = get_locked(g);
    std::uint64_t seg_end;
    Extent x;
    if (kind(e) == kShared) {
      x = in[i];
      seg_end = std::min(in_end, gend);
    } else {
      // What the granule was at the checkpoint (recorded when it was saved).
      x.allocated = (e & 4) != 0;
      x.zero = kind(e) == kZero;
      x.depth = static_cast<std::uint32_t>((e >> 8) & 0xff);
      seg_end = gend;
    }
    if (!emit(x, seg_end - pos)) break;
    pos = seg_end;
  }
  return count;
}

// ---------------------------------------------------------------------------
// CbwDevice

CbwDevice::CbwDevice(std::shared_ptr<BlockDevice> inner, std::string image_path, ViewOptions options)
    : inner_(std::move(inner)), image_path_(std::move(image_path)), options_(std::move(options)) {}

CbwDevice::~CbwDevice() {
  for (const auto& v : views()) v->end();
}

Result<std::shared_ptr<PointInTimeView>> CbwDevice::prepare_view(const std::string& checkpoint) {
  // The control socket serves one command at a time, so no other view is
  // attached between this count and the checkpoint's attach.
  if (const std::size_t n = nviews_.load(std::memory_order_relaxed); n >= kMaxViews) {
    return make_error(EBUSY, "the export has {} views, the most one may have: end one first (view-end)", n);
  }
  return PointInTimeView::create(inner_, checkpoint, image_path_, options_);
}

void CbwDevice::attach(std::shared_ptr<PointInTimeView> v) {
  std::lock_guard lk(views_mu_);
  auto next = std::make_shared<ViewList>(*views_);
  next->push_back(std::move(v));
  nviews_.store(next->size(), std::memory_order_relaxed);
  views_ = std::move(next);
}

std::shared_ptr<PointInTimeView> CbwDevice::detach(const std::string& checkpoint) {
  std::shared_ptr<PointInTimeView> found;
  {
    std::lock_guard lk(views_mu_);
    auto next = std::make_shared<ViewList>();
    for (const auto& v : *views_) {
      if (!found && v->checkpoint() == checkpoint)
        found = v;
      else
        next->push_back(v);
    }
    if (!found) return nullptr;
    nviews_.store(next->size(), std::memory_order_relaxed);
    views_ = std::move(next);
  }
  found->end();
  return found;
}

std::vector<std::shared_ptr<PointInTimeView>> CbwDevice::views() const {
  std::lock_guard lk(views_mu_);
  return *views_;
}

void CbwDevice::save_for_views(std::uint64_t offset, std::uint64_t length) {
  std::shared_ptr<const ViewList> list;
  {
    std::lock_guard lk(views_mu_);
    list = views_;
  }
  for (const auto& v : *list) v->save_before_write(offset, length);
}

Result<void> CbwDevice::write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) {
  const WriteGate::Pass pass = gate_.enter();  // held until the data is written
  if (nviews_.load(std::memory_order_relaxed)) save_for_views(offset, buf.size());
  return inner_->write(buf, offset, fua);
}

Result<void> CbwDevice::write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) {
  const WriteGate::Pass pass = gate_.enter();
  if (nviews_.load(std::memory_order_relaxed)) save_for_views(offset, length);
  return inner_->write_zeroes(offset, length, flags);
}

Result<void> CbwDevice::discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) {
  const WriteGate::Pass pass = gate_.enter();
  if (nviews_.load(std::memory_order_relaxed)) save_for_views(offset, length);
  return inner_->discard(offset, length, flags);
}

Result<void> CbwDevice::close() {
  // A stop of the server drops every view.
  for (const auto& v : views()) v->end();
  return inner_->close();
}

std::size_t remove_stale_scratch(const std::string& image_path, const std::string& dir_in) {
  const std::string dir = dir_in.empty() ? dir_of(image_path) : dir_in;
  auto stem = scratch_stem(image_path);
  if (!stem) return 0;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return 0;
  std::size_t removed = 0;
  while (const dirent* ent = ::readdir(d)) {
    const std::string_view name(ent->d_name);
    if (name.size() != stem->size() + 6 + kScratchSuffix.size() || !name.starts_with(*stem) ||
        !name.ends_with(kScratchSuffix))
      continue;
    const std::string path = dir + "/" + std::string(name);
    if (::unlink(path.c_str()) == 0) {
      log::info("removed stale view scratch file {}", path);
      ++removed;
    }
  }
  ::closedir(d);
  return removed;
}

}  // namespace qnbd::image
