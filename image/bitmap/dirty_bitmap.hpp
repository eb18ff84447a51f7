// DirtyBitmap: one in-memory dirty bitmap over a virtual disk (qcow2.txt
// "Bitmaps", "Dirty tracking bitmaps"). Bit k covers guest bytes
// [k*g, (k+1)*g); a write touching any byte of a granule dirties the whole
// granule.
//
// Thread-safety: every method takes the bitmap's own mutex, which is never
// held over file I/O (callers copy bytes in/out with load_bytes/store_bytes
// and do the I/O themselves). Queries see a consistent snapshot per call.
//
// Memory follows what is dirty, not what the image declares (QEMU's HBitmap
// gets the same from lazily touched zero pages): the bits live in 4 KiB
// leaves of 32768 bits each; a leaf that is all clean is not allocated and a
// leaf that is all dirty points at one shared all-ones leaf, so a 512 MiB
// bitmap (2 TiB at 512 B granularity) costs 1 MiB of leaf pointers until
// it is written. Declared sizes are capped per process (create() fails past
// kMaxTotalBytes), which bounds what a hostile image can make us hold.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include "common/result.hpp"

namespace qnbd::image {

class DirtyBitmap {
 public:
  // The serialized sizes (byte_count()) of all live bitmaps of the process
  // together may not pass this: 16 bitmaps of the qcow2 maximum (512 MiB,
  // 2 TiB at 512 B granularity). Fully dirty, that is what they would hold.
  static constexpr std::uint64_t kMaxTotalBytes = 8ull << 30;

  // `granularity` must be a power of two; size may be 0. Fails with EINVAL
  // otherwise, with EFBIG above 4 Gi bits (512 MiB of bits, the qcow2
  // limit), and with ENOMEM when the process's bitmaps would together pass
  // kMaxTotalBytes, so a hostile image cannot make us allocate without bound.
  [[nodiscard]] static Result<DirtyBitmap> create(std::uint64_t size, std::uint64_t granularity);

  DirtyBitmap(DirtyBitmap&& o) noexcept;
  DirtyBitmap& operator=(DirtyBitmap&& o) noexcept;
  ~DirtyBitmap();
  DirtyBitmap(const DirtyBitmap&) = delete;
  DirtyBitmap& operator=(const DirtyBitmap&) = delete;

  // Bytes of leaves allocated (not counting the leaf pointers): what this
  // bitmap's contents cost in memory now.
  std::uint64_t resident_bytes() const;
  // Sum of byte_count() over the live bitmaps of the process.
  static std::uint64_t total_declared_bytes() { return total_bytes_.load(std::memory_order_relaxed); }

  std::uint64_t size() const { return size_; }
  std::uint64_t granularity() const { return granularity_; }
  // ceil(size / granularity)
  std::uint64_t bit_count() const { return bits_; }
  // Bytes of serialized data (qcow2.txt "Bitmap data": ceil(bits / 8)).
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

  // Serialized form (qcow2.txt "Bitmap data"): byte j holds bits 8j..8j+7,
  // least significant first. load_bytes ORs nothing: it overwrites bytes
  // [first, first+n) and clears the unused tail bits after bit_count().
  // store_bytes copies out.
  void load_bytes(std::uint64_t first_byte, std::span<const std::byte> data);
  // Sets bytes [first, first+n) to all ones (0xff) or all zeroes.
  void fill_bytes(std::uint64_t first_byte, std::uint64_t n, bool ones);
  void store_bytes(std::uint64_t first_byte, std::span<std::byte> data) const;
  // True if any bit of serialized bytes [first, first+n) is set (the store
  // skips clean clusters without serializing them).
  bool any_dirty_bytes(std::uint64_t first_byte, std::uint64_t n) const;
  // True if the unused bits after bit_count() in the serialized byte range
  // [first, first+n) of `data` are zero (the loader checks on-disk tails).
  bool tail_bits_clear(std::uint64_t first_byte, std::span<const std::byte> data) const;

 private:
  static constexpr unsigned kLeafShift = 15;  // bits per leaf: 32768 (4 KiB)
  static constexpr std::uint64_t kLeafBits = 1ull << kLeafShift;
  static constexpr std::size_t kLeafWords = kLeafBits / 64;
  static constexpr std::size_t kLeafBytes = kLeafBits / 8;
  using Leaf = std::uint64_t;  // leaves_[i] points at kLeafWords words
  static Leaf* ones_leaf();    // the shared all-dirty leaf, never written

  DirtyBitmap() = default;
  void release_all();
  // Make leaves_[l] a private leaf (copy of the clean or all-dirty state).
  Leaf* own_leaf(std::size_t l);
  void drop_leaf(std::size_t l, Leaf* to);
  Run run_locked(std::uint64_t offset, std::uint64_t max_length) const;
  void set_bits_locked(std::uint64_t first_bit, std::uint64_t end_bit, bool value);
  // First bit in [from, end) whose value equals `value`, or end.
  std::uint64_t find_locked(std::uint64_t from, std::uint64_t end, bool value) const;
  bool test_locked(std::uint64_t bit) const {
    const Leaf* p = leaves_[bit >> kLeafShift];
    return p && ((p[(bit >> 6) & (kLeafWords - 1)] >> (bit & 63)) & 1);
  }
  void clear_tail_locked();

  static std::atomic<std::uint64_t> total_bytes_;

  mutable std::mutex mutex_;
  std::uint64_t size_ = 0;
  std::uint64_t granularity_ = 1;
  unsigned granularity_bits_ = 0;
  std::uint64_t bits_ = 0;
  std::uint64_t charged_ = 0;   // this bitmap's share of total_bytes_
  std::uint64_t resident_ = 0;  // private leaves * kLeafBytes
  // nullptr: all clean; ones_leaf(): all dirty (only for leaves wholly
  // below bits_); else a private leaf. Bits at or past bits_ are always 0.
  std::vector<Leaf*> leaves_;
};

}  // namespace qnbd::image
