#include "image/bitmap/dirty_bitmap.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <utility>

#include "common/checked.hpp"

namespace qnbd::image {
namespace {

constexpr std::uint64_t kMaxBits = 1ull << 32;

// Serialized byte j of a leaf is bits 8j..8j+7, LSB first (qcow2.txt
// "Bitmap data"): on a little-endian host that is the leaf's memory as is.
constexpr bool kLittle = std::endian::native == std::endian::little;

std::uint64_t word_mask(unsigned lo, std::uint64_t n) { return (n == 64 ? ~0ull : ((1ull << n) - 1)) << lo; }

}  // namespace

std::atomic<std::uint64_t> DirtyBitmap::total_bytes_{0};

DirtyBitmap::Leaf* DirtyBitmap::ones_leaf() {
  static Leaf* const ones = [] {
    Leaf* p = new Leaf[kLeafWords];
    std::fill(p, p + kLeafWords, ~0ull);
    return p;
  }();
  return ones;
}

Result<DirtyBitmap> DirtyBitmap::create(std::uint64_t size, std::uint64_t granularity) {
  if (!is_power_of_2(granularity)) {
    return make_error(EINVAL, "bitmap granularity {} is not a power of two", granularity);
  }
  const std::uint64_t bits = div_round_up(size, granularity);
  if (bits > kMaxBits) {
    return make_error(EFBIG, "bitmap of {} bits (size {}, granularity {}) is too large", bits, size, granularity);
  }
  const std::uint64_t bytes = (bits + 7) / 8;
  std::uint64_t total = total_bytes_.load(std::memory_order_relaxed);
  do {
    if (total + bytes > kMaxTotalBytes) {
      return make_error(ENOMEM, "dirty bitmaps would need {} MiB in total, more than the {} MiB allowed",
                        div_round_up(total + bytes, 1u << 20), kMaxTotalBytes >> 20);
    }
  } while (!total_bytes_.compare_exchange_weak(total, total + bytes, std::memory_order_relaxed));
  DirtyBitmap b;
  b.size_ = size;
  b.granularity_ = granularity;
  b.granularity_bits_ = static_cast<unsigned>(std::countr_zero(granularity));
  b.bits_ = bits;
  b.charged_ = bytes;
  b.leaves_.assign(static_cast<std::size_t>((bits + kLeafBits - 1) >> kLeafShift), nullptr);
  return b;
}

void DirtyBitmap::release_all() {
  for (std::size_t l = 0; l < leaves_.size(); ++l) drop_leaf(l, nullptr);
  leaves_.clear();
  total_bytes_.fetch_sub(charged_, std::memory_order_relaxed);
  charged_ = 0;
}

DirtyBitmap::~DirtyBitmap() { release_all(); }

DirtyBitmap::DirtyBitmap(DirtyBitmap&& o) noexcept { *this = std::move(o); }

DirtyBitmap& DirtyBitmap::operator=(DirtyBitmap&& o) noexcept {
  if (this == &o) return *this;
  std::scoped_lock lock(mutex_, o.mutex_);
  release_all();
  size_ = o.size_;
  granularity_ = o.granularity_;
  granularity_bits_ = o.granularity_bits_;
  bits_ = std::exchange(o.bits_, 0);
  charged_ = std::exchange(o.charged_, 0);
  resident_ = std::exchange(o.resident_, 0);
  leaves_ = std::move(o.leaves_);
  o.leaves_.clear();
  o.size_ = 0;
  return *this;
}

std::uint64_t DirtyBitmap::resident_bytes() const {
  std::lock_guard lock(mutex_);
  return resident_;
}

DirtyBitmap::Leaf* DirtyBitmap::own_leaf(std::size_t l) {
  Leaf*& p = leaves_[l];
  if (p && p != ones_leaf()) return p;
  Leaf* n = new Leaf[kLeafWords];
  std::fill(n, n + kLeafWords, p ? ~0ull : 0ull);
  p = n;
  resident_ += kLeafBytes;
  return p;
}

void DirtyBitmap::drop_leaf(std::size_t l, Leaf* to) {
  Leaf*& p = leaves_[l];
  if (p && p != ones_leaf()) {
    delete[] p;
    resident_ -= kLeafBytes;
  }
  p = to;
}

void DirtyBitmap::set_bits_locked(std::uint64_t first, std::uint64_t end, bool value) {
  Leaf* const same = value ? ones_leaf() : nullptr;
  while (first < end) {
    const std::size_t l = static_cast<std::size_t>(first >> kLeafShift);
    const std::uint64_t leaf_start = std::uint64_t{l} << kLeafShift;
    const std::uint64_t stop = std::min(end, leaf_start + kLeafBits);
    if (leaves_[l] == same) {
      // Already in that state.
    } else if (first == leaf_start && stop == leaf_start + kLeafBits) {
      // A whole leaf (so wholly below bits_): no private copy needed.
      drop_leaf(l, same);
    } else {
      Leaf* p = own_leaf(l);
      for (std::uint64_t b = first; b < stop;) {
        const unsigned lo = b & 63;
        const std::uint64_t n = std::min<std::uint64_t>(64 - lo, stop - b);
        Leaf& w = p[(b >> 6) & (kLeafWords - 1)];
        if (value)
          w |= word_mask(lo, n);
        else
          w &= ~word_mask(lo, n);
        b += n;
      }
    }
    first = stop;
  }
}

void DirtyBitmap::set_range(std::uint64_t offset, std::uint64_t length) {
  if (length == 0 || offset >= size_) return;
  std::uint64_t end = offset + std::min(length, size_ - offset);
  std::lock_guard lock(mutex_);
  set_bits_locked(offset >> granularity_bits_, ((end - 1) >> granularity_bits_) + 1, true);
}

void DirtyBitmap::clear_range(std::uint64_t offset, std::uint64_t length) {
  if (length == 0 || offset >= size_) return;
  std::uint64_t end = offset + std::min(length, size_ - offset);
  std::lock_guard lock(mutex_);
  set_bits_locked(offset >> granularity_bits_, ((end - 1) >> granularity_bits_) + 1, false);
}

void DirtyBitmap::reset() {
  std::lock_guard lock(mutex_);
  for (std::size_t l = 0; l < leaves_.size(); ++l) drop_leaf(l, nullptr);
}

void DirtyBitmap::set_all() {
  std::lock_guard lock(mutex_);
  set_bits_locked(0, bits_, true);
}

bool DirtyBitmap::is_dirty(std::uint64_t offset) const {
  if (offset >= size_) return false;
  std::lock_guard lock(mutex_);
  return test_locked(offset >> granularity_bits_);
}

std::uint64_t DirtyBitmap::count_dirty() const {
  std::lock_guard lock(mutex_);
  std::uint64_t n = 0;
  for (const Leaf* p : leaves_) {
    if (!p) continue;
    if (p == ones_leaf()) {
      n += kLeafBits;
      continue;
    }
    for (std::size_t i = 0; i < kLeafWords; ++i) n += static_cast<std::uint64_t>(std::popcount(p[i]));
  }
  return n;
}

std::uint64_t DirtyBitmap::find_locked(std::uint64_t from, std::uint64_t end, bool value) const {
  // A clean or all-dirty leaf is skipped (or answered) whole, so a walk
  // over a mostly clean bitmap costs one pointer test per 32768 bits.
  const Leaf* const match_all = value ? ones_leaf() : nullptr;
  const Leaf* const match_none = value ? nullptr : ones_leaf();
  while (from < end) {
    const std::size_t l = static_cast<std::size_t>(from >> kLeafShift);
    const std::uint64_t leaf_end = std::min(end, (std::uint64_t{l} + 1) << kLeafShift);
    const Leaf* p = leaves_[l];
    if (p == match_all) return from;
    if (p == match_none) {
      from = leaf_end;
      continue;
    }
    while (from < leaf_end) {
      std::uint64_t w = p[(from >> 6) & (kLeafWords - 1)];
      if (!value) w = ~w;
      w &= ~0ull << (from & 63);  // ignore bits below `from`
      if (w != 0)
        return std::min<std::uint64_t>(end, (from & ~63ull) + static_cast<std::uint64_t>(std::countr_zero(w)));
      from = (from & ~63ull) + 64;
    }
  }
  return end;
}

DirtyBitmap::Run DirtyBitmap::run_locked(std::uint64_t offset, std::uint64_t max_length) const {
  Run r;
  std::uint64_t end = offset + std::min(max_length, size_ - offset);
  std::uint64_t bit = offset >> granularity_bits_;
  r.dirty = test_locked(bit);
  std::uint64_t end_bit = ((end - 1) >> granularity_bits_) + 1;
  std::uint64_t other = find_locked(bit + 1, end_bit, !r.dirty);
  // other < end_bit means its byte offset is below end (no overflow).
  r.length = (other >= end_bit ? end : std::min(end, other << granularity_bits_)) - offset;
  return r;
}

DirtyBitmap::Run DirtyBitmap::run(std::uint64_t offset, std::uint64_t max_length) const {
  if (offset >= size_ || max_length == 0) return {};
  std::lock_guard lock(mutex_);
  return run_locked(offset, max_length);
}

Result<void> DirtyBitmap::merge(const DirtyBitmap& other) {
  if (&other == this) return ok();
  if (other.size_ != size_) {
    return make_error(EINVAL, "cannot merge bitmaps of different sizes ({} and {})", other.size_, size_);
  }
  std::scoped_lock lock(mutex_, other.mutex_);
  if (other.granularity_ == granularity_) {
    for (std::size_t l = 0; l < leaves_.size(); ++l) {
      const Leaf* o = other.leaves_[l];
      if (!o || leaves_[l] == ones_leaf()) continue;
      if (o == ones_leaf()) {
        drop_leaf(l, ones_leaf());
        continue;
      }
      Leaf* p = own_leaf(l);
      for (std::size_t i = 0; i < kLeafWords; ++i) p[i] |= o[i];
    }
    return ok();
  }
  for (std::uint64_t bit = other.find_locked(0, other.bits_, true); bit < other.bits_;) {
    std::uint64_t stop = other.find_locked(bit, other.bits_, false);
    std::uint64_t offset = bit << other.granularity_bits_;
    std::uint64_t end = stop >= other.bits_ ? size_ : std::min(size_, stop << other.granularity_bits_);
    set_bits_locked(offset >> granularity_bits_, ((end - 1) >> granularity_bits_) + 1, true);
    bit = other.find_locked(stop, other.bits_, true);
  }
  return ok();
}

void DirtyBitmap::clear_tail_locked() {
  // Only the last leaf can reach past bits_, and it is never the shared
  // all-dirty leaf then.
  if ((bits_ & (kLeafBits - 1)) == 0 || leaves_.empty()) return;
  Leaf* p = leaves_.back();
  if (!p) return;
  const std::size_t w = static_cast<std::size_t>((bits_ >> 6) & (kLeafWords - 1));
  if (bits_ & 63) p[w] &= (1ull << (bits_ & 63)) - 1;
  std::fill(p + w + ((bits_ & 63) ? 1 : 0), p + kLeafWords, 0ull);
}

void DirtyBitmap::load_bytes(std::uint64_t first_byte, std::span<const std::byte> data) {
  std::lock_guard lock(mutex_);
  const std::uint64_t limit = byte_count();
  if (first_byte >= limit) return;
  const std::uint64_t end = first_byte + std::min<std::uint64_t>(data.size(), limit - first_byte);
  for (std::uint64_t j = first_byte; j < end;) {
    const std::size_t l = static_cast<std::size_t>(j / kLeafBytes);
    const std::uint64_t leaf_start = std::uint64_t{l} * kLeafBytes;
    const std::uint64_t stop = std::min(end, leaf_start + kLeafBytes);
    const std::byte* src = data.data() + (j - first_byte);
    const std::size_t n = static_cast<std::size_t>(stop - j);
    const bool zero = std::all_of(src, src + n, [](std::byte b) { return b == std::byte{0}; });
    const bool whole = j == leaf_start && n == kLeafBytes && (std::uint64_t{l} + 1) * kLeafBits <= bits_;
    // Clean data over a clean leaf, and whole leaves of one state, need no
    // private leaf: loading a mostly clean bitmap allocates only where it
    // is dirty.
    if (zero && (whole || !leaves_[l])) {
      drop_leaf(l, nullptr);
    } else if (whole && std::all_of(src, src + n, [](std::byte b) { return b == std::byte{0xff}; })) {
      drop_leaf(l, ones_leaf());
    } else {
      Leaf* p = own_leaf(l);
      const std::size_t at = static_cast<std::size_t>(j - leaf_start);
      if constexpr (kLittle) {
        std::memcpy(reinterpret_cast<std::byte*>(p) + at, src, n);
      } else {
        for (std::size_t i = 0; i < n; ++i) {
          const unsigned shift = static_cast<unsigned>(((at + i) & 7) * 8);
          Leaf& w = p[(at + i) >> 3];
          w = (w & ~(0xffull << shift)) | (std::uint64_t{std::to_integer<std::uint8_t>(src[i])} << shift);
        }
      }
    }
    j = stop;
  }
  clear_tail_locked();
}

void DirtyBitmap::fill_bytes(std::uint64_t first_byte, std::uint64_t n, bool ones) {
  std::lock_guard lock(mutex_);
  const std::uint64_t limit = byte_count();
  if (first_byte >= limit) return;
  n = std::min(n, limit - first_byte);
  set_bits_locked(first_byte * 8, std::min(bits_, (first_byte + n) * 8), ones);
}

void DirtyBitmap::store_bytes(std::uint64_t first_byte, std::span<std::byte> data) const {
  std::lock_guard lock(mutex_);
  const std::uint64_t limit = byte_count();
  std::uint64_t j = first_byte;
  std::byte* out = data.data();
  std::byte* const out_end = out + data.size();
  while (out < out_end) {
    if (j >= limit) {
      std::fill(out, out_end, std::byte{0});
      return;
    }
    const std::size_t l = static_cast<std::size_t>(j / kLeafBytes);
    const std::uint64_t leaf_start = std::uint64_t{l} * kLeafBytes;
    const std::size_t n = static_cast<std::size_t>(
        std::min<std::uint64_t>({static_cast<std::uint64_t>(out_end - out), leaf_start + kLeafBytes - j, limit - j}));
    const Leaf* p = leaves_[l];
    const std::size_t at = static_cast<std::size_t>(j - leaf_start);
    if (!p) {
      std::fill(out, out + n, std::byte{0});
    } else if constexpr (kLittle) {
      std::memcpy(out, reinterpret_cast<const std::byte*>(p) + at, n);
    } else {
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::byte>(p[(at + i) >> 3] >> (((at + i) & 7) * 8));
    }
    out += n;
    j += n;
  }
}

bool DirtyBitmap::any_dirty_bytes(std::uint64_t first_byte, std::uint64_t n) const {
  std::lock_guard lock(mutex_);
  if (first_byte >= byte_count() || n == 0) return false;
  const std::uint64_t end = std::min(bits_, (first_byte + std::min(n, byte_count() - first_byte)) * 8);
  return find_locked(first_byte * 8, end, true) < end;
}

bool DirtyBitmap::tail_bits_clear(std::uint64_t first_byte, std::span<const std::byte> data) const {
  // Bits at or after bits_ that fall into data.
  for (std::size_t i = 0; i < data.size(); ++i) {
    std::uint64_t bit0 = (first_byte + i) * 8;
    if (bit0 + 8 <= bits_) continue;
    auto v = std::to_integer<std::uint8_t>(data[i]);
    unsigned used = bit0 >= bits_ ? 0 : static_cast<unsigned>(bits_ - bit0);
    if ((v >> used) != 0) return false;
  }
  return true;
}

}  // namespace qnbd::image
