// Point-in-time views of a writable device (docs/backup-views.md): the
// guest content as it was at a checkpoint, readable while the guest keeps
// writing, by copy-before-write.
//
// CbwDevice decorates the export's device. Every write, write_zeroes and
// discard passes its write gate (the one a checkpoint shuts, see
// image/checkpoint.hpp) and, while a view is attached, first has each live
// view save the granules it is about to change and that the view still
// shares with the image. With no view the cost is one relaxed atomic load.
//
// PointInTimeView is the read-only device behind the export EXPORT@NAME.
// It owns a scratch file (O_TMPFILE, or a named file unlinked at once, so
// a crash leaves nothing; see remove_stale_scratch) and a table of what it
// has saved per granule: still shared with the image, being copied, saved
// at a slot of the scratch file, or wholly zero at the checkpoint (no copy
// needed). A view whose scratch would pass its cap, or whose copy fails,
// becomes failed: its readers get EIO, the writer goes on.
//
// Correctness (the argument in full is in docs/backup-views.md): a view is
// attached while the decorator's gate is shut and drained, so every write
// is wholly before it (its data is the checkpoint's content) or wholly
// after it (it saves before it writes). A writer marks a granule
// "copying" under the view's mutex before reading the old content, and
// writes the image only once the granule is saved; a reader reads the
// image first and then looks the granule up: if it is still shared, no
// write to it had begun when the reader looked, so what was read is the
// checkpoint's content; otherwise the saved copy (or zeroes) is used.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/block_device.hpp"
#include "image/write_gate.hpp"

namespace qnbd::image {

struct ViewOptions {
  std::string scratch_dir;            // "" = the image's directory
  std::uint64_t scratch_max = 0;      // bytes; 0 = the device size (a view never needs more)
  std::uint64_t granule = 64 * 1024;  // copy unit, a power of two, 4 KiB..1 MiB
  bool use_tmpfile = true;            // false: a named file, unlinked at once (the fallback)
};

// A view as the control socket's status shows it.
struct ViewState {
  std::string checkpoint;
  std::string state;                // "live", "failed" or "ended"
  std::string error;                // why it failed
  std::uint64_t scratch_bytes = 0;  // used in the scratch file
  std::uint64_t scratch_max = 0;
  std::uint64_t granule = 0;
  std::uint64_t saved_granules = 0;  // copied into the scratch file
  std::uint64_t zero_granules = 0;   // recorded as zeroes, nothing copied
};

class PointInTimeView final : public BlockDevice {
 public:
  // Opens the scratch file; the view shares everything with `image` until
  // it is attached (CbwDevice::attach) and writes begin.
  [[nodiscard]] static Result<std::shared_ptr<PointInTimeView>> create(std::shared_ptr<BlockDevice> image,
                                                                       std::string checkpoint,
                                                                       const std::string& image_path,
                                                                       const ViewOptions& options);
  ~PointInTimeView() override;

  const std::string& checkpoint() const { return checkpoint_; }
  ViewState state() const;
  bool live() const { return state_.load(std::memory_order_acquire) == kLive; }
  // Stop serving: readers get EIO from now on, the scratch file is closed
  // (its space freed). Idempotent.
  void end();
  // Writer side: save every granule of [offset, offset + length) that this
  // view still shares with the image, before the image is changed there.
  // Never fails the writer: a view that cannot save becomes failed.
  void save_before_write(std::uint64_t offset, std::uint64_t length) noexcept;

  // ---- BlockDevice (read-only) ----
  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  const char* format() const override { return image_->format(); }
  Result<void> read(std::span<std::byte> buf, std::uint64_t offset) override;
  Result<void> write(std::span<const std::byte>, std::uint64_t, bool) override;
  Result<void> write_zeroes(std::uint64_t, std::uint64_t, ZeroFlags) override;
  Result<void> discard(std::uint64_t, std::uint64_t, DiscardFlags) override;
  Result<void> flush() override { return ok(); }
  Result<std::size_t> block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) override;
  // The image's disabled bitmaps, frozen at the checkpoint (--disable PREV).
  Result<std::size_t> export_bitmap(const std::string& name) override { return image_->export_bitmap(name); }
  Result<std::size_t> bitmap_status(std::size_t handle, std::uint64_t offset, std::uint64_t length,
                                    std::span<BitmapExtent> out) override {
    return image_->bitmap_status(handle, offset, length, out);
  }
  Result<void> close() override {
    end();
    return ok();
  }

  // Block status looks at no more than this at once (the reply may cover
  // less than asked: NBD proto.md "NBD_CMD_BLOCK_STATUS").
  static constexpr std::uint64_t kStatusWindow = 1ull << 30;
  // A write saves at most this many granules (and 1 MiB) per step.
  static constexpr std::uint64_t kCopyBatch = 16;

 private:
  enum : int { kLive = 0, kFailed = 1, kEnded = 2 };
  // One granule's entry: kind in bits 0-1, allocated in bit 2, the
  // qemu:allocation-depth in bits 8-15, the scratch slot from bit 16.
  enum Kind : std::uint64_t { kShared = 0, kCopying = 1, kZero = 2, kSaved = 3 };
  static Kind kind(std::uint64_t e) { return static_cast<Kind>(e & 3); }
  static constexpr std::uint64_t kChunk = 4096;  // granules per lazily allocated table chunk

