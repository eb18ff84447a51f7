// serialize_header(): the inverse of parse_header() (qcow2.txt "Header",
// "Additional fields", "Header padding", "Header extensions").
//
// Layout, in the order QEMU's qcow2_update_header() uses so that images we
// write are byte-identical to qemu-img's: fixed header, optional v3 fields and
// preserved unknown header fields, then the extensions (backing format, data
// file name, crypto header pointer, feature name table, bitmaps, unknown ones
// in file order), the end marker, and the backing file name right after it.
#include <algorithm>
#include <cstring>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/header.hpp"

namespace qnbd::image::qcow2 {
namespace {

// Appends records to the header buffer, failing with EFBIG once the cluster
// is full instead of writing past it.
class Writer {
 public:
  explicit Writer(std::vector<std::byte>& buf) : buf_(buf) {}

  std::uint64_t pos() const { return pos_; }

  Result<std::byte*> reserve(std::uint64_t n) {
    if (!range_within(pos_, n, buf_.size())) {
      return make_error(EFBIG,
                        "qcow2 header, extensions and backing file name ({}+ bytes) do not "
                        "fit in the first cluster ({} bytes)",
                        pos_ + n, buf_.size());
    }
    std::byte* p = buf_.data() + pos_;
    pos_ += n;
    return p;
  }

  // One extension record; the padding to 8 bytes stays zero (the buffer
  // starts zeroed), as QEMU's qcow2_update_header writes it.
  Result<void> extension(std::uint32_t type, std::span<const std::byte> data) {
    std::byte* p = QNBD_TRY(reserve(8 + align_up(data.size(), 8)));
    store_be32(p, type);
    store_be32(p + 4, static_cast<std::uint32_t>(data.size()));
    if (!data.empty()) std::memcpy(p + 8, data.data(), data.size());
    return ok();
  }

