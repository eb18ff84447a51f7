#include "image/qcow2/cache.hpp"

#include <algorithm>
#include <limits>

namespace qnbd::image::qcow2 {

TableCache::Handle& TableCache::Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    reset();
    cache_ = o.cache_;
    entry_ = o.entry_;
    o.cache_ = nullptr;
    o.entry_ = nullptr;
  }
  return *this;
}

std::span<const std::byte> TableCache::Handle::data() const {
  return {entry_->data.get(), cache_->table_bytes_};
}

std::span<std::byte> TableCache::Handle::mutable_data() { return {entry_->data.get(), cache_->table_bytes_}; }

void TableCache::Handle::reset() {
  if (cache_) cache_->unpin(entry_);
  cache_ = nullptr;
  entry_ = nullptr;
}

TableCache::TableCache(File& file, std::size_t table_bytes, std::size_t capacity, const char* what)
    : file_(file), table_bytes_(table_bytes), what_(what), entries_(std::max<std::size_t>(capacity, 2)) {
  index_.reserve(entries_.size());
}

void TableCache::unpin(Entry* e) {
  std::lock_guard lock(mutex_);
  --e->pins;
}

Result<TableCache::Handle> TableCache::get(std::uint64_t offset) {
  std::lock_guard lock(mutex_);
  ++tick_;
  if (auto it = index_.find(offset); it != index_.end()) {
    Entry& e = entries_[it->second];
    e.last_use = tick_;
    ++e.pins;
    return Handle(this, &e);
  }
  ++misses_;
  // Replace an unused slot, else the least recently used unpinned one (a
  // linear scan, as QEMU: misses cost a disk read anyway).
  std::size_t victim = entries_.size();
  std::uint64_t oldest = std::numeric_limits<std::uint64_t>::max();
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (!e.used) {
      victim = i;
      break;
    }
    if (e.pins == 0 && e.last_use < oldest) {
      oldest = e.last_use;
      victim = i;
    }
  }
  if (victim == entries_.size()) {
    return make_error(EAGAIN, "{} cache: all {} entries are in use", what_, entries_.size());
  }
  Entry& e = entries_[victim];
  if (e.used) {
    if (e.dirty) {
      if (!writeback_) return make_error(EIO, "{} cache: dirty table without a writeback hook", what_);
      QNBD_TRY(writeback_(e.offset, std::span<const std::byte>(e.data.get(), table_bytes_)));
      e.dirty = false;
    }
    index_.erase(e.offset);
    e.used = false;
  }
  if (!e.data) e.data = std::make_unique<std::byte[]>(table_bytes_);
  QNBD_TRY(file_.read_exact(std::span<std::byte>(e.data.get(), table_bytes_), offset, what_));
  e.offset = offset;
  e.used = true;
  e.last_use = tick_;
  e.pins = 1;
  index_.emplace(offset, victim);
  return Handle(this, &e);
}

void TableCache::mark_dirty(Handle& h) {
  std::lock_guard lock(mutex_);
  h.entry_->dirty = true;
}

Result<void> TableCache::flush() {
  std::lock_guard lock(mutex_);
  for (Entry& e : entries_) {
    if (!e.used || !e.dirty) continue;
    if (!writeback_) return make_error(EIO, "{} cache: dirty table without a writeback hook", what_);
    QNBD_TRY(writeback_(e.offset, std::span<const std::byte>(e.data.get(), table_bytes_)));
    e.dirty = false;
  }
  return ok();
}

void TableCache::set_writeback(Writeback wb) {
  std::lock_guard lock(mutex_);
  writeback_ = std::move(wb);
}

void TableCache::discard(std::uint64_t offset) {
  std::lock_guard lock(mutex_);
  auto it = index_.find(offset);
  if (it == index_.end()) return;
  Entry& e = entries_[it->second];
  e.used = false;
  e.dirty = false;
  index_.erase(it);
}

std::size_t TableCache::cached_tables() const {
  std::lock_guard lock(mutex_);
  return index_.size();
}

std::uint64_t TableCache::misses() const {
  std::lock_guard lock(mutex_);
  return misses_;
}

std::size_t TableCache::allocated_buffers() const {
  std::lock_guard lock(mutex_);
  return static_cast<std::size_t>(
      std::count_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.data != nullptr; }));
}

}  // namespace qnbd::image::qcow2
