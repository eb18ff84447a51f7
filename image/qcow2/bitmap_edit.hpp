// Editing the persistent bitmaps of a qcow2 image at rest, as `qemu-img
// bitmap` does: add, remove, clear, enable, disable, merge, applied in the
// order given, then written with one crash-safe directory replacement
// (rewrite_bitmap_directory, as QEMU's update_ext_header_and_dir). Error
// messages use qemu-img's words.
//
// Thread-safety: none; the image must not be open elsewhere.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/bitmap/dirty_bitmap.hpp"
#include "image/info.hpp"
#include "image/io/file.hpp"

namespace qnbd::image::qcow2 {

struct BitmapOp {
  enum class Kind { add, remove, clear, enable, disable, merge };
  Kind kind = Kind::add;
  std::string source;  // merge: the source bitmap's name
};
const char* bitmap_op_name(BitmapOp::Kind kind);

struct BitmapEdit {
  std::string bitmap;             // the bitmap the operations apply to
  std::vector<BitmapOp> ops;      // in command-line order
  std::uint64_t granularity = 0;  // add: 0 = cluster size clamped to [4 KiB, 64 KiB]
  // merge: load the source bitmap from another image instead of this one.
  std::function<Result<DirtyBitmap>(const std::string& name)> external_source;
};

// The checks of one operation and its effect on the directory, shared by
// the at-rest edit (edit_bitmaps) and the live one (Qcow2Image's
// begin_bitmap_edit), so both refuse the same things in the same words.
// `dir` is the directory as the earlier operations left it; on success add
// appends the new entry (granularity resolved; auto unless `add_disabled`),
// remove erases, enable/disable set auto; clear and merge only check. The
// error is the bare reason; op_failed() adds qemu-img's prefix.
struct BitmapLimits {
  std::uint32_t version = 3;
  std::uint64_t cluster_size = 0;
  std::uint64_t disk_size = 0;
};
[[nodiscard]] Result<void> check_bitmap_op(std::vector<BitmapInfo>& dir, const std::string& name, const BitmapOp& op,
                                           std::uint64_t granularity, bool add_disabled, const BitmapLimits& limits,
                                           bool external_source);
// "Operation OP on bitmap NAME failed: REASON", keeping the errno.
Error op_failed(BitmapOp::Kind kind, const std::string& name, const Error& reason);

// Apply `edit` to the qcow2 image in `file` (opened read-write). Fails with
// "Operation OP on bitmap NAME failed: REASON" for a refused operation
// (nothing is written then), or with the I/O or format error.
[[nodiscard]] Result<void> edit_bitmaps(File& file, const BitmapEdit& edit);

// Load bitmap `name` of the qcow2 image in `file` (read-only use), refusing
// an in_use (inconsistent) one.
[[nodiscard]] Result<DirtyBitmap> load_named_bitmap(File& file, const std::string& name);

}  // namespace qnbd::image::qcow2
