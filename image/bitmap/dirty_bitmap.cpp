#include "image/bitmap/dirty_bitmap.hpp"

#include <algorithm>
#include <bit>

#include "common/checked.hpp"

namespace qnbd::image {
namespace {

constexpr std::uint64_t kMaxBits = 1ull << 32;

}  // namespace

Result<DirtyBitmap> DirtyBitmap::create(std::uint64_t size, std::uint64_t granularity) {
  if (!is_power_of_2(granularity)) {
    return make_error(EINVAL, "bitmap granularity {} is not a power of two", granularity);
  }
  DirtyBitmap b;
  b.size_ = size;
  b.granularity_ = granularity;
  b.granularity_bits_ = static_cast<unsigned>(std::countr_zero(granularity));
  b.bits_ = div_round_up(size, granularity);
  if (b.bits_ > kMaxBits) {
    return make_error(EFBIG, "bitmap of {} bits (size {}, granularity {}) is too large", b.bits_, size,
                      granularity);
  }
  b.words_.assign(static_cast<std::size_t>((b.bits_ + 63) / 64), 0);
  return b;
}

DirtyBitmap::DirtyBitmap(DirtyBitmap&& o) noexcept { *this = std::move(o); }

DirtyBitmap& DirtyBitmap::operator=(DirtyBitmap&& o) noexcept {
  if (this == &o) return *this;
  std::scoped_lock lock(mutex_, o.mutex_);
  size_ = o.size_;
  granularity_ = o.granularity_;
  granularity_bits_ = o.granularity_bits_;
  bits_ = o.bits_;
  words_ = std::move(o.words_);
  return *this;
}

void DirtyBitmap::set_bits_locked(std::uint64_t first, std::uint64_t end, bool value) {
  while (first < end) {
    std::uint64_t w = first >> 6;
    unsigned lo = first & 63;
    std::uint64_t n = std::min<std::uint64_t>(64 - lo, end - first);
    std::uint64_t mask = (n == 64 ? ~0ull : ((1ull << n) - 1)) << lo;
    if (value) {
      words_[w] |= mask;
    } else {
      words_[w] &= ~mask;
    }
    first += n;
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
  std::fill(words_.begin(), words_.end(), 0);
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
  for (std::uint64_t w : words_) n += static_cast<std::uint64_t>(std::popcount(w));
  return n;
}

std::uint64_t DirtyBitmap::find_locked(std::uint64_t from, std::uint64_t end, bool value) const {
  while (from < end) {
    std::uint64_t w = words_[from >> 6];
    if (!value) w = ~w;
    w &= ~0ull << (from & 63);  // ignore bits below `from`
    if (w != 0) return std::min<std::uint64_t>(end, (from & ~63ull) + static_cast<std::uint64_t>(std::countr_zero(w)));
    from = (from & ~63ull) + 64;
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
    for (std::size_t i = 0; i < words_.size(); ++i) words_[i] |= other.words_[i];
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
  if (bits_ & 63) words_.back() &= (1ull << (bits_ & 63)) - 1;
}

void DirtyBitmap::load_bytes(std::uint64_t first_byte, std::span<const std::byte> data) {
  std::lock_guard lock(mutex_);
  const std::uint64_t limit = byte_count();
  for (std::size_t i = 0; i < data.size() && first_byte + i < limit; ++i) {
    std::uint64_t j = first_byte + i;
    unsigned shift = static_cast<unsigned>((j & 7) * 8);
    std::uint64_t& w = words_[j >> 3];
    w = (w & ~(0xffull << shift)) | (std::uint64_t{std::to_integer<std::uint8_t>(data[i])} << shift);
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
  for (std::size_t i = 0; i < data.size(); ++i) {
    std::uint64_t j = first_byte + i;
    data[i] = j < limit ? static_cast<std::byte>(words_[j >> 3] >> ((j & 7) * 8)) : std::byte{0};
  }
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
