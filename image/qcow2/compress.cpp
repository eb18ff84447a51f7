#include "image/qcow2/compress.hpp"

#include <zlib.h>
#include <zstd.h>

#include <memory>

#include "image/qcow2/format.hpp"

namespace qnbd::image::qcow2 {
namespace {

// Per-thread raw-inflate stream. windowBits -15 accepts any window size;
// QEMU writes with -12, which is a subset.
struct Inflater {
  z_stream zs{};
  bool ready = false;
  Inflater() { ready = inflateInit2(&zs, -15) == Z_OK; }
  ~Inflater() {
    if (ready) inflateEnd(&zs);
  }
};

struct ZstdDctx {
  ZSTD_DCtx* ctx = ZSTD_createDCtx();
  ~ZstdDctx() { ZSTD_freeDCtx(ctx); }
};

Result<void> inflate_cluster(std::span<const std::byte> src, std::span<std::byte> dst) {
  thread_local Inflater inf;
  if (!inf.ready) return make_error(ENOMEM, "cannot initialise the deflate decoder");
  if (inflateReset(&inf.zs) != Z_OK) return make_error(EIO, "cannot reset the deflate decoder");
  inf.zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(src.data()));
  inf.zs.avail_in = static_cast<uInt>(src.size());
  inf.zs.next_out = reinterpret_cast<Bytef*>(dst.data());
  inf.zs.avail_out = static_cast<uInt>(dst.size());
  int ret = inflate(&inf.zs, Z_FINISH);
  // As QEMU: success once the cluster is full. The input is only known to
  // 512-byte precision, so Z_BUF_ERROR (input left or not finished) is fine
  // when the output is complete.
  if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) && inf.zs.avail_out == 0) return ok();
  return make_error(EIO, "compressed cluster is damaged (deflate: {})",
                    ret == Z_STREAM_END ? "stream ends before a full cluster" : (inf.zs.msg ? inf.zs.msg : "error"));
}

Result<void> unzstd_cluster(std::span<const std::byte> src, std::span<std::byte> dst) {
  thread_local ZstdDctx d;
  if (!d.ctx) return make_error(ENOMEM, "cannot initialise the zstd decoder");
  ZSTD_DCtx_reset(d.ctx, ZSTD_reset_session_only);
  ZSTD_inBuffer in{src.data(), src.size(), 0};
  ZSTD_outBuffer out{dst.data(), dst.size(), 0};
  size_t ret = 0;
  // Several frames may make up one cluster (as QEMU's qcow2_zstd_decompress
  // accepts); stop when it is full.
  while (out.pos < out.size) {
    size_t in_before = in.pos, out_before = out.pos;
    ret = ZSTD_decompressStream(d.ctx, &out, &in);
    if (ZSTD_isError(ret)) {
      return make_error(EIO, "compressed cluster is damaged (zstd: {})", ZSTD_getErrorName(ret));
    }
    if (in.pos <= in_before && out.pos <= out_before) {
      return make_error(EIO, "compressed cluster is damaged (zstd: no progress, stream shorter than a cluster)");
    }
  }
  // The last frame must end exactly at the end of the cluster; otherwise the
  // data decompresses to more than one cluster.
  if (ret != 0) return make_error(EIO, "compressed cluster is damaged (zstd: frame larger than a cluster)");
  return ok();
}

}  // namespace

Result<void> decompress_cluster(std::uint8_t compression_type, std::span<const std::byte> src,
                                std::span<std::byte> dst) {
  switch (compression_type) {
    case COMPRESSION_DEFLATE: return inflate_cluster(src, dst);
    case COMPRESSION_ZSTD: return unzstd_cluster(src, dst);
    default: return make_error(ENOTSUP, "unknown compression type {}", compression_type);
  }
}

Result<std::size_t> compress_cluster(std::uint8_t compression_type, std::span<const std::byte> src,
                                     std::span<std::byte> dst) {
  if (compression_type == COMPRESSION_DEFLATE) {
    z_stream zs{};
    if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
      return make_error(ENOMEM, "cannot initialise the deflate encoder");
    }
    zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(src.data()));
    zs.avail_in = static_cast<uInt>(src.size());
    zs.next_out = reinterpret_cast<Bytef*>(dst.data());
    zs.avail_out = static_cast<uInt>(dst.size());
    int ret = deflate(&zs, Z_FINISH);
    std::size_t n = dst.size() - zs.avail_out;
    deflateEnd(&zs);
    if (ret != Z_STREAM_END || n >= src.size()) return std::size_t{0};
    return n;
  }
  if (compression_type == COMPRESSION_ZSTD) {
    std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
    if (!cctx) return make_error(ENOMEM, "cannot initialise the zstd encoder");
    ZSTD_inBuffer in{src.data(), src.size(), 0};
    ZSTD_outBuffer out{dst.data(), dst.size(), 0};
    size_t ret = ZSTD_compressStream2(cctx.get(), &out, &in, ZSTD_e_end);
    if (ZSTD_isError(ret) || ret != 0 || out.pos >= src.size()) return std::size_t{0};
    return out.pos;
  }
  return make_error(ENOTSUP, "unknown compression type {}", compression_type);
}

}  // namespace qnbd::image::qcow2
