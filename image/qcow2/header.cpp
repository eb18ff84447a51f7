// parse_header: decode and validate cluster 0 (qcow2.txt "Header",
// "Header extensions" and the extension sections), with the checks of QEMU's
// qcow2_do_open and qcow2_read_extensions.
#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/header.hpp"

namespace qnbd::image::qcow2 {
namespace {

constexpr std::uint64_t kInt64Max = static_cast<std::uint64_t>(INT64_MAX);

// Built-in names for the bits QEMU knows, used when the image has no
// feature name table entry for a bit (qcow2.txt "Header" feature bits,
// "Feature name table").
const char* builtin_feature_name(std::uint8_t type, std::uint8_t bit) {
  static const char* const incompat[] = {"dirty bit", "corrupt bit", "external data file", "compression type",
                                         "extended L2 entries"};
  static const char* const compat[] = {"lazy refcounts"};
  static const char* const autoclear[] = {"bitmaps", "raw external data"};
  switch (type) {
    case 0: return bit < 5 ? incompat[bit] : nullptr;
    case 1: return bit < 1 ? compat[bit] : nullptr;
    case 2: return bit < 2 ? autoclear[bit] : nullptr;
    default: return nullptr;
  }
}

std::string string_from(const std::byte* p, std::size_t n) { return std::string(reinterpret_cast<const char*>(p), n); }

// Name unknown incompatible bits, preferring the image's own feature table
// (a newer writer names bits we do not know).
std::string describe_unknown_incompat(const Header& h, std::uint64_t unknown) {
  std::string list;
  unsigned count = 0;
  for (unsigned bit = 0; bit < 64; ++bit) {
    if (!(unknown & (1ull << bit))) continue;
    if (count++) list += ", ";
    list += std::to_string(bit);
    std::string name = h.feature_name(0, static_cast<std::uint8_t>(bit));
    if (!name.empty()) list += fmt::format(" (\"{}\")", name);
  }
  return fmt::format("unknown incompatible feature bit{} {}", count > 1 ? "s" : "", list);
}

// Check one of the tables whose offset and size come straight from the
// header (QEMU's qcow2_validate_table, plus "inside the file").
Result<void> validate_table(const char* what, std::uint64_t offset, std::uint64_t entries, std::uint64_t entry_len,
                            std::uint64_t max_bytes, std::uint64_t cluster_size, std::uint64_t file_size) {
  auto bytes = checked_mul(entries, entry_len);
  if (!bytes || *bytes > max_bytes) {
    return make_error(EINVAL, "{} is too large ({} entries, limit {} bytes)", what, entries, max_bytes);
  }
  if (!is_aligned(offset, cluster_size)) {
    return make_error(EINVAL, "{} offset {:#x} is not aligned to the cluster size", what, offset);
  }
  if (offset > kInt64Max || *bytes > kInt64Max - offset) {
    return make_error(EINVAL, "{} offset {:#x} + size {} overflows", what, offset, *bytes);
  }
  if (*bytes > 0 && !range_within(offset, *bytes, file_size)) {
    return make_error(EINVAL, "{} at offset {:#x} ({} bytes) runs past the end of the file ({} bytes)", what, offset,
                      *bytes, file_size);
  }
  return ok();
}

}  // namespace

std::string Header::feature_name(std::uint8_t type, std::uint8_t bit) const {
  for (const auto& f : feature_names) {
    if (f.type == type && f.bit == bit) return f.name;
  }
  const char* builtin = builtin_feature_name(type, bit);
  return builtin ? builtin : "";
}

namespace {

// Cluster 0 as parse_header sees it: `known` holds the file's first bytes,
// the file has `avail` bytes of cluster 0 in all (min(file size, 2 MiB), the
// rest of the cluster reads as zeroes). When `known` is shorter than
// `avail` (read_header reads a prefix first), at() records the furthest
// byte the parse looked at, so the caller can read more and parse again; a
// result that depended on a byte not known is never returned.
class Cluster0 {
 public:
  Cluster0(std::span<const std::byte> known, std::uint64_t avail) : known_(known), avail_(avail) {}
  std::uint64_t avail() const { return avail_; }
  std::uint64_t wanted() const { return wanted_; }
  // `n` bytes at `off` (inside cluster 0): the file's bytes, zeroes past its
  // end or past what is known.
  const std::byte* at(std::uint64_t off, std::uint64_t n) {
    wanted_ = std::max(wanted_, off + n);
    if (off + n <= known_.size()) return known_.data() + off;
    // Rare: a read past the known bytes. A zero-padded copy, grown to what
    // is asked (never the whole cluster up front), doubling so that a walk
    // of many small extensions past the known bytes stays linear.
    if (pad_.size() < off + n) {
      if (pad_.empty()) pad_.assign(known_.begin(), known_.end());
      pad_.resize(static_cast<std::size_t>(std::max(off + n, 2 * pad_.size())), std::byte{0});
    }
    return pad_.data() + off;
  }

