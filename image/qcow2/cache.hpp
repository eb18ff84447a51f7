// TableCache: a bounded cache of cluster-sized metadata tables, as QEMU's
// qcow2-cache.c. One class serves both kinds the engine caches: L2 tables
// (Qcow2Image) and refcount blocks (Refcounts), one instance each.
//
// Thread-safe (own mutex). The engine calls it under its metadata mutex, so
// the internal lock is uncontended. Memory is bounded by `capacity` tables;
// slot buffers are allocated once, on first use, and reused, so a hit
// allocates nothing. A Handle pins its entry (it cannot be evicted while a
// Handle lives). For the writer: mark_dirty() flags an entry; dirty entries
// are written back (through the writeback hook, or straight to the file)
// before eviction and by flush().
//
// Write-back order (QEMU's refcounts before pointers; its
// qcow2_cache_set_dependency and qcow2_cache_depends_on_flush). An L2 entry may
// point at a cluster whose refcount is only raised in the refcount block cache,
// or whose data was written but not synced. So before this cache writes back
// ANY entry, it runs flush_dependency():
//  1. the dependency cache (set_dependency: the L2 cache depends on the
//     refcount block cache) writes back all its dirty entries, then
//  2. if step 1 wrote anything, or depends_on_flush() was called since the
//     last sync, the sync hook runs (set_sync; default: flush the file).
// A crash can then leak a cluster (refcount on disk, no pointer) but never
// leave a pointer to a cluster whose refcount or data is not on disk.
// The dependency is one-way (refcount blocks depend on nothing), so the lock
// order is: this cache's mutex, then the dependency's.
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
  // Writes one table back to the file (optional: the default is a plain
  // pwrite to the cache's file; the writer adds its overlap check).
  using Writeback = std::function<Result<void>(std::uint64_t offset, std::span<const std::byte> table)>;

  class Handle {
   public:
    Handle() = default;
    Handle(Handle&& o) noexcept : cache_(o.cache_), entry_(o.entry_) {
      o.cache_ = nullptr;
      o.entry_ = nullptr;
    }
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
  // The table at host offset `offset` for a table being created: zeroed,
  // not read (QEMU's qcow2_cache_get_empty). Replaces a cached copy.
  [[nodiscard]] Result<Handle> get_empty(std::uint64_t offset);
  void mark_dirty(Handle& h);
  // Write back every dirty entry, dependencies first (see above). The file
  // itself is not synced afterwards: the owner decides when.
  [[nodiscard]] Result<void> flush();
  void set_writeback(Writeback wb);
  // Drop a table from the cache (it was freed); must not be pinned.
  void discard(std::uint64_t offset);

  // Write-back dependencies (see above). `dependency` must outlive this
  // cache and must not depend on it.
  void set_dependency(TableCache* dependency);
  // Something this cache's entries will point at was written: sync before
  // the next write-back.
  void depends_on_flush();
  using Sync = std::function<Result<void>()>;
  void set_sync(Sync sync);
  // Steps 1 and 2 above now (a caller about to write a pointer itself, e.g.
  // an L1 entry to a new L2 table, or a flush).
  [[nodiscard]] Result<void> flush_dependency();
  bool has_dirty() const;

  std::size_t capacity() const { return entries_.size(); }
  std::size_t table_bytes() const { return table_bytes_; }
  // Statistics for tests.
  std::size_t cached_tables() const;
  std::uint64_t misses() const;
  std::size_t allocated_buffers() const;

 private:
  void unpin(Entry* e);
  // A slot for a new table at `offset` (evicting the LRU unpinned entry,
  // written back first if dirty), unused and unpinned.
  Result<std::size_t> take_slot_locked();
  Result<void> write_back_locked(Entry& e);
  Result<void> flush_dependency_locked();

  File& file_;
  const std::size_t table_bytes_;
  const char* what_;
  mutable std::mutex mutex_;
  std::vector<Entry> entries_;  // fixed size: never reallocated after construction
  std::unordered_map<std::uint64_t, std::size_t> index_;
  Writeback writeback_;
  TableCache* dependency_ = nullptr;
  bool needs_sync_ = false;  // depends_on_flush() since the last sync
  Sync sync_;
  std::uint64_t tick_ = 0;
  std::uint64_t misses_ = 0;
};

}  // namespace qnbd::image::qcow2
