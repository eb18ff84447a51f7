// ImageInfo: what `qnbd info` prints, gathered from an open image (plain
// data; no I/O). Field names follow qemu-img info's JSON keys.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qnbd::image {

// One persistent dirty bitmap of a qcow2 image (qcow2.txt "Bitmap directory"),
// as parsed and validated at open. Serving it comes later.
struct BitmapInfo {
  std::string name;
  std::uint64_t granularity = 0;   // bytes
  bool in_use = false;             // BME_FLAG_IN_USE: inconsistent unless opened by a writer
  bool auto_enabled = false;       // BME_FLAG_AUTO: enabled (recording)
  std::uint64_t table_offset = 0;  // bitmap_table_offset
  std::uint32_t table_size = 0;    // bitmap_table_size (entries)
};

// One internal snapshot (qcow2.txt "Snapshots", snapshot table entry).
struct SnapshotInfo {
  std::string id;
  std::string name;
  std::uint64_t l1_table_offset = 0;
  std::uint32_t l1_size = 0;
  std::uint32_t date_sec = 0;
  std::uint32_t date_nsec = 0;
  std::uint64_t vm_clock_nsec = 0;
  std::uint64_t vm_state_size = 0;
  std::optional<std::uint64_t> disk_size;  // extra data bytes 48-55
  std::optional<std::uint64_t> icount;     // extra data bytes 56-63 (absent or all ones -> nullopt)
};

struct ImageInfo {
  std::string format;    // "qcow2" or "raw"
  std::string filename;  // as given on open
  std::uint64_t virtual_size = 0;
  std::optional<std::uint64_t> actual_size;  // host bytes allocated
  bool dirty = false;                        // qcow2 dirty bit

  // qcow2 only.
  std::uint64_t cluster_size = 0;
  std::string compat;            // "0.10" (v2) or "1.1" (v3)
  std::string compression_type;  // "zlib" or "zstd" (QEMU's names)
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  bool corrupt = false;
  std::uint32_t refcount_bits = 0;
  std::string data_file;  // external data file name as stored (or configured)
  bool data_file_raw = false;
  std::string backing_filename;       // as stored in the image
  std::string full_backing_filename;  // resolved path actually opened
  std::string backing_format;         // from the extension (empty if absent)
  std::vector<BitmapInfo> bitmaps;
  bool has_bitmaps_extension = false;
  // The bitmaps' write-intent record (docs/crash-safe-bitmaps.md): "none",
  // "armed", "pending", "recovered", "stale" or "missing", and a line why.
  std::string intent_record;
  std::string intent_record_detail;
  std::vector<SnapshotInfo> snapshots;
};

}  // namespace qnbd::image