 private:
  std::span<const std::byte> known_;
  std::uint64_t avail_;
  std::uint64_t wanted_ = 0;
  std::vector<std::byte> pad_;
};

Result<Header> parse_cluster0(Cluster0& c0, std::uint64_t file_size) {
  if (c0.avail() < V2_HEADER_LENGTH) {
    return make_error(EINVAL, "file is too small to be a qcow2 image ({} bytes)", c0.avail());
  }
  const std::byte* p = c0.at(0, V2_HEADER_LENGTH);
  if (load_be32(p) != QCOW2_MAGIC) return make_error(EINVAL, "not a qcow2 image (bad magic)");

  Header h;
  h.version = load_be32(p + 4);
  if (h.version != 2 && h.version != 3) {
    return make_error(ENOTSUP, "unsupported qcow2 version {}", h.version);
  }
  h.backing_file_offset = load_be64(p + 8);
  h.backing_file_size = load_be32(p + 16);
  h.cluster_bits = load_be32(p + 20);
  h.size = load_be64(p + 24);
  h.crypt_method = load_be32(p + 32);
  h.l1_size = load_be32(p + 36);
  h.l1_table_offset = load_be64(p + 40);
  h.refcount_table_offset = load_be64(p + 48);
  h.refcount_table_clusters = load_be32(p + 56);
  h.nb_snapshots = load_be32(p + 60);
  h.snapshots_offset = load_be64(p + 64);

  // Clusters of 512 B (the spec's minimum) to 2 MiB (QEMU's maximum, qcow2_do_open).
  if (h.cluster_bits < MIN_CLUSTER_BITS || h.cluster_bits > MAX_CLUSTER_BITS) {
    return make_error(EINVAL, "unsupported cluster size: cluster_bits {} (must be {}..{})", h.cluster_bits,
                      MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
  }
  const std::uint64_t cluster_size = h.cluster_size();

  // Every read below goes through c0.at(), inside cluster 0: bytes past the
  // end of the file read as zeroes.

  if (h.version == 2) {
    // qcow2.txt "Header": v2 has none of the v3 fields.
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0;
    h.refcount_order = 4;
    h.header_length = V2_HEADER_LENGTH;
    h.compression_type = COMPRESSION_DEFLATE;
  } else {
    if (c0.avail() < V3_MIN_HEADER_LENGTH) {
      return make_error(EINVAL, "file is too small for a version 3 header ({} bytes)", c0.avail());
    }
    p = c0.at(0, V3_MIN_HEADER_LENGTH);
    h.incompatible_features = load_be64(p + 72);
    h.compatible_features = load_be64(p + 80);
    h.autoclear_features = load_be64(p + 88);
    h.refcount_order = load_be32(p + 96);
    h.header_length = load_be32(p + 100);
    // qcow2.txt "Header": v3 header_length >= 104 and a multiple of 8; QEMU's
    // qcow2_do_open also keeps it inside the first cluster.
    if (h.header_length < V3_MIN_HEADER_LENGTH) {
      return make_error(EINVAL, "header_length {} is too small (version 3 needs at least {})", h.header_length,
                        V3_MIN_HEADER_LENGTH);
    }
    if (h.header_length % 8 != 0) {
      return make_error(EINVAL, "header_length {} is not a multiple of 8", h.header_length);
    }
    if (h.header_length > cluster_size) {
      return make_error(EINVAL, "header_length {} is larger than the cluster size {}", h.header_length, cluster_size);
    }
    if (h.header_length > c0.avail()) {
      return make_error(EINVAL, "header_length {} runs past the end of the file", h.header_length);
    }
    p = c0.at(0, h.header_length);
    // qcow2.txt "Additional fields (version 3 and higher)": the optional
    // compression_type byte exists only if header_length > 104.
    h.compression_type = h.header_length > 104 ? static_cast<std::uint8_t>(p[104]) : 0;
    if (h.header_length > V3_HEADER_LENGTH) {
      h.unknown_header_fields.assign(p + V3_HEADER_LENGTH, p + h.header_length);
    }
  }

  // qcow2.txt "Header": refcount_order may not exceed 6.
  if (h.refcount_order > MAX_REFCOUNT_ORDER) {
    return make_error(EINVAL, "refcount_order {} is too large (refcount width above 64 bits)", h.refcount_order);
  }

  // qcow2.txt "Header", "Header extensions": the backing file name (at most
  // 1023 bytes) lives in cluster 0, after the extensions.
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size > MAX_BACKING_FILE_SIZE) {
      return make_error(EINVAL, "backing file name too long ({} bytes, limit {})", h.backing_file_size,
                        MAX_BACKING_FILE_SIZE);
    }
    if (h.backing_file_offset > cluster_size || h.backing_file_offset + h.backing_file_size > cluster_size) {
      return make_error(EINVAL, "backing file name at offset {:#x} ({} bytes) is not inside the first cluster",
                        h.backing_file_offset, h.backing_file_size);
    }
    if (h.backing_file_offset < h.header_length) {
      return make_error(EINVAL, "backing file name at offset {:#x} overlaps the header", h.backing_file_offset);
    }
    if (h.backing_file_offset + h.backing_file_size > c0.avail()) {
      return make_error(EINVAL, "backing file name runs past the end of the file");
    }
    h.backing_file = string_from(c0.at(h.backing_file_offset, h.backing_file_size), h.backing_file_size);
    if (h.backing_file.empty()) return make_error(EINVAL, "backing file name is empty");
  }

