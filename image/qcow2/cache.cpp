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

std::span<const std::byte> TableCache::Handle::data() const { return {entry_->data.get(), cache_->table_bytes_}; }

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

Result<std::size_t> TableCache::take_slot_locked() {
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
    if (e.dirty) QNBD_TRY(write_back_locked(e));
    index_.erase(e.offset);
    e.used = false;
  }
  if (!e.data) e.data = std::make_unique<std::byte[]>(table_bytes_);
  return victim;
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
  const std::size_t victim = QNBD_TRY(take_slot_locked());
  Entry& e = entries_[victim];
  QNBD_TRY(file_.read_exact(std::span<std::byte>(e.data.get(), table_bytes_), offset, what_));
  e.offset = offset;
  e.used = true;
  e.last_use = tick_;
  e.pins = 1;
  index_.emplace(offset, victim);
  return Handle(this, &e);
}

Result<TableCache::Handle> TableCache::get_empty(std::uint64_t offset) {
  std::lock_guard lock(mutex_);
  ++tick_;
  std::size_t slot = 0;
  if (auto it = index_.find(offset); it != index_.end()) {
    slot = it->second;
    if (entries_[slot].pins != 0) return make_error(EBUSY, "{} cache: new table at {:#x} is in use", what_, offset);
  } else {
    slot = QNBD_TRY(take_slot_locked());
    index_.emplace(offset, slot);
  }
  Entry& e = entries_[slot];
  std::fill_n(e.data.get(), table_bytes_, std::byte{0});
  e.offset = offset;
  e.used = true;
  e.dirty = false;
  e.last_use = tick_;
  e.pins = 1;
  return Handle(this, &e);
}

void TableCache::mark_dirty(Handle& h) {
  std::lock_guard lock(mutex_);
  h.entry_->dirty = true;
}

Result<void> TableCache::flush_dependency_locked() {
  bool sync = needs_sync_;
  if (dependency_ && dependency_->has_dirty()) {
    QNBD_TRY(dependency_->flush());
    sync = true;
  }
  if (sync) {
    QNBD_TRY(sync_ ? sync_() : file_.flush());
    needs_sync_ = false;
  }
  return ok();
}

Result<void> TableCache::flush_dependency() {
  std::lock_guard lock(mutex_);
  return flush_dependency_locked();
}

Result<void> TableCache::write_back_locked(Entry& e) {
  QNBD_TRY(flush_dependency_locked());
  const std::span<const std::byte> table(e.data.get(), table_bytes_);
  QNBD_TRY(writeback_ ? writeback_(e.offset, table) : file_.pwrite(table, e.offset));
  e.dirty = false;
  return ok();
}

Result<void> TableCache::flush() {
  std::lock_guard lock(mutex_);
  for (Entry& e : entries_) {
    if (e.used && e.dirty) QNBD_TRY(write_back_locked(e));
  }
  return ok();
}

void TableCache::set_writeback(Writeback wb) {
  std::lock_guard lock(mutex_);
  writeback_ = std::move(wb);
}

void TableCache::set_dependency(TableCache* dependency) {
  std::lock_guard lock(mutex_);
  dependency_ = dependency;
}

void TableCache::depends_on_flush() {
  std::lock_guard lock(mutex_);
  needs_sync_ = true;
}

void TableCache::set_sync(Sync sync) {
  std::lock_guard lock(mutex_);
  sync_ = std::move(sync);
}

bool TableCache::has_dirty() const {
  std::lock_guard lock(mutex_);
  return std::any_of(entries_.begin(), entries_.end(), [](const Entry& e) { return e.used && e.dirty; });
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
