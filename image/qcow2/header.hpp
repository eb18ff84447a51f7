// The qcow2 header (cluster 0): fixed fields, optional v3 fields and header
// extensions, decoded into plain data (qcow2.txt "Header",
// "Header extensions").
//
// parse_header() validates everything it can check from cluster 0 alone (the
// checks of QEMU's qcow2_do_open and qcow2_read_extensions); the driver checks
// what needs the file size or other tables.
// serialize_header() is its inverse, used by create and by every header
// rewrite, and keeps unknown fields and extensions so a writer preserves them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/qcow2/format.hpp"

namespace qnbd::image {
class File;
}

namespace qnbd::image::qcow2 {

struct BitmapsExtension {  // qcow2.txt "Bitmaps extension"
  std::uint32_t nb_bitmaps = 0;
  std::uint64_t bitmap_directory_size = 0;
  std::uint64_t bitmap_directory_offset = 0;
};

struct CryptoHeaderPointer {  // qcow2.txt "Full disk encryption header pointer"
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};

struct FeatureName {      // qcow2.txt "Feature name table"
  std::uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  std::uint8_t bit = 0;
  std::string name;
};

struct UnknownExtension {
  std::uint32_t type = 0;
  std::vector<std::byte> data;
};

struct Header {
  // qcow2.txt "Header" fixed fields, spec names.
  std::uint32_t version = 3;
  std::uint64_t backing_file_offset = 0;
  std::uint32_t backing_file_size = 0;
  std::uint32_t cluster_bits = 16;
  std::uint64_t size = 0;
  std::uint32_t crypt_method = 0;
  std::uint32_t l1_size = 0;
  std::uint64_t l1_table_offset = 0;
  std::uint64_t refcount_table_offset = 0;
  std::uint32_t refcount_table_clusters = 0;
  std::uint32_t nb_snapshots = 0;
  std::uint64_t snapshots_offset = 0;
  // v3 fields (v2: zero, refcount_order 4, header_length 72).
  std::uint64_t incompatible_features = 0;
  std::uint64_t compatible_features = 0;
  std::uint64_t autoclear_features = 0;
  std::uint32_t refcount_order = 4;
  std::uint32_t header_length = V3_HEADER_LENGTH;
  std::uint8_t compression_type = COMPRESSION_DEFLATE;
  // Bytes from offset 112 up to header_length, kept verbatim (qcow2.txt
  // "Additional fields").
  std::vector<std::byte> unknown_header_fields;

  // qcow2.txt "Header extensions".
  std::string backing_file;                 // from backing_file_offset/size
  std::string backing_format;               // EXT_BACKING_FORMAT
  std::string data_file;                    // EXT_DATA_FILE
  std::optional<BitmapsExtension> bitmaps;  // only if the extension is present
  std::optional<CryptoHeaderPointer> crypto_header;
  std::vector<FeatureName> feature_names;
  std::vector<UnknownExtension> unknown_extensions;  // in file order

  // Derived values.
  std::uint64_t cluster_size() const { return 1ull << cluster_bits; }
  std::uint32_t refcount_bits() const { return 1u << refcount_order; }
  bool extended_l2() const { return incompatible_features & INCOMPAT_EXTL2; }
  bool has_data_file() const { return incompatible_features & INCOMPAT_DATA_FILE; }
  bool data_file_raw() const { return autoclear_features & AUTOCLEAR_DATA_FILE_RAW; }
  bool lazy_refcounts() const { return compatible_features & COMPAT_LAZY_REFCOUNTS; }
  bool dirty() const { return incompatible_features & INCOMPAT_DIRTY; }
  bool corrupt() const { return incompatible_features & INCOMPAT_CORRUPT; }
  std::uint32_t l2_entry_size() const { return extended_l2() ? 16 : 8; }
  std::uint32_t l2_bits() const { return cluster_bits - (extended_l2() ? 4 : 3); }
  std::uint64_t l2_entries() const { return 1ull << l2_bits(); }
  // Name of a feature bit from the feature name table, or "" if absent.
  std::string feature_name(std::uint8_t type, std::uint8_t bit) const;
};

// Decode and validate cluster 0. `header_bytes` holds at least the first
// min(file size, 2 MiB) bytes of the file; `file_size` is the file's size.
// Errors name the defect in one line (without the file name).
[[nodiscard]] Result<Header> parse_header(std::span<const std::byte> header_bytes, std::uint64_t file_size);

// Read and parse the header of `file` (of `file_size` bytes): the same
// result as parse_header over the file's first min(file size, 2 MiB) bytes,
// but reading only the part of cluster 0 the parse looks at (the fixed
// header, header_length, the extensions up to their end marker, the backing
// file name): usually one 4 KiB read, where a 2 MiB cluster would cost 2 MiB.
[[nodiscard]] Result<Header> read_header(File& file, std::uint64_t file_size);

// Encode the header, extensions (feature table included if non-empty) and
// backing file name into one cluster-sized buffer, setting
// backing_file_offset/size and header_length as laid out. Fails with EFBIG
// if it does not fit in cluster 0.
[[nodiscard]] Result<std::vector<std::byte>> serialize_header(const Header& header);

}  // namespace qnbd::image::qcow2