  // Header extensions (qcow2.txt "Header extensions"; each record must fit, as
  // QEMU's qcow2_read_extensions checks), from header_length to the backing
  // file name (or the end of cluster 0).
  const std::uint64_t ext_end = h.backing_file_offset ? h.backing_file_offset : cluster_size;
  bool seen_backing_format = false, seen_features = false, seen_data_file = false;
  std::uint64_t pos = h.header_length;
  for (;;) {
    if (pos + 8 > ext_end) {
      // The area may end without an explicit terminator only when it is full.
      if (pos == ext_end) break;
      return make_error(EINVAL, "header extension at offset {:#x} too large (runs past the extension area)", pos);
    }
    const std::byte* e = c0.at(pos, 8);
    std::uint32_t type = load_be32(e);
    std::uint32_t len = load_be32(e + 4);
    pos += 8;
    if (type == EXT_END) break;
    if (len > ext_end - pos) {
      return make_error(EINVAL, "header extension {:#010x} too large ({} bytes at offset {:#x})", type, len, pos);
    }
    const std::byte* data = c0.at(pos, len);
    auto duplicate = [&](const char* name) {
      return make_error(EINVAL, "header extension '{}' ({:#010x}) appears twice", name, type);
    };
    switch (type) {
      case EXT_BACKING_FORMAT:  // QEMU's qcow2_read_extensions: < 16 bytes
        if (seen_backing_format) return duplicate("backing file format");
        seen_backing_format = true;
        if (len > MAX_BACKING_FORMAT_LENGTH) {
          return make_error(EINVAL, "backing file format name too long ({} bytes, limit {})", len,
                            MAX_BACKING_FORMAT_LENGTH);
        }
        h.backing_format = string_from(data, len);
        break;
      case EXT_FEATURE_TABLE:
        if (seen_features) return duplicate("feature name table");
        seen_features = true;
        for (std::uint32_t i = 0; i + 48 <= len; i += 48) {
          FeatureName f;
          f.type = static_cast<std::uint8_t>(data[i]);
          f.bit = static_cast<std::uint8_t>(data[i + 1]);
          const char* name = reinterpret_cast<const char*>(data + i + 2);
          f.name.assign(name, strnlen(name, 46));
          h.feature_names.push_back(std::move(f));
        }
        break;
      case EXT_BITMAPS: {  // qcow2.txt "Bitmaps extension", QEMU's checks
        if (h.bitmaps) return duplicate("bitmaps");
        if (len != 24) return make_error(EINVAL, "bitmaps extension has length {} (must be 24)", len);
        BitmapsExtension b;
        b.nb_bitmaps = load_be32(data);
        std::uint32_t reserved = load_be32(data + 4);
        b.bitmap_directory_size = load_be64(data + 8);
        b.bitmap_directory_offset = load_be64(data + 16);
        if (h.version == 2 || !(h.autoclear_features & AUTOCLEAR_BITMAPS)) {
          // Written by a writer that did not know about bitmaps since: the
          // bitmaps are all inconsistent; QEMU ignores the extension.
          h.bitmaps = std::nullopt;
          break;
        }
        if (reserved != 0) return make_error(EINVAL, "bitmaps extension: reserved field is not zero");
        if (b.nb_bitmaps == 0) return make_error(EINVAL, "bitmaps extension: nb_bitmaps is 0");
        if (b.nb_bitmaps > MAX_BITMAPS) {
          return make_error(EINVAL, "bitmaps extension: too many bitmaps ({}, limit {})", b.nb_bitmaps, MAX_BITMAPS);
        }
        if (b.bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE) {
          return make_error(EINVAL, "bitmaps extension: bitmap directory too large ({} bytes, limit {})",
                            b.bitmap_directory_size, MAX_BITMAP_DIRECTORY_SIZE);
        }
        if (!is_aligned(b.bitmap_directory_offset, cluster_size)) {
          return make_error(EINVAL, "bitmaps extension: bitmap directory offset {:#x} is not cluster-aligned",
                            b.bitmap_directory_offset);
        }
        h.bitmaps = b;
        break;
      }
      case EXT_CRYPTO_HEADER: {  // qcow2.txt "Full disk encryption header pointer"
        if (h.crypto_header) return duplicate("full disk encryption header pointer");
        if (h.crypt_method != CRYPT_LUKS) {
          return make_error(EINVAL, "full disk encryption header pointer extension without LUKS encryption");
        }
        if (len != 16) return make_error(EINVAL, "full disk encryption header pointer has length {} (must be 16)", len);
        h.crypto_header = CryptoHeaderPointer{load_be64(data), load_be64(data + 8)};
        break;
      }
      case EXT_DATA_FILE:
        if (seen_data_file) return duplicate("external data file name");
        seen_data_file = true;
        h.data_file = string_from(data, len);
        break;
      default: h.unknown_extensions.push_back(UnknownExtension{type, std::vector<std::byte>(data, data + len)}); break;
    }
    pos += align_up(len, 8);
    if (pos > ext_end) pos = ext_end;  // padding may run to the very end
  }

