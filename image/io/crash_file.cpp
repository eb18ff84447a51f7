#include "image/io/crash_file.hpp"

#include <algorithm>
#include <cstring>
#include <random>

#include "common/checked.hpp"

namespace qnbd::image {

CrashFile::CrashFile(std::string name, std::vector<std::byte> contents)
    : name_(std::move(name)), current_(contents), durable_(std::move(contents)) {}

Result<void> CrashFile::grow_locked(std::vector<std::byte>& v, std::uint64_t size) const {
  if (size > kMaxSize) return make_error(EFBIG, "{}: size {} is too large for a memory file", name_, size);
  if (size > v.size()) v.resize(static_cast<std::size_t>(size));
  return ok();
}

Result<void> CrashFile::before_mutation_locked() {
  if (crashed_) return make_error(EIO, "{}: device lost power", name_);
  if (crash_at_ && mutations_ >= *crash_at_) {
    crashed_ = crash_locked(crash_seed_);
    return make_error(EIO, "{}: device lost power", name_);
  }
  ++mutations_;
  return ok();
}

Result<std::size_t> CrashFile::pread(std::span<std::byte> buf, std::uint64_t offset) {
  std::lock_guard lock(mutex_);
  if (offset >= current_.size()) return std::size_t{0};
  auto n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), current_.size() - offset));
  std::memcpy(buf.data(), current_.data() + offset, n);
  return n;
}

Result<void> CrashFile::pwrite(std::span<const std::byte> buf, std::uint64_t offset) {
  std::lock_guard lock(mutex_);
  auto end = checked_add(offset, buf.size());
  if (!end) return make_error(EINVAL, "{}: write offset overflows", name_);
  if (*end > kMaxSize) return make_error(EFBIG, "{}: size {} is too large for a memory file", name_, *end);
  QNBD_TRY(before_mutation_locked());
  QNBD_TRY(grow_locked(current_, *end));
  if (!buf.empty()) std::memcpy(current_.data() + offset, buf.data(), buf.size());
  log_.push_back(Logged{Kind::write, offset, buf.size(), std::vector<std::byte>(buf.begin(), buf.end())});
  return ok();
}

Result<void> CrashFile::write_zeroes(std::uint64_t offset, std::uint64_t length, bool) {
  std::lock_guard lock(mutex_);
  auto end = checked_add(offset, length);
  if (!end) return make_error(EINVAL, "{}: zero range overflows", name_);
  if (*end > kMaxSize) return make_error(EFBIG, "{}: size {} is too large for a memory file", name_, *end);
  QNBD_TRY(before_mutation_locked());
  QNBD_TRY(grow_locked(current_, *end));
  std::fill_n(current_.begin() + static_cast<std::ptrdiff_t>(offset), length, std::byte{0});
  log_.push_back(Logged{Kind::zero, offset, length, {}});
  return ok();
}

Result<void> CrashFile::discard(std::uint64_t offset, std::uint64_t length) {
  std::lock_guard lock(mutex_);
  QNBD_TRY(before_mutation_locked());
  // Reads as zeroes afterwards, never grows the file (as MemFile).
  if (offset >= current_.size()) return ok();
  std::uint64_t n = std::min<std::uint64_t>(length, current_.size() - offset);
  std::fill_n(current_.begin() + static_cast<std::ptrdiff_t>(offset), n, std::byte{0});
  log_.push_back(Logged{Kind::zero, offset, n, {}});
  return ok();
}

Result<void> CrashFile::truncate(std::uint64_t size) {
  std::lock_guard lock(mutex_);
  if (size > kMaxSize) return make_error(EFBIG, "{}: size {} is too large for a memory file", name_, size);
  QNBD_TRY(before_mutation_locked());
  current_.resize(static_cast<std::size_t>(size));
  log_.push_back(Logged{Kind::truncate, size, 0, {}});
  return ok();
}

Result<std::uint64_t> CrashFile::size() {
  std::lock_guard lock(mutex_);
  return static_cast<std::uint64_t>(current_.size());
}