 private:
  std::vector<std::byte>& buf_;
  std::uint64_t pos_ = 0;
};

std::span<const std::byte> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace

Result<std::vector<std::byte>> serialize_header(const Header& h) {
  if (h.version != 2 && h.version != 3) {
    return make_error(EINVAL, "cannot write qcow2 version {}", h.version);
  }
  if (h.cluster_bits < MIN_CLUSTER_BITS || h.cluster_bits > MAX_CLUSTER_BITS) {
    return make_error(EINVAL, "cluster_bits {} out of range", h.cluster_bits);
  }
  const bool v3 = h.version == 3;
  if (!v3 && (h.incompatible_features || h.compatible_features || h.autoclear_features || h.refcount_order != 4 ||
              h.compression_type != COMPRESSION_DEFLATE || !h.unknown_header_fields.empty())) {
    // qcow2.txt "Header": a version 2 header has no room for these.
    return make_error(EINVAL, "version 2 qcow2 header cannot carry v3 features");
  }
  if (h.refcount_order > MAX_REFCOUNT_ORDER) {
    return make_error(EINVAL, "refcount_order {} out of range", h.refcount_order);
  }
  if (h.backing_file.size() > MAX_BACKING_FILE_SIZE) {
    return make_error(EINVAL, "backing file name is {} bytes, the limit is {}", h.backing_file.size(),
                      MAX_BACKING_FILE_SIZE);
  }

  std::vector<std::byte> buf(h.cluster_size(), std::byte{0});
  Writer w(buf);

  // Fixed header (qcow2.txt "Header"). backing_file_offset/size are patched
  // once the extensions' length is known.
  std::byte* p = QNBD_TRY(w.reserve(V2_HEADER_LENGTH));
  store_be32(p + 0, QCOW2_MAGIC);
  store_be32(p + 4, h.version);
  store_be32(p + 20, h.cluster_bits);
  store_be64(p + 24, h.size);
  store_be32(p + 32, h.crypt_method);
  store_be32(p + 36, h.l1_size);
  store_be64(p + 40, h.l1_table_offset);
  store_be64(p + 48, h.refcount_table_offset);
  store_be32(p + 56, h.refcount_table_clusters);
  store_be32(p + 60, h.nb_snapshots);
  store_be64(p + 64, h.snapshots_offset);

  if (v3) {
    // qcow2.txt "Additional fields", "Header padding": always write the
    // 112-byte header QEMU writes (compression_type plus zero padding),
    // followed verbatim by fields we do not know.
    // header_length must be a multiple of 8; the pad bytes stay zero.
    const std::uint64_t header_length = align_up(V3_HEADER_LENGTH + h.unknown_header_fields.size(), 8);
    std::byte* q = QNBD_TRY(w.reserve(header_length - V2_HEADER_LENGTH));
    store_be64(q + 0, h.incompatible_features);
    store_be64(q + 8, h.compatible_features);
    // qcow2.txt "Header", autoclear_features: unknown bits are cleared by any
    // writer. Bit 63 is ours (the write-intent record), kept only where the
    // caller set it: a live bitmap edit's header switch.
    store_be64(q + 16, h.autoclear_features & (AUTOCLEAR_MASK | AUTOCLEAR_QNBD_INTENT));
    store_be32(q + 24, h.refcount_order);
    store_be32(q + 28, static_cast<std::uint32_t>(header_length));
    q[32] = std::byte{h.compression_type};
    if (!h.unknown_header_fields.empty()) {
      std::memcpy(q + (V3_HEADER_LENGTH - V2_HEADER_LENGTH), h.unknown_header_fields.data(),
                  h.unknown_header_fields.size());
    }
  }

  // Extensions (qcow2.txt "Header extensions").
  if (!h.backing_format.empty()) {
    QNBD_TRY(w.extension(EXT_BACKING_FORMAT, as_bytes(h.backing_format)));
  }
  if (!h.data_file.empty()) {
    QNBD_TRY(w.extension(EXT_DATA_FILE, as_bytes(h.data_file)));
  }
  if (h.crypto_header) {
    std::byte data[16];
    store_be64(data, h.crypto_header->offset);
    store_be64(data + 8, h.crypto_header->length);
    QNBD_TRY(w.extension(EXT_CRYPTO_HEADER, data));
  }
  if (!h.feature_names.empty()) {
    std::vector<std::byte> table(h.feature_names.size() * 48, std::byte{0});
    for (std::size_t i = 0; i < h.feature_names.size(); i++) {
      const FeatureName& f = h.feature_names[i];
      std::byte* e = table.data() + i * 48;
      e[0] = std::byte{f.type};
      e[1] = std::byte{f.bit};
      // 46 bytes, zero padded; a 46-byte name has no NUL (qcow2.txt
      // "Feature name table").
      std::memcpy(e + 2, f.name.data(), std::min<std::size_t>(f.name.size(), 46));
    }
    QNBD_TRY(w.extension(EXT_FEATURE_TABLE, table));
  }
  // The bitmaps extension is only meaningful with autoclear bit 0 (qcow2.txt
  // "Header"); QEMU drops it on rewrite when the bit is clear, and so do we.
  if (h.bitmaps && (h.autoclear_features & AUTOCLEAR_BITMAPS)) {
    std::byte data[24] = {};
    store_be32(data, h.bitmaps->nb_bitmaps);
    store_be64(data + 8, h.bitmaps->bitmap_directory_size);
    store_be64(data + 16, h.bitmaps->bitmap_directory_offset);
    QNBD_TRY(w.extension(EXT_BITMAPS, data));
  }
  for (const UnknownExtension& ext : h.unknown_extensions) {
    if (ext.data.size() > UINT32_MAX) return make_error(EINVAL, "header extension too large");
    QNBD_TRY(w.extension(ext.type, ext.data));
  }
  QNBD_TRY(w.extension(EXT_END, {}));

  // The backing file name directly follows the extension area (qcow2.txt
  // "Header extensions"), so nothing else can hide between them.
  if (!h.backing_file.empty()) {
    const std::uint64_t offset = w.pos();
    std::byte* name = QNBD_TRY(w.reserve(h.backing_file.size()));
    std::memcpy(name, h.backing_file.data(), h.backing_file.size());
    store_be64(buf.data() + 8, offset);
    store_be32(buf.data() + 16, static_cast<std::uint32_t>(h.backing_file.size()));
  }
  return buf;
}

}  // namespace qnbd::image::qcow2