  // qcow2.txt "Header": unknown incompatible bits, named from the feature table.
  if (std::uint64_t unknown = h.incompatible_features & ~INCOMPAT_MASK) {
    return make_error(ENOTSUP, "{}", describe_unknown_incompat(h, unknown));
  }
  // qcow2.txt "Data encryption": this engine implements no encryption.
  if (h.crypt_method != CRYPT_NONE) {
    if (h.crypt_method == CRYPT_AES || h.crypt_method == CRYPT_LUKS) {
      return make_error(ENOTSUP, "encrypted images are not supported (crypt_method {}: {})", h.crypt_method,
                        h.crypt_method == CRYPT_AES ? "AES" : "LUKS");
    }
    return make_error(ENOTSUP, "unsupported encryption method {}", h.crypt_method);
  }
  // qcow2.txt "Header", compression_type (QEMU's validate_compression_type).
  if (h.incompatible_features & INCOMPAT_COMPRESSION) {
    if (h.header_length <= 104) {
      return make_error(EINVAL, "compression type feature bit is set but the header has no compression_type field");
    }
    if (h.compression_type == COMPRESSION_DEFLATE) {
      return make_error(EINVAL, "compression type feature bit is set but compression_type is 0 (deflate)");
    }
  } else if (h.compression_type != COMPRESSION_DEFLATE) {
    return make_error(EINVAL, "compression_type {} requires the compression type feature bit", h.compression_type);
  }
  if (h.compression_type != COMPRESSION_DEFLATE && h.compression_type != COMPRESSION_ZSTD) {
    return make_error(ENOTSUP, "unknown compression type {}", h.compression_type);
  }
  // qcow2.txt "Header", cluster_bits: extended L2 entries need 16 KiB clusters.
  if (h.extended_l2() && h.cluster_bits < MIN_EXTL2_CLUSTER_BITS) {
    return make_error(EINVAL, "unsupported subcluster size: extended L2 entries need clusters of at least {} bytes",
                      1u << MIN_EXTL2_CLUSTER_BITS);
  }
  // qcow2.txt "Header", autoclear bit 1 (raw external data).
  if (h.data_file_raw() && !h.has_data_file()) {
    return make_error(EINVAL, "data-file-raw requires a data file (autoclear bit 1 without incompatible bit 2)");
  }
  if (h.data_file_raw() && h.backing_file_offset != 0) {
    return make_error(EINVAL, "data-file-raw cannot be combined with a backing file");
  }
  // qcow2.txt "Header", autoclear bit 0: an error without the bitmaps extension.
  if (h.version >= 3 && (h.autoclear_features & AUTOCLEAR_BITMAPS) && !h.bitmaps) {
    return make_error(EINVAL, "bitmaps autoclear bit is set but there is no bitmaps extension");
  }

