// Helpers for the image tests: a hand-built qcow2 image in memory (header,
// refcounts, L1, L2, data at known offsets) and running qemu-img when it is
// installed.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/endian.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/format.hpp"

namespace qnbd::test {

// A qcow2 image laid out by hand:
//   cluster 0 header, 1 refcount table, 2 refcount block, 3 L1 table,
//   4.. L2 tables (one per L1 entry used), then data clusters.
struct HandImage {
  std::uint32_t version = 3;
  std::uint32_t cluster_bits = 12;
  std::uint64_t size = 1 << 20;
  bool extended_l2 = false;
  std::uint64_t incompatible = 0;
  std::uint64_t autoclear = 0;
  std::uint8_t compression_type = 0;
  std::vector<std::byte> bytes;

  std::uint64_t cs() const { return 1ull << cluster_bits; }
  std::uint64_t l2_entry_size() const { return extended_l2 ? 16 : 8; }
  std::uint64_t l1_offset() const { return 3 * cs(); }
  std::uint64_t l2_offset() const { return 4 * cs(); }
  std::uint64_t data_offset(unsigned n) const { return (5 + n) * cs(); }

  // Build header + refcounts + L1 pointing at one L2 table at cluster 4.
  void build(unsigned data_clusters = 8) {
    bytes.assign((5 + data_clusters) * cs(), std::byte{0});
    std::byte* p = bytes.data();
    store_be32(p, image::qcow2::QCOW2_MAGIC);
    store_be32(p + 4, version);
    store_be32(p + 20, cluster_bits);
    store_be64(p + 24, size);
    store_be32(p + 36, 1);  // l1_size
    store_be64(p + 40, l1_offset());
    store_be64(p + 48, cs());  // refcount table
    store_be32(p + 56, 1);
    if (version == 3) {
      std::uint64_t incompat = incompatible | (extended_l2 ? image::qcow2::INCOMPAT_EXTL2 : 0) |
                               (compression_type ? image::qcow2::INCOMPAT_COMPRESSION : 0);
      store_be64(p + 72, incompat);
      store_be64(p + 88, autoclear);
      store_be32(p + 96, 4);
      store_be32(p + 100, 112);
      p[104] = std::byte{compression_type};
    }
    store_be64(p + cs(), 2 * cs());  // refcount table[0] -> block at cluster 2
    for (unsigned c = 0; c < 5 + data_clusters; ++c) store_be16(p + 2 * cs() + 2 * c, 1);
    store_be64(p + l1_offset(), l2_offset() | image::qcow2::QCOW_OFLAG_COPIED);
  }
  // Set L2 entry `index` (and its subcluster bitmap with extended L2).
  void set_l2(std::uint64_t index, std::uint64_t entry, std::uint64_t bitmap = 0) {
    std::byte* e = bytes.data() + l2_offset() + index * l2_entry_size();
    store_be64(e, entry);
    if (extended_l2) store_be64(e + 8, bitmap);
  }
  void fill_data(unsigned n, std::uint8_t value) { std::memset(bytes.data() + data_offset(n), value, cs()); }
  std::unique_ptr<image::MemFile> file() const { return std::make_unique<image::MemFile>("hand.qcow2", bytes); }
};

inline bool have_qemu_img() { return std::system("qemu-img --version >/dev/null 2>&1") == 0; }

// A fresh temporary directory, removed at scope exit.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/qnbd-image-test-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline int run(const std::string& cmd) { return std::system(("(" + cmd + ") >/dev/null 2>&1").c_str()); }

inline std::vector<std::byte> read_whole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> v((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(v.size());
  std::memcpy(out.data(), v.data(), v.size());
  return out;
}

}  // namespace qnbd::test