Result<void> CrashFile::flush() {
  std::lock_guard lock(mutex_);
  if (crashed_) return make_error(EIO, "{}: device lost power", name_);
  if (cut_inside_flush_) QNBD_TRY(before_mutation_locked());
  // A flush makes durable what completed before it: replay the log rather
  // than copy the whole file, so a flush costs what was written since.
  for (const Logged& op : log_) {
    switch (op.kind) {
      case Kind::truncate: durable_.resize(static_cast<std::size_t>(op.offset)); break;
      case Kind::zero:
        if (op.offset + op.length > durable_.size()) durable_.resize(static_cast<std::size_t>(op.offset + op.length));
        std::fill_n(durable_.begin() + static_cast<std::ptrdiff_t>(op.offset), op.length, std::byte{0});
        break;
      case Kind::write:
        if (op.offset + op.length > durable_.size()) durable_.resize(static_cast<std::size_t>(op.offset + op.length));
        std::memcpy(durable_.data() + op.offset, op.data.data(), op.data.size());
        break;
    }
  }
  log_.clear();
  ++flushes_;
  return ok();
}

std::vector<std::byte> CrashFile::crash_locked(std::uint64_t seed) const {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out = durable_;
  for (const Logged& op : log_) {
    // 0 = dropped, 1 = applied, 2 = torn (writes only).
    unsigned fate = static_cast<unsigned>(rng() % 3);
    if (fate == 0) continue;
    switch (op.kind) {
      case Kind::truncate: out.resize(static_cast<std::size_t>(op.offset)); break;
      case Kind::zero:
        if (op.offset + op.length > out.size()) out.resize(static_cast<std::size_t>(op.offset + op.length));
        std::fill_n(out.begin() + static_cast<std::ptrdiff_t>(op.offset), op.length, std::byte{0});
        break;
      case Kind::write: {
        std::uint64_t end = op.offset + op.length;
        if (fate == 1) {
          if (end > out.size()) out.resize(static_cast<std::size_t>(end));
          std::memcpy(out.data() + op.offset, op.data.data(), op.data.size());
          break;
        }
        // Torn: each sector the write touches lands or not on its own. A
        // file that the write extended grows only as far as landed sectors.
        for (std::uint64_t s = align_down(op.offset, kSectorSize); s < end; s += kSectorSize) {
          if (rng() % 2 == 0) continue;
          std::uint64_t from = std::max(s, op.offset), to = std::min(s + kSectorSize, end);
          if (to > out.size()) out.resize(static_cast<std::size_t>(to));
          std::memcpy(out.data() + from, op.data.data() + (from - op.offset), to - from);
        }
        break;
      }
    }
  }
  return out;
}

std::vector<std::byte> CrashFile::crash(std::uint64_t seed) const {
  std::lock_guard lock(mutex_);
  return crash_locked(seed);
}

void CrashFile::arm_crash(std::uint64_t mutating_calls, std::uint64_t seed) {
  std::lock_guard lock(mutex_);
  crash_at_ = mutations_ + mutating_calls;
  crash_seed_ = seed;
  if (mutating_calls == 0) crashed_ = crash_locked(seed);
}

void CrashFile::set_cut_inside_flush(bool on) {
  std::lock_guard lock(mutex_);
  cut_inside_flush_ = on;
}

std::optional<std::vector<std::byte>> CrashFile::crashed_image() const {
  std::lock_guard lock(mutex_);
  return crashed_;
}

std::vector<std::byte> CrashFile::current() const {
  std::lock_guard lock(mutex_);
  return current_;
}

std::vector<std::byte> CrashFile::durable() const {
  std::lock_guard lock(mutex_);
  return durable_;
}

std::uint64_t CrashFile::flush_count() const {
  std::lock_guard lock(mutex_);
  return flushes_;
}

std::uint64_t CrashFile::mutating_calls() const {
  std::lock_guard lock(mutex_);
  return mutations_;
}

std::size_t CrashFile::unflushed_calls() const {
  std::lock_guard lock(mutex_);
  return log_.size();
}

}  // namespace qnbd::image
