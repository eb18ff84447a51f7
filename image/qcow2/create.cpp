// qcow2 image creation; see create.hpp for the layout.
#include "image/qcow2/create.hpp"

#include <algorithm>
#include <bit>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "image/qcow2/refcount.hpp"

namespace qnbd::image::qcow2 {

std::vector<FeatureName> qemu_feature_names() {
  // Names and order exactly as qemu-img writes them (checked by hexdump of a
  // qemu-img 7.2 image), so our headers match byte for byte.
  return {
      {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
      {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},          {2, 1, "raw external data"},
  };
}

Result<void> validate_create_options(const CreateOptions& o) {
  if (o.cluster_size < 512 || o.cluster_size > (2u << 20) || !is_power_of_2(o.cluster_size)) {
    return make_error(EINVAL, "Cluster size must be a power of two between 512 and 2048k");
  }
  if (o.refcount_bits == 0 || o.refcount_bits > 64 || !is_power_of_2(o.refcount_bits)) {
    return make_error(EINVAL, "Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (o.version != 2 && o.version != 3) {
    return make_error(EINVAL, "Invalid compatibility level");
  }
  if (o.version == 2) {
    if (o.lazy_refcounts) {
      return make_error(EINVAL, "Lazy refcounts only supported with compatibility level 1.1 and "
                                "above (use version=v3 or greater)");
    }
    if (o.refcount_bits != 16) {
      return make_error(EINVAL, "Different refcount widths than 16 bits require compatibility "
                                "level 1.1 or above (use version=v3 or greater)");
    }
    if (!o.data_file.empty()) {
      return make_error(EINVAL, "External data files are only supported with compatibility level "
                                "1.1 and above (use version=v3 or greater)");
    }
    if (o.extended_l2) {
      return make_error(EINVAL, "Extended L2 entries are only supported with compatibility level "
                                "1.1 and above (use version=v3 or greater)");
    }
    if (o.compression_type != COMPRESSION_DEFLATE) {
      return make_error(EINVAL, "Non-zlib compression type is only supported with compatibility "
                                "level 1.1 and above (use version=v3 or greater)");
    }
  }
  if (o.extended_l2 && o.cluster_size < (1u << MIN_EXTL2_CLUSTER_BITS)) {
    return make_error(EINVAL, "Extended L2 entries are only supported with cluster sizes of at "
                              "least 16384 bytes");
  }
  if (o.data_file_raw && o.data_file.empty()) {
    return make_error(EINVAL, "data-file-raw requires data-file");
  }
  if (!o.backing_file.empty()) {
    if (o.data_file_raw) {
      return make_error(EINVAL, "Backing file and data-file-raw cannot be used at the same time");
    }
    if (o.preallocation != Preallocation::off && !o.extended_l2) {
      return make_error(EINVAL, "Backing file and preallocation can only be used at the same time "
                                "if extended_l2 is on");
    }
    if (o.backing_file.size() > MAX_BACKING_FILE_SIZE) {
      return make_error(EINVAL, "Backing file name too long");
    }
  }
  if (o.backing_format.size() > MAX_BACKING_FORMAT_LENGTH) {
    return make_error(EINVAL, "Backing format name too long");
  }
  return ok();
}

namespace {

Result<void> write_zero_clusters(File& file, std::uint64_t offset, std::uint64_t length) {
  static const std::vector<std::byte> zeroes(1 << 20);
  while (length > 0) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(length, zeroes.size()));
    QNBD_TRY(file.pwrite(std::span<const std::byte>(zeroes.data(), n), offset));
    offset += n;
    length -= n;
  }
  return ok();
}

}  // namespace

Result<void> create_qcow2(File& file, const CreateOptions& o, File* data_file) {
  QNBD_TRY(validate_create_options(o));
  if (o.data_file.empty() != (data_file == nullptr)) {
    return make_error(EINVAL, "data file option and data file object disagree");
  }
  const unsigned cluster_bits = static_cast<unsigned>(std::countr_zero(o.cluster_size));
  const unsigned refcount_order = static_cast<unsigned>(std::countr_zero(o.refcount_bits));
  const std::uint64_t cs = o.cluster_size;

  Header h;
  h.version = o.version;
  h.cluster_bits = cluster_bits;
  h.size = o.size;
  h.refcount_order = refcount_order;
  if (o.version == 3) {
    h.header_length = V3_HEADER_LENGTH;
    // QEMU leaves the feature table out of clusters of 4 KiB and less
    // (room for the backing file name); qemu-img 7.2 images show the same.
    if (cs > 4096) h.feature_names = qemu_feature_names();
    if (o.lazy_refcounts) h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    if (o.extended_l2) h.incompatible_features |= INCOMPAT_EXTL2;
    if (o.compression_type != COMPRESSION_DEFLATE) {
      h.incompatible_features |= INCOMPAT_COMPRESSION;  // qcow2.txt "Header", bit 3
      h.compression_type = o.compression_type;
    }
    if (!o.data_file.empty()) {
      h.incompatible_features |= INCOMPAT_DATA_FILE;
      h.data_file = o.data_file;
      if (o.data_file_raw) h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
    }
  } else {
    h.header_length = V2_HEADER_LENGTH;
  }
  h.backing_file = o.backing_file;
  h.backing_format = o.backing_format;

  // L1 size for the virtual size (qcow2.txt "Cluster mapping"); QEMU's limits
  // (qcow2_do_open: active L1 at most 32 MiB, L1 index within INT_MAX).
  const std::uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
  const std::uint64_t l1_size = div_round_up(o.size, cs * l2_entries);
  if (l1_size * 8 > MAX_L1_BYTES || l1_size > INT32_MAX) {
    return make_error(EFBIG, "Image size is too large for this cluster size");
  }
  h.l1_size = static_cast<std::uint32_t>(l1_size);

  // Bootstrap: header, a one-cluster refcount table and one refcount block
  // describing clusters 0-2, as qemu-img does. Everything else is allocated
  // through the allocator.
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = 1;
  {
    std::vector<std::byte> hdr = QNBD_TRY(serialize_header(h));
    QNBD_TRY(file.pwrite(hdr, 0));
    std::vector<std::byte> cluster(cs, std::byte{0});
    store_be64(cluster.data(), 2 * cs);
    QNBD_TRY(file.pwrite(cluster, cs));
    std::fill(cluster.begin(), cluster.end(), std::byte{0});
    for (std::uint64_t i = 0; i < 3; i++) set_refcount_entry(cluster, refcount_order, i, 1);
    QNBD_TRY(file.pwrite(cluster, 2 * cs));
  }
  // A fresh file has nothing to protect, so no flushes between steps.
  Refcounts::Options ro;
  ro.ordered_flushes = false;
  Refcounts refcounts =
      QNBD_TRY(Refcounts::load(file, RefcountGeometry{cluster_bits, refcount_order}, h.refcount_table_offset, 1, ro));

  std::vector<std::byte> l1(l1_size * 8, std::byte{0});
  if (l1_size > 0) {
    h.l1_table_offset = QNBD_TRY(refcounts.allocate(div_round_up(l1.size(), cs)));
  }

  std::uint64_t data_end = 0;  // end of the last preallocated host cluster
  if (o.preallocation != Preallocation::off && o.size > 0) {
    // Like QEMU's preallocate: per L2 range, the L2 table, then its data
    // clusters right after it. Entries are plain allocated clusters (no zero
    // flag; with extended L2 an empty subcluster bitmap), COPIED set.
    const std::uint64_t guest_clusters = div_round_up(o.size, cs);
    const std::uint32_t entry_size = o.extended_l2 ? 16 : 8;
    std::vector<std::byte> l2(cs);
    for (std::uint64_t l1_index = 0; l1_index < l1_size; l1_index++) {
      const std::uint64_t first = l1_index * l2_entries;
      const std::uint64_t n = std::min(l2_entries, guest_clusters - first);
      const std::uint64_t l2_offset = QNBD_TRY(refcounts.allocate(1));
      std::uint64_t host = 0;
      if (!data_file) host = QNBD_TRY(refcounts.allocate(n));
      std::fill(l2.begin(), l2.end(), std::byte{0});
      for (std::uint64_t i = 0; i < n; i++) {
        // External data file: identity mapping, guest cluster 0 encoded as
        // offset 0 with COPIED (qcow2.txt "Cluster mapping").
        const std::uint64_t off = data_file ? (first + i) * cs : host + i * cs;
        store_be64(l2.data() + i * entry_size, off | QCOW_OFLAG_COPIED);
      }
      QNBD_TRY(file.pwrite(l2, l2_offset));
      store_be64(l1.data() + l1_index * 8, l2_offset | QCOW_OFLAG_COPIED);
      if (!data_file) {
        if (o.preallocation == Preallocation::metadata) {
          data_end = std::max(data_end, host + n * cs);
        } else {
          QNBD_TRY(write_zero_clusters(file, host, n * cs));
        }
      }
    }
  }
  if (!l1.empty()) QNBD_TRY(file.pwrite(l1, h.l1_table_offset));
  QNBD_TRY(refcounts.flush());

  // The final header now that the allocator may have moved the table.
  h.refcount_table_offset = refcounts.table_offset();
  h.refcount_table_clusters = refcounts.table_clusters();
  std::vector<std::byte> hdr = QNBD_TRY(serialize_header(h));
  QNBD_TRY(file.pwrite(hdr, 0));
  // Metadata preallocation leaves the data clusters as a sparse tail of the
  // file, which must still exist (qemu-img check flags clusters past EOF).
  if (data_end > QNBD_TRY(file.size())) QNBD_TRY(file.truncate(data_end));
  QNBD_TRY(file.flush());

  if (data_file) {
    QNBD_TRY(data_file->truncate(o.size));
    if (o.preallocation == Preallocation::full || o.preallocation == Preallocation::falloc) {
      QNBD_TRY(write_zero_clusters(*data_file, 0, o.size));
    }
    QNBD_TRY(data_file->flush());
  }
  return ok();
}

}  // namespace qnbd::image::qcow2
