// Compressed cluster payloads (qcow2.txt "Header", compression_type; as QEMU's
// block/qcow2-threads.c): raw deflate and zstd.
//
// Thread-safe: decompression contexts are per thread and reused, so the read
// path does not allocate per cluster.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "common/result.hpp"

namespace qnbd::image::qcow2 {

// Decompress `src` (csize bytes read at coffset; may hold trailing garbage
// or the start of the next cluster) into exactly dst.size() bytes (one
// cluster). compression_type: COMPRESSION_DEFLATE or COMPRESSION_ZSTD.
// EIO if the stream is damaged or does not produce a full cluster.
[[nodiscard]] Result<void> decompress_cluster(std::uint8_t compression_type, std::span<const std::byte> src,
                                              std::span<std::byte> dst);

// Compress one cluster the way QEMU does (deflate: raw, windowBits -12;
// zstd: one frame). Returns the compressed size, or 0 if the result would
// not be smaller than src (store uncompressed). Used by tests now and by the
// writer later.
[[nodiscard]] Result<std::size_t> compress_cluster(std::uint8_t compression_type, std::span<const std::byte> src,
                                                   std::span<std::byte> dst);

}  // namespace qnbd::image::qcow2
