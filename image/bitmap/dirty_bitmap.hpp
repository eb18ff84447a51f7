// DirtyBitmap: one in-memory dirty bitmap over a virtual disk (§12.1, §12.8
// of ../shared/spec/qcow2.md). Bit k covers guest bytes [k*g, (k+1)*g); a
// write touching any byte of a granule dirties the whole granule.
//
// Thread-safety: every method takes the bitmap's own mutex, which is never
// held over file I/O (callers copy bytes in/out with load_bytes/store_bytes
// and do the I/O themselves). Queries see a consistent snapshot per call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include "common/result.hpp"

namespace qnbd::image {

class DirtyBitmap {
 public:
  // `granularity` must be a power of two; size may be 0. Fails with EINVAL
  // otherwise, and with EFBIG above 4 Gi bits (512 MiB of bits, the qcow2
  // limit), so a hostile size cannot make us allocate without bound.
  [[nodiscard]] static Result<DirtyBitmap> create(std::uint64_t size, std::uint64_t granularity);

  DirtyBitmap(DirtyBitmap&& o) noexcept;
  DirtyBitmap& operator=(DirtyBitmap&& o) noexcept;

  std::uint64_t size() const { return size_; }
  std::uint64_t granularity() const { return granularity_; }
  // ceil(size / granularity)
  std::uint64_t bit_count() const { return bits_; }
  // Bytes of serialized data (§12.5 data_bytes = ceil(bits / 8)).
  std::uint64_t byte_count() const { return (bits_ + 7) / 8; }

  // Byte ranges are clipped at size(); empty ranges do nothing.
  // set_range dirties every granule the range touches.
  void set_range(std::uint64_t offset, std::uint64_t length);
  // clear_range cleans every granule the range touches (as set_range; the
  // callers clear whole bitmaps or granule-aligned ranges).
  void clear_range(std::uint64_t offset, std::uint64_t length);
  void reset();    // all clean
  void set_all();  // all dirty

  bool is_dirty(std::uint64_t offset) const;
  // Number of dirty granules.
  std::uint64_t count_dirty() const;

  // The run starting at byte `offset` (< size()): its state and its length
  // in bytes. It ends on a granule boundary, or at offset + max_length or
  // size() if those come first.
  struct Run {
    bool dirty = false;
    std::uint64_t length = 0;
  };
  Run run(std::uint64_t offset, std::uint64_t max_length) const;

  // Fill `out` with consecutive runs from offset covering at most length
  // bytes (clipped at size()); returns how many were written. One lock for
  // the whole call, no allocation.
  template <typename Extent>
  std::size_t runs(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) const {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    std::uint64_t end = offset + std::min(length, size_ > offset ? size_ - offset : 0);
    while (offset < end && n < out.size()) {
      Run r = run_locked(offset, end - offset);
      out[n].length = r.length;
      out[n].dirty = r.dirty;
      ++n;
      offset += r.length;
    }
    return n;
  }

  // OR `other` into this bitmap. Sizes must be equal; granularities may
  // differ (every dirty run of `other` dirties the granules it touches here).
  [[nodiscard]] Result<void> merge(const DirtyBitmap& other);

  // Serialized form (§12.5): byte j holds bits 8j..8j+7, least significant
  // first. load_bytes ORs nothing: it overwrites bytes [first, first+n) and
  // clears the unused tail bits after bit_count(). store_bytes copies out.
  void load_bytes(std::uint64_t first_byte, std::span<const std::byte> data);
  // Sets bytes [first, first+n) to all ones (0xff) or all zeroes.
  void fill_bytes(std::uint64_t first_byte, std::uint64_t n, bool ones);
  void store_bytes(std::uint64_t first_byte, std::span<std::byte> data) const;
  // True if the unused bits after bit_count() in the serialized byte range
  // [first, first+n) of `data` are zero (the loader checks on-disk tails).
  bool tail_bits_clear(std::uint64_t first_byte, std::span<const std::byte> data) const;

 private:
  DirtyBitmap() = default;
  Run run_locked(std::uint64_t offset, std::uint64_t max_length) const;
  void set_bits_locked(std::uint64_t first_bit, std::uint64_t end_bit, bool value);
  // First bit in [from, end) whose value equals `value`, or end.
  std::uint64_t find_locked(std::uint64_t from, std::uint64_t end, bool value) const;
  bool test_locked(std::uint64_t bit) const { return (words_[bit >> 6] >> (bit & 63)) & 1; }
  void clear_tail_locked();

  mutable std::mutex mutex_;
  std::uint64_t size_ = 0;
  std::uint64_t granularity_ = 1;
  unsigned granularity_bits_ = 0;
  std::uint64_t bits_ = 0;
  std::vector<std::uint64_t> words_;
};

}  // namespace qnbd::image
