// qcow2 on-disk constants: magic numbers, feature bits, entry masks and the
// limits enforced on untrusted images. Names follow qemu/qemu
// docs/interop/qcow2.txt (sections cited by heading) and QEMU's block/qcow2.h.
#pragma once

#include <cstdint>

namespace qnbd::image::qcow2 {

inline constexpr std::uint32_t QCOW2_MAGIC = 0x514649fb;  // "QFI\xfb"

// qcow2.txt "Header": header sizes.
inline constexpr std::uint32_t V2_HEADER_LENGTH = 72;
inline constexpr std::uint32_t V3_MIN_HEADER_LENGTH = 104;
inline constexpr std::uint32_t V3_HEADER_LENGTH = 112;  // with compression_type + padding

// qcow2.txt "Header", incompatible_features.
inline constexpr std::uint64_t INCOMPAT_DIRTY = 1ull << 0;
inline constexpr std::uint64_t INCOMPAT_CORRUPT = 1ull << 1;
inline constexpr std::uint64_t INCOMPAT_DATA_FILE = 1ull << 2;
inline constexpr std::uint64_t INCOMPAT_COMPRESSION = 1ull << 3;
inline constexpr std::uint64_t INCOMPAT_EXTL2 = 1ull << 4;
inline constexpr std::uint64_t INCOMPAT_MASK = 0x1f;
// qcow2.txt "Header", compatible_features.
inline constexpr std::uint64_t COMPAT_LAZY_REFCOUNTS = 1ull << 0;
// qcow2.txt "Header", autoclear_features.
inline constexpr std::uint64_t AUTOCLEAR_BITMAPS = 1ull << 0;
inline constexpr std::uint64_t AUTOCLEAR_DATA_FILE_RAW = 1ull << 1;
inline constexpr std::uint64_t AUTOCLEAR_MASK = 0x3;
// Byte offsets of the v3 feature words in the header (qcow2.txt "Header").
inline constexpr std::uint64_t kIncompatibleFeaturesOffset = 72;
inline constexpr std::uint64_t kAutoclearFeaturesOffset = 88;

// qcow2.txt "Header extensions": extension types.
inline constexpr std::uint32_t EXT_END = 0x00000000;
inline constexpr std::uint32_t EXT_BACKING_FORMAT = 0xe2792aca;
inline constexpr std::uint32_t EXT_FEATURE_TABLE = 0x6803f857;
inline constexpr std::uint32_t EXT_BITMAPS = 0x23852875;
inline constexpr std::uint32_t EXT_CRYPTO_HEADER = 0x0537be77;
inline constexpr std::uint32_t EXT_DATA_FILE = 0x44415441;

// qcow2.txt "Header", compression_type values.
inline constexpr std::uint8_t COMPRESSION_DEFLATE = 0;
inline constexpr std::uint8_t COMPRESSION_ZSTD = 1;

// qcow2.txt "Header", crypt_method values (see "Data encryption").
inline constexpr std::uint32_t CRYPT_NONE = 0;
inline constexpr std::uint32_t CRYPT_AES = 1;
inline constexpr std::uint32_t CRYPT_LUKS = 2;

// qcow2.txt "Host cluster management": refcount table entries.
inline constexpr std::uint64_t REFT_OFFSET_MASK = 0xfffffffffffffe00ull;
inline constexpr std::uint64_t REFT_RESERVED_MASK = 0x1ffull;

// qcow2.txt "Cluster mapping": L1 table entries.
inline constexpr std::uint64_t L1E_OFFSET_MASK = 0x00fffffffffffe00ull;
inline constexpr std::uint64_t L1E_RESERVED_MASK = 0x7f000000000001ffull;

// qcow2.txt "Cluster mapping": L2 table entries, standard cluster descriptor.
inline constexpr std::uint64_t QCOW_OFLAG_COPIED = 1ull << 63;
inline constexpr std::uint64_t QCOW_OFLAG_COMPRESSED = 1ull << 62;
inline constexpr std::uint64_t QCOW_OFLAG_ZERO = 1ull << 0;
inline constexpr std::uint64_t L2E_OFFSET_MASK = 0x00fffffffffffe00ull;
inline constexpr std::uint64_t L2E_STD_RESERVED_MASK = 0x3f000000000001feull;

// qcow2.txt "Extended L2 Entries": subcluster allocation bitmap.
inline constexpr unsigned SUBCLUSTERS_PER_CLUSTER = 32;
inline constexpr std::uint64_t QCOW_L2_BITMAP_ALL_ALLOC = 0x00000000ffffffffull;
inline constexpr std::uint64_t QCOW_L2_BITMAP_ALL_ZEROES = 0xffffffff00000000ull;

// qcow2.txt "Bitmap directory" entry flags and type, "Bitmap table" entries.
inline constexpr std::uint32_t BME_FLAG_IN_USE = 1u << 0;
inline constexpr std::uint32_t BME_FLAG_AUTO = 1u << 1;
inline constexpr std::uint32_t BME_RESERVED_FLAGS = 0xfffffffcu;
inline constexpr std::uint8_t BT_DIRTY_TRACKING_BITMAP = 1;
inline constexpr std::uint64_t BME_TABLE_ENTRY_OFFSET_MASK = 0x00fffffffffffe00ull;
inline constexpr std::uint64_t BME_TABLE_ENTRY_RESERVED_MASK = 0xff000000000001feull;
inline constexpr std::uint64_t BME_TABLE_ENTRY_FLAG_ALL_ONES = 1ull << 0;

// Limits enforced on open: QEMU's (block/qcow2.h, qcow2_do_open,
// qcow2_read_extensions, block/qcow2-bitmap.c), so images QEMU refuses are
// refused.
inline constexpr std::uint32_t MIN_CLUSTER_BITS = 9;
inline constexpr std::uint32_t MAX_CLUSTER_BITS = 21;
inline constexpr std::uint32_t MIN_EXTL2_CLUSTER_BITS = 14;
inline constexpr std::uint32_t MAX_REFCOUNT_ORDER = 6;
inline constexpr std::uint32_t MAX_BACKING_FILE_SIZE = 1023;
inline constexpr std::uint64_t MAX_REFTABLE_BYTES = 8ull << 20;
inline constexpr std::uint64_t MAX_L1_BYTES = 32ull << 20;
inline constexpr std::uint32_t MAX_SNAPSHOTS = 65536;
inline constexpr std::uint64_t MAX_SNAPSHOT_EXTRA_DATA = 1024;
inline constexpr std::uint64_t MAX_SNAPSHOTS_TABLE_BYTES = 1024ull * 65536;
inline constexpr std::uint32_t MAX_BITMAPS = 65535;
inline constexpr std::uint64_t MAX_BITMAP_DIRECTORY_SIZE = 1024ull * 65535;
inline constexpr std::uint32_t MAX_BITMAP_TABLE_SIZE = 0x8000000;
inline constexpr std::uint64_t MAX_BITMAP_DATA_BYTES = 0x20000000;
inline constexpr std::uint32_t MIN_GRANULARITY_BITS = 9;
inline constexpr std::uint32_t MAX_GRANULARITY_BITS = 31;
inline constexpr std::uint32_t MAX_BITMAP_NAME_SIZE = 1023;
inline constexpr std::uint32_t MAX_BACKING_FORMAT_LENGTH = 15;

}  // namespace qnbd::image::qcow2
