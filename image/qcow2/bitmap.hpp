// Persistent bitmap directory (qcow2.txt "Bitmaps"): parsed and validated in
// full at open ("Bitmap directory", "Bitmap table", and the limits of QEMU's
// block/qcow2-bitmap.c), including every bitmap table entry. Serving bitmap
// contents comes later.
#pragma once

#include <vector>

#include "common/result.hpp"
#include "image/info.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/header.hpp"

namespace qnbd::image::qcow2 {

// Empty if the image has no (consistent) bitmaps extension.
[[nodiscard]] Result<std::vector<BitmapInfo>> read_bitmap_directory(File& file, const Header& header,
                                                                    std::uint64_t file_size);

}  // namespace qnbd::image::qcow2
