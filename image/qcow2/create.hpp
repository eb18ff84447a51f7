// Creating a new qcow2 image (qemu-img create -f qcow2 equivalent).
//
// Layout as qemu-img writes it: cluster 0 = header, cluster 1 = refcount
// table, cluster 2 = refcount block, then the L1 table (and, when
// preallocating, L2 tables interleaved with their data clusters), all
// allocated through the Refcounts allocator so bigger images grow the
// refcount structure exactly as later writes would.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/header.hpp"

namespace qnbd::image::qcow2 {

enum class Preallocation { off, metadata, falloc, full };

struct CreateOptions {
  std::uint64_t size = 0;  // virtual size in bytes
  std::uint64_t cluster_size = 65536;
  std::uint32_t version = 3;  // compat=0.10 → 2, compat=1.1 → 3
  std::uint32_t refcount_bits = 16;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  std::uint8_t compression_type = COMPRESSION_DEFLATE;
  std::string data_file;  // external data file name stored in the header
  bool data_file_raw = false;
  Preallocation preallocation = Preallocation::off;
  std::string backing_file;
  std::string backing_format;
};

// Check the option combination; messages follow qemu-img's wording.
[[nodiscard]] Result<void> validate_create_options(const CreateOptions& options);

// The feature name table QEMU writes into version 3 images with clusters
// larger than 4 KiB (qcow2.txt "Feature name table").
std::vector<FeatureName> qemu_feature_names();

// Write a fresh image into `file` (expected empty). `data_file` must be
// given (already created) iff options.data_file is set; it is sized to the
// virtual size and, with preallocation=full, filled with zeroes.
[[nodiscard]] Result<void> create_qcow2(File& file, const CreateOptions& options, File* data_file = nullptr);

}  // namespace qnbd::image::qcow2
