#include "image/qcow2/bitmap_edit.hpp"

#include <algorithm>
#include <memory>
#include <optional>

#include "common/checked.hpp"
#include "image/qcow2/bitmap.hpp"
#include "image/qcow2/bitmap_store.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/refcount.hpp"

namespace qnbd::image::qcow2 {
namespace {

struct Work {
  BitmapInfo info;
  std::unique_ptr<DirtyBitmap> data;  // loaded (or new) contents
  bool modified = false;              // data must be written
};

Error not_found(const std::string& name) { return make_error(ENOENT, "Dirty bitmap '{}' not found", name); }
Error inconsistent(const std::string& name) {
  return make_error(EINVAL, "Bitmap '{}' is inconsistent and cannot be used", name);
}

}  // namespace

const char* bitmap_op_name(BitmapOp::Kind kind) {
  switch (kind) {
    case BitmapOp::Kind::add: return "add";
    case BitmapOp::Kind::remove: return "remove";
    case BitmapOp::Kind::clear: return "clear";
    case BitmapOp::Kind::enable: return "enable";
    case BitmapOp::Kind::disable: return "disable";
    case BitmapOp::Kind::merge: return "merge";
  }
  return "?";
}

Error op_failed(BitmapOp::Kind kind, const std::string& name, const Error& reason) {
  return make_error(reason.code, "Operation {} on bitmap {} failed: {}", bitmap_op_name(kind), name, reason.message);
}

Result<void> check_bitmap_op(std::vector<BitmapInfo>& dir, const std::string& name, const BitmapOp& op,
                             std::uint64_t granularity, bool add_disabled, const BitmapLimits& limits,
                             bool external_source) {
  auto find = [&](const std::string& n) {
    return std::find_if(dir.begin(), dir.end(), [&](const BitmapInfo& b) { return b.name == n; });
  };
  auto w = find(name);
  if (op.kind == BitmapOp::Kind::add) {
    if (w != dir.end()) return make_error(EEXIST, "Bitmap already exists: {}", name);
    if (limits.version < 3) return make_error(ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files");
    const std::uint64_t g = granularity ? granularity : std::clamp<std::uint64_t>(limits.cluster_size, 4096, 65536);
    if (!is_power_of_2(g) || g < (1ull << MIN_GRANULARITY_BITS) || g > (1ull << MAX_GRANULARITY_BITS)) {
      return make_error(EINVAL, "Granularity must be power of 2 and at least 512");
    }
    if (name.empty() || name.size() > MAX_BITMAP_NAME_SIZE)
      return make_error(EINVAL, "Bitmap name is too long or empty");
    if (dir.size() >= MAX_BITMAPS) return make_error(EFBIG, "Too many bitmaps");
    const std::uint64_t data_bytes = div_round_up(div_round_up(limits.disk_size, g), 8);
    if (div_round_up(data_bytes, limits.cluster_size) * limits.cluster_size > MAX_BITMAP_DATA_BYTES) {
      return make_error(EFBIG, "Too large bitmap for this image (granularity {})", g);
    }
    BitmapInfo n;
    n.name = name;
    n.granularity = g;
    n.auto_enabled = !add_disabled;
    dir.push_back(std::move(n));
    return ok();
  }
  if (w == dir.end()) return not_found(name);
  switch (op.kind) {
    case BitmapOp::Kind::remove: dir.erase(w); return ok();
    case BitmapOp::Kind::enable:
    case BitmapOp::Kind::disable:
      if (w->in_use) return inconsistent(name);
      w->auto_enabled = op.kind == BitmapOp::Kind::enable;
      return ok();
    case BitmapOp::Kind::merge:
      if (w->in_use) return inconsistent(name);
      if (!external_source) {
        auto s = find(op.source);
        if (s == dir.end()) return not_found(op.source);
        if (s->in_use) return inconsistent(op.source);
      }
      return ok();
    default:  // clear
      if (w->in_use) return inconsistent(name);
      return ok();
  }
}

Result<DirtyBitmap> load_named_bitmap(File& file, const std::string& name) {
  const std::uint64_t file_size = QNBD_TRY(file.size());
  Header h = QNBD_TRY(read_header(file, file_size));
  std::vector<BitmapInfo> dir = QNBD_TRY(read_bitmap_directory(file, h, file_size));
  for (const BitmapInfo& b : dir) {
    if (b.name != name) continue;
    if (b.in_use) return inconsistent(name);
    return load_bitmap_data(file, h.cluster_size(), h.size, b, file_size);
  }
  return not_found(name);
}

Result<void> edit_bitmaps(File& file, const BitmapEdit& edit) {
  const std::uint64_t file_size = QNBD_TRY(file.size());
  Header h = QNBD_TRY(read_header(file, file_size));
  if (h.corrupt()) return make_error(EROFS, "image is corrupt; it can only be opened read-only");
  if (h.dirty()) {
    // Refcounts may be stale (lazy refcounts after a crash): allocating
    // from them could hand out used clusters.
    return make_error(EINVAL,
                      "image has the dirty bit set (refcounts may be stale); repair it with qnbd check -r first");
  }
  const std::vector<BitmapInfo> old_dir = QNBD_TRY(read_bitmap_directory(file, h, file_size));
  std::vector<Work> work;
  for (const BitmapInfo& b : old_dir) work.push_back(Work{b, nullptr, false});

  auto find = [&](const std::string& name) -> Work* {
    for (Work& w : work) {
      if (w.info.name == name) return &w;
    }
    return nullptr;
  };
  // The contents of a consistent bitmap, loaded once.
  auto contents = [&](Work& w) -> Result<DirtyBitmap*> {
    if (w.info.in_use) return inconsistent(w.info.name);
    if (!w.data) {
      w.data =
          std::make_unique<DirtyBitmap>(QNBD_TRY(load_bitmap_data(file, h.cluster_size(), h.size, w.info, file_size)));
    }
    return w.data.get();
  };

  const std::string& name = edit.bitmap;
  const BitmapLimits limits{h.version, h.cluster_size(), h.size};
  std::vector<BitmapInfo> dir;
  for (const Work& w : work) dir.push_back(w.info);
  for (const BitmapOp& op : edit.ops) {
    auto apply = [&]() -> Result<void> {
      QNBD_TRY(check_bitmap_op(dir, name, op, edit.granularity, false, limits, bool(edit.external_source)));
      Work* w = find(name);
      switch (op.kind) {
        case BitmapOp::Kind::add: {
          Work n;
          n.info = dir.back();
          n.data = std::make_unique<DirtyBitmap>(QNBD_TRY(DirtyBitmap::create(h.size, n.info.granularity)));
          n.modified = true;
          work.push_back(std::move(n));
          return ok();
        }
        case BitmapOp::Kind::remove: work.erase(work.begin() + (w - work.data())); return ok();
        case BitmapOp::Kind::clear: {
          DirtyBitmap* d = QNBD_TRY(contents(*w));
          d->reset();
          w->modified = true;
          return ok();
        }
        case BitmapOp::Kind::enable:
        case BitmapOp::Kind::disable: w->info.auto_enabled = op.kind == BitmapOp::Kind::enable; return ok();
        case BitmapOp::Kind::merge: {
          DirtyBitmap* d = QNBD_TRY(contents(*w));
          if (edit.external_source) {
            DirtyBitmap src = QNBD_TRY(edit.external_source(op.source));
            QNBD_TRY(d->merge(src));
          } else {
            DirtyBitmap* src = QNBD_TRY(contents(*find(op.source)));
            QNBD_TRY(d->merge(*src));
          }
          w->modified = true;
          return ok();
        }
      }
      return ok();
    };
    if (auto r = apply(); !r) return op_failed(op.kind, name, r.error());
  }

  RefcountGeometry geometry{h.cluster_bits, h.refcount_order};
  Refcounts refcounts = QNBD_TRY(Refcounts::load(file, geometry, h.refcount_table_offset, h.refcount_table_clusters));
  std::vector<BitmapUpdate> updated;
  for (const Work& w : work) updated.push_back(BitmapUpdate{w.info, w.modified ? w.data.get() : nullptr});
  return rewrite_bitmap_directory(file, h, refcounts, old_dir, updated);
}

}  // namespace qnbd::image::qcow2
