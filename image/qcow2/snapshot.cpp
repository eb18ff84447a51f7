#include "image/qcow2/snapshot.hpp"

#include "common/checked.hpp"
#include "common/endian.hpp"

#include <algorithm>

namespace qnbd::image::qcow2 {

Result<std::vector<SnapshotInfo>> read_snapshot_table(File& file, const Header& h, std::uint64_t file_size,
                                                      std::uint64_t* table_bytes) {
  std::vector<SnapshotInfo> out;
  if (table_bytes) *table_bytes = 0;
  if (h.nb_snapshots == 0) return out;
  // Entries are read one by one (the table is at most 64 MiB, QEMU's
  // qcow2_read_snapshots limit, and must lie inside the file); nothing is
  // allocated beyond one entry.
  const std::uint64_t table_limit =
      std::min<std::uint64_t>(file_size - std::min(file_size, h.snapshots_offset), MAX_SNAPSHOTS_TABLE_BYTES);
  out.reserve(h.nb_snapshots);
  std::uint64_t pos = 0;
  std::vector<std::byte> entry;
  for (std::uint32_t i = 0; i < h.nb_snapshots; ++i) {
    pos = align_up(pos, 8);
    if (pos + 40 > table_limit) {
      return make_error(EINVAL, "snapshot table entry {} runs past the end of the file or the 64 MiB limit", i);
    }
    std::byte fixed[40];
    QNBD_TRY(file.read_exact(fixed, h.snapshots_offset + pos, "snapshot table entry"));
    const std::byte* p = fixed;
    SnapshotInfo s;
    s.l1_table_offset = load_be64(p);
    s.l1_size = load_be32(p + 8);
    std::uint16_t id_len = load_be16(p + 12);
    std::uint16_t name_len = load_be16(p + 14);
    s.date_sec = load_be32(p + 16);
    s.date_nsec = load_be32(p + 20);
    s.vm_clock_nsec = load_be64(p + 24);
    s.vm_state_size = load_be32(p + 32);
    std::uint32_t extra = load_be32(p + 36);
    if (extra > MAX_SNAPSHOT_EXTRA_DATA) {
      return make_error(EINVAL, "too much extra metadata in snapshot table entry {} ({} bytes)", i, extra);
    }
    std::uint64_t entry_len = 40ull + extra + id_len + name_len;
    if (pos + entry_len > table_limit) {
      return make_error(EINVAL, "snapshot table entry {} runs past the end of the file or the 64 MiB limit", i);
    }
    if (h.version >= 3 && extra < 16) {
      return make_error(EINVAL, "snapshot table entry {} has only {} bytes of extra data (version 3 needs 16)", i,
                        extra);
    }
    entry.resize(entry_len - 40);
    QNBD_TRY(file.read_exact(entry, h.snapshots_offset + pos + 40, "snapshot table entry"));
    const std::byte* x = entry.data();
    if (extra >= 8) s.vm_state_size = load_be64(x);
    if (extra >= 16) s.disk_size = load_be64(x + 8);
    if (extra >= 24) {
      std::uint64_t icount = load_be64(x + 16);
      if (icount != ~0ull) s.icount = icount;
    }
    const char* strings = reinterpret_cast<const char*>(x + extra);
    s.id.assign(strings, id_len);
    s.name.assign(strings + id_len, name_len);
    if (!is_aligned(s.l1_table_offset, h.cluster_size())) {
      return make_error(EINVAL, "snapshot '{}': L1 table offset {:#x} is not cluster-aligned", s.name,
                        s.l1_table_offset);
    }
    if (std::uint64_t{s.l1_size} * 8 > MAX_L1_BYTES) {
      return make_error(EINVAL, "snapshot '{}': L1 table is too large ({} entries)", s.name, s.l1_size);
    }
    out.push_back(std::move(s));
    pos += entry_len;
  }
  if (table_bytes) *table_bytes = pos;
  return out;
}

}  // namespace qnbd::image::qcow2