  PointInTimeView(std::shared_ptr<BlockDevice> image, std::string checkpoint, const ViewOptions& o, int fd);
  std::uint64_t get_locked(std::uint64_t g) const;
  void set_locked(std::uint64_t g, std::uint64_t e);
  void fail_locked(std::string why);
  void fail(std::string why);
  Error dead_error() const;  // the EIO a reader gets once the view is not live (mu_ held)
  // Copy granules [a, b), marked copying by this thread, into the scratch.
  void copy_run(std::uint64_t a, std::uint64_t b);

  std::shared_ptr<BlockDevice> image_;
  const std::string checkpoint_;
  const std::uint64_t size_;
  const std::uint64_t granule_;
  const unsigned granule_bits_;
  const std::uint64_t scratch_max_;
  const std::uint64_t batch_;  // granules per copy step

  std::atomic<int> state_{kLive};
  mutable std::mutex mu_;       // table_, used_, counts, error_
  std::condition_variable cv_;  // a granule left the copying state, or the view stopped
  std::vector<std::unique_ptr<std::uint64_t[]>> table_;
  std::uint64_t used_ = 0;
  std::uint64_t saved_ = 0, zeroes_ = 0;
  std::string error_;
  // The scratch file: I/O holds it shared; end() closes it exclusively.
  mutable std::shared_mutex fd_mu_;
  int fd_ = -1;
};

class CbwDevice final : public BlockDevice {
 public:
  // `image_path` names the image (the default scratch directory and the
  // stale scratch files' names).
  CbwDevice(std::shared_ptr<BlockDevice> inner, std::string image_path, ViewOptions options);
  ~CbwDevice() override;

  const ViewOptions& view_options() const { return options_; }
  BlockDevice& inner() const { return *inner_; }
  // Views one export may have at once, failed ones included until their
  // view-end: every write copies for each live one, and each holds a
  // scratch file, an export and its granule table.
  static constexpr std::size_t kMaxViews = 16;
  // A new view, not attached yet (opens its scratch file; writes go on).
  // EBUSY when kMaxViews are attached.
  [[nodiscard]] Result<std::shared_ptr<PointInTimeView>> prepare_view(const std::string& checkpoint);
  // Attach a prepared view: call with write_gate() shut and drained (the
  // checkpoint's switch), so each write is wholly before or after.
  void attach(std::shared_ptr<PointInTimeView> v);
  // Detach and end the view of `checkpoint`; nullptr if there is none.
  std::shared_ptr<PointInTimeView> detach(const std::string& checkpoint);
  std::vector<std::shared_ptr<PointInTimeView>> views() const;

  // ---- BlockDevice: forwarded, writes save for the views first ----
  std::uint64_t size() const override { return inner_->size(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  const char* format() const override { return inner_->format(); }
  Result<void> read(std::span<std::byte> buf, std::uint64_t offset) override { return inner_->read(buf, offset); }
  Result<void> write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) override;
  Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  Result<void> discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) override;
  Result<void> flush() override { return inner_->flush(); }
  Result<std::size_t> block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) override {
    return inner_->block_status(offset, length, out);
  }
  Result<LayerStatus> layer_status(std::uint64_t offset, std::uint64_t max_length) override {
    return inner_->layer_status(offset, max_length);
  }
  BlockDevice* backing() const override { return inner_->backing(); }
  ImageInfo info() const override { return inner_->info(); }
  Result<std::size_t> export_bitmap(const std::string& name) override { return inner_->export_bitmap(name); }
  Result<void> start_tracking() override { return inner_->start_tracking(); }
  Result<std::size_t> bitmap_status(std::size_t handle, std::uint64_t offset, std::uint64_t length,
                                    std::span<BitmapExtent> out) override {
    return inner_->bitmap_status(handle, offset, length, out);
  }
  Result<std::vector<BitmapState>> bitmap_states() override { return inner_->bitmap_states(); }
  Result<std::unique_ptr<BitmapTransaction>> begin_bitmap_edit(const std::vector<LiveBitmapOp>& ops) override {
    return inner_->begin_bitmap_edit(ops);
  }
  // This decorator's gate: every write passes it around both the saving
  // and the inner write, so a checkpoint that shuts it sees no write of
  // the inner device in flight either.
  WriteGate* write_gate() override { return &gate_; }
  Result<void> close() override;

 private:
  using ViewList = std::vector<std::shared_ptr<PointInTimeView>>;
  void save_for_views(std::uint64_t offset, std::uint64_t length);

  std::shared_ptr<BlockDevice> inner_;
  const std::string image_path_;
  const ViewOptions options_;
  WriteGate gate_;
  // Written under the gate's switch or views_mu_; the writers' fast path
  // reads nviews_ only (relaxed: the gate's mutex orders an attach before
  // every write that enters after it).
  std::atomic<std::size_t> nviews_{0};
  mutable std::mutex views_mu_;
  std::shared_ptr<const ViewList> views_ = std::make_shared<const ViewList>();
};

// Scratch files of a server that died between creating and unlinking one
// (only where O_TMPFILE is refused): IMAGE_BASENAME.qnbd-view-DEV-INO-XXXXXX.scratch
// in `dir`, for the image at `image_path`. Removes them; returns how many.
// Call only while holding the image's write lock (no live server of it).
std::size_t remove_stale_scratch(const std::string& image_path, const std::string& dir);

}  // namespace qnbd::image
