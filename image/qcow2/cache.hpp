// TableCache: a bounded cache of cluster-sized metadata tables (L2 tables
// now; refcount blocks later), as QEMU's qcow2-cache.c.
//
// Thread-safe (own mutex). The engine calls it under its metadata mutex, so
// the internal lock is uncontended. Memory is bounded by `capacity` tables;
// slot buffers are allocated once, on first use, and reused, so a hit
// allocates nothing. A Handle pins its entry (it cannot be evicted while a
// Handle lives). For the writer: mark_dirty() flags an entry; dirty entries
// are written back through the writeback hook before eviction and by
// flush(), which lets the writer order caches (refcounts before L2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/result.hpp"
#include "image/io/file.hpp"

namespace qnbd::image::qcow2 {

class TableCache {
  struct Entry {
    std::uint64_t offset = 0;  // host offset of the table; valid only if used
    std::unique_ptr<std::byte[]> data;
    std::uint64_t last_use = 0;
    std::uint32_t pins = 0;
    bool used = false;
    bool dirty = false;
  };

 public:
  // Writes one table back to the file (set by the writer).
  using Writeback = std::function<Result<void>(std::uint64_t offset, std::span<const std::byte> table)>;

  class Handle {
   public:
    Handle() = default;
    Handle(Handle&& o) noexcept : cache_(o.cache_), entry_(o.entry_) { o.cache_ = nullptr; o.entry_ = nullptr; }
    Handle& operator=(Handle&& o) noexcept;
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() { reset(); }

    std::span<const std::byte> data() const;
    std::span<std::byte> mutable_data();  // caller must mark_dirty() afterwards
    std::uint64_t offset() const { return entry_->offset; }
    explicit operator bool() const { return entry_ != nullptr; }
    void reset();

   private:
    friend class TableCache;
    Handle(TableCache* c, Entry* e) : cache_(c), entry_(e) {}
    TableCache* cache_ = nullptr;
    Entry* entry_ = nullptr;
  };

  // table_bytes: cluster size; capacity: number of tables kept (>= 2).
  TableCache(File& file, std::size_t table_bytes, std::size_t capacity, const char* what);

  // The table at host offset `offset`, read from the file on a miss.
  [[nodiscard]] Result<Handle> get(std::uint64_t offset);
  void mark_dirty(Handle& h);
  // Write back every dirty entry (the writer flushes the file afterwards).
  [[nodiscard]] Result<void> flush();
  void set_writeback(Writeback wb);
  // Drop a table from the cache (it was freed); must not be pinned.
  void discard(std::uint64_t offset);

  std::size_t capacity() const { return entries_.size(); }
  std::size_t table_bytes() const { return table_bytes_; }
  // Statistics for tests.
  std::size_t cached_tables() const;
  std::uint64_t misses() const;
  std::size_t allocated_buffers() const;

 private:
  void unpin(Entry* e);

  File& file_;
  const std::size_t table_bytes_;
  const char* what_;
  mutable std::mutex mutex_;
  std::vector<Entry> entries_;  // fixed size: never reallocated after construction
  std::unordered_map<std::uint64_t, std::size_t> index_;
  Writeback writeback_;
  std::uint64_t tick_ = 0;
  std::uint64_t misses_ = 0;
};

}  // namespace qnbd::image::qcow2
