#include "image/qcow2/bitmap.hpp"

#include <set>

#include "common/checked.hpp"
#include "common/endian.hpp"

namespace qnbd::image::qcow2 {
namespace {

// Every entry of one bitmap table (qcow2.txt "Bitmap table"; QEMU's check_table_entry).
Result<void> check_bitmap_table(File& file, const Header& h, const BitmapInfo& b, std::uint64_t file_size) {
  const std::uint64_t cluster_size = h.cluster_size();
  const std::uint64_t bytes = std::uint64_t{b.table_size} * 8;
  if (!range_within(b.table_offset, bytes, file_size)) {
    return make_error(EINVAL, "bitmap '{}': bitmap table runs past the end of the file", b.name);
  }
  std::vector<std::byte> chunk(std::min<std::uint64_t>(bytes, 64 * 1024));
  for (std::uint64_t done = 0; done < bytes;) {
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), bytes - done));
    QNBD_TRY(file.read_exact(std::span(chunk.data(), n), b.table_offset + done, "bitmap table"));
    for (std::size_t i = 0; i < n; i += 8) {
      std::uint64_t e = load_be64(chunk.data() + i);
      std::uint64_t off = e & BME_TABLE_ENTRY_OFFSET_MASK;
      if ((e & BME_TABLE_ENTRY_RESERVED_MASK) ||
          (off != 0 && ((e & BME_TABLE_ENTRY_FLAG_ALL_ONES) || !is_aligned(off, cluster_size))) ||
          (off != 0 && !range_within(off, cluster_size, file_size))) {
        return make_error(EINVAL, "bitmap '{}': invalid bitmap table entry {:#018x}", b.name, e);
      }
    }
    done += n;
  }
  return ok();
}

}  // namespace

Result<std::vector<BitmapInfo>> read_bitmap_directory(File& file, const Header& h, std::uint64_t file_size) {
  std::vector<BitmapInfo> out;
  if (!h.bitmaps) return out;
  const BitmapsExtension& ext = *h.bitmaps;
  const std::uint64_t cluster_size = h.cluster_size();
  if (!range_within(ext.bitmap_directory_offset, ext.bitmap_directory_size, file_size)) {
    return make_error(EINVAL, "bitmap directory at {:#x} ({} bytes) runs past the end of the file",
                      ext.bitmap_directory_offset, ext.bitmap_directory_size);
  }
  std::vector<std::byte> dir(static_cast<std::size_t>(ext.bitmap_directory_size));
  QNBD_TRY(file.read_exact(dir, ext.bitmap_directory_offset, "bitmap directory"));

  std::set<std::string> names;
  std::uint64_t pos = 0;
  for (std::uint32_t i = 0; i < ext.nb_bitmaps; ++i) {
    if (pos + 24 > dir.size()) {
      return make_error(EINVAL, "bitmap directory holds fewer entries than nb_bitmaps ({})", ext.nb_bitmaps);
    }
    const std::byte* p = dir.data() + pos;
    BitmapInfo b;
    b.table_offset = load_be64(p);
    b.table_size = load_be32(p + 8);
    std::uint32_t flags = load_be32(p + 12);
    std::uint8_t type = static_cast<std::uint8_t>(p[16]);
    std::uint8_t granularity_bits = static_cast<std::uint8_t>(p[17]);
    std::uint16_t name_size = load_be16(p + 18);
    std::uint32_t extra = load_be32(p + 20);
    std::uint64_t entry_len = align_up(24ull + extra + name_size, 8);
    if (pos + entry_len > dir.size()) {
      return make_error(EINVAL, "bitmap directory entry {} runs past the directory end", i);
    }
    b.name.assign(reinterpret_cast<const char*>(p + 24 + extra), name_size);
    b.granularity = granularity_bits < 64 ? 1ull << granularity_bits : 0;
    b.in_use = flags & BME_FLAG_IN_USE;
    b.auto_enabled = flags & BME_FLAG_AUTO;
    // As QEMU's check_dir_entry (block/qcow2-bitmap.c).
    if (name_size == 0 || name_size > MAX_BITMAP_NAME_SIZE) {
      return make_error(EINVAL, "bitmap directory entry {}: invalid name size {}", i, name_size);
    }
    auto bad = [&](const char* why) { return make_error(EINVAL, "bitmap '{}': {}", b.name, why); };
    if (extra != 0) return bad("bitmap extra data is not supported");
    if (type != BT_DIRTY_TRACKING_BITMAP) return bad("unknown bitmap type");
    if (flags & BME_RESERVED_FLAGS) return bad("reserved flags are set");
    if (granularity_bits < MIN_GRANULARITY_BITS || granularity_bits > MAX_GRANULARITY_BITS) {
      return bad("granularity out of range (must be 512 B .. 2 GiB)");
    }
    if (b.table_offset == 0 || !is_aligned(b.table_offset, cluster_size)) return bad("bitmap table offset is invalid");
    if (b.table_size == 0 || b.table_size > MAX_BITMAP_TABLE_SIZE) return bad("bitmap table size is invalid");
    if (std::uint64_t{b.table_size} * cluster_size > MAX_BITMAP_DATA_BYTES) return bad("bitmap is too large");
    for (std::uint64_t k = 24 + extra + name_size; k < entry_len; ++k) {
      if (p[k] != std::byte{0}) return bad("directory entry padding is not zero");
    }
    if (!b.in_use) {
      // The table must cover the disk exactly (QEMU's load_bitmap_data).
      std::uint64_t bits = div_round_up(h.size, b.granularity);
      std::uint64_t need = div_round_up(div_round_up(bits, 8), cluster_size);
      if (need != b.table_size) return bad("bitmap table size does not match the disk size");
    }
    if (!names.insert(b.name).second) return bad("duplicate bitmap name");
    QNBD_TRY(check_bitmap_table(file, h, b, file_size));
    out.push_back(std::move(b));
    pos += entry_len;
  }
  if (pos != dir.size()) {
    return make_error(EINVAL, "bitmap directory size {} does not match its {} entries ({} bytes)", dir.size(),
                      ext.nb_bitmaps, pos);
  }
  return out;
}

}  // namespace qnbd::image::qcow2