  // Size limits of QEMU's qcow2_do_open: QEMU rejects sizes that do not fit its
  // sector arithmetic; the L1 table must cover the whole disk.
  if (h.size > kInt64Max) return make_error(EFBIG, "image is too big (size {:#x})", h.size);
  const unsigned shift = h.cluster_bits + h.l2_bits();
  const std::uint64_t l1_vm_state_index = (h.size >> shift) + ((h.size & ((1ull << shift) - 1)) != 0);
  if (l1_vm_state_index > static_cast<std::uint64_t>(INT_MAX)) {
    return make_error(EFBIG, "image is too big (needs {} L1 entries)", l1_vm_state_index);
  }
  if (h.l1_size < l1_vm_state_index) {
    return make_error(EINVAL, "L1 table is too small ({} entries for a disk needing {})", h.l1_size, l1_vm_state_index);
  }
  // QEMU's qcow2_do_open and qcow2_validate_table: refcount table <= 8 MiB,
  // active L1 <= 32 MiB, <= 65536 snapshots; each aligned and inside the file.
  if (h.refcount_table_clusters == 0) return make_error(EINVAL, "refcount table has zero clusters");
  QNBD_TRY(validate_table("refcount table", h.refcount_table_offset,
                          std::uint64_t{h.refcount_table_clusters} * (cluster_size / 8), 8, MAX_REFTABLE_BYTES,
                          cluster_size, file_size));
  QNBD_TRY(validate_table("active L1 table", h.l1_table_offset, h.l1_size, 8, MAX_L1_BYTES, cluster_size, file_size));
  if (h.nb_snapshots > MAX_SNAPSHOTS) {
    return make_error(EINVAL, "too many snapshots ({}, limit {})", h.nb_snapshots, MAX_SNAPSHOTS);
  }
  // Snapshot entries are variable-sized: only the 40-byte minimum is checked
  // here, the snapshot table parser checks the rest.
  QNBD_TRY(validate_table("snapshot table", h.snapshots_offset, h.nb_snapshots, 40, MAX_SNAPSHOTS_TABLE_BYTES,
                          cluster_size, file_size));
  if (h.crypto_header) {
    const auto& c = *h.crypto_header;
    if (!is_aligned(c.offset, cluster_size) || !range_within(c.offset, c.length, file_size)) {
      return make_error(EINVAL, "invalid encryption header offset {:#x} or length {}", c.offset, c.length);
    }
  }
  return h;
}

}  // namespace

Result<Header> parse_header(std::span<const std::byte> header_bytes, std::uint64_t file_size) {
  Cluster0 c0(header_bytes, header_bytes.size());
  return parse_cluster0(c0, file_size);
}

Result<Header> read_header(File& file, std::uint64_t file_size) {
  // What a header usually needs (the fixed fields, a few extensions, the
  // backing file name) is in the first 4 KiB; a parse that looked further
  // (extensions or a backing file name further into the cluster) is
  // repeated on as much as it looked at, at least twice as much each time,
  // up to the whole of cluster 0. Never more than min(file size, 2 MiB).
  const std::uint64_t avail = std::min<std::uint64_t>(file_size, 1ull << MAX_CLUSTER_BITS);
  std::uint64_t want = std::min<std::uint64_t>(avail, 4096);
  std::vector<std::byte> buf;
  for (;;) {
    buf.resize(static_cast<std::size_t>(want));
    QNBD_TRY(file.read_exact(buf, 0, "header"));
    Cluster0 c0(buf, avail);
    auto h = parse_cluster0(c0, file_size);
    if (c0.wanted() <= want || want == avail) return h;
    want = std::min(avail, std::max(c0.wanted(), 2 * want));
  }
}

}  // namespace qnbd::image::qcow2
