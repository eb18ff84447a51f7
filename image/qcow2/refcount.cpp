// Refcount entries, table/block management and the cluster allocator (qcow2.txt
// "Host cluster management"; table growth and crash ordering as QEMU's
// block/qcow2-refcount.c).
#include "image/qcow2/refcount.hpp"

#include <algorithm>
#include <unordered_set>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "image/qcow2/format.hpp"

namespace qnbd::image::qcow2 {

std::uint64_t get_refcount_entry(std::span<const std::byte> block, unsigned refcount_order, std::uint64_t index) {
  const std::byte* b = block.data();
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      // Sub-byte widths: the first entry takes the least significant bits.
      const unsigned bits = 1u << refcount_order;
      const std::uint64_t bit = index * bits;
      const unsigned value = std::to_integer<unsigned>(b[bit / 8]) >> (bit % 8);
      return value & ((1u << bits) - 1);
    }
    case 3: return std::to_integer<std::uint64_t>(b[index]);
    case 4: return load_be16(b + 2 * index);
    case 5: return load_be32(b + 4 * index);
    default: return load_be64(b + 8 * index);
  }
}

void set_refcount_entry(std::span<std::byte> block, unsigned refcount_order, std::uint64_t index, std::uint64_t value) {
  std::byte* b = block.data();
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const unsigned bits = 1u << refcount_order;
      const std::uint64_t bit = index * bits;
      const unsigned mask = ((1u << bits) - 1) << (bit % 8);
      const unsigned old = std::to_integer<unsigned>(b[bit / 8]);
      b[bit / 8] = static_cast<std::byte>((old & ~mask) | ((value << (bit % 8)) & mask));
      return;
    }
    case 3: b[index] = static_cast<std::byte>(value); return;
    case 4: store_be16(b + 2 * index, static_cast<std::uint16_t>(value)); return;
    case 5: store_be32(b + 4 * index, static_cast<std::uint32_t>(value)); return;
    default: store_be64(b + 8 * index, value); return;
  }
}

Refcounts::Refcounts(File& file, RefcountGeometry geometry, Options options)
    : file_(&file), geometry_(geometry), options_(options),
      cache_(std::make_unique<TableCache>(file, static_cast<std::size_t>(geometry.cluster_size()),
                                          std::max<std::size_t>(options.max_cached_blocks, 2), "refcount block")) {}

Result<Refcounts> Refcounts::load(File& file, RefcountGeometry geometry, std::uint64_t refcount_table_offset,
                                  std::uint32_t refcount_table_clusters, Options options) {
  if (geometry.cluster_bits < MIN_CLUSTER_BITS || geometry.cluster_bits > MAX_CLUSTER_BITS ||
      geometry.refcount_order > MAX_REFCOUNT_ORDER) {
    return make_error(EINVAL, "invalid refcount geometry");
  }
  const std::uint64_t cluster_size = geometry.cluster_size();
  const std::uint64_t file_size = QNBD_TRY(file.size());
  const std::uint64_t table_bytes = std::uint64_t{refcount_table_clusters} * cluster_size;
  // QEMU's qcow2_do_open: at least one cluster, at most 8 MiB.
  if (refcount_table_clusters == 0 || table_bytes > MAX_REFTABLE_BYTES) {
    return make_error(EIO, "refcount table size {} clusters is invalid", refcount_table_clusters);
  }
  if (!is_aligned(refcount_table_offset, cluster_size) || refcount_table_offset == 0 ||
      !range_within(refcount_table_offset, table_bytes, file_size)) {
    return make_error(EIO, "refcount table at {:#x} ({} bytes) is misaligned or outside the file",
                      refcount_table_offset, table_bytes);
  }
  Refcounts r(file, geometry, options);
  r.table_offset_ = refcount_table_offset;
  r.table_clusters_ = refcount_table_clusters;
  std::vector<std::byte> raw(table_bytes);
  QNBD_TRY(file.read_exact(raw, refcount_table_offset, "refcount table"));
  r.table_.resize(table_bytes / 8);
  for (std::size_t i = 0; i < r.table_.size(); i++) {
    const std::uint64_t e = load_be64(raw.data() + 8 * i);
    const std::uint64_t offset = e & REFT_OFFSET_MASK;
    // Reserved bits zero, aligned (qcow2.txt "Host cluster management"), inside
    // the file.
    if (e & REFT_RESERVED_MASK) {
      return make_error(EIO, "refcount table entry {} has reserved bits set ({:#x})", i, e);
    }
    if (offset != 0 && (!is_aligned(offset, cluster_size) || !range_within(offset, cluster_size, file_size))) {
      return make_error(EIO, "refcount block {} offset {:#x} is misaligned or outside the file", i, offset);
    }
    r.table_[i] = offset;
  }
  r.end_cluster_ = div_round_up(file_size, cluster_size);
  return r;
}

Result<void> Refcounts::sync_if_ordered() {
  if (options_.ordered_flushes) QNBD_TRY(file_->flush());
  return ok();
}

Result<void> Refcounts::attach_metadata_map(MetadataMap* map) {
  const std::uint64_t cs = geometry_.cluster_size();
  const std::uint64_t table_bytes = std::uint64_t{table_clusters_} * cs;
  if (auto hit = map->find(table_offset_, table_bytes)) {
    return make_error(EINVAL, "refcount table at {:#x} overlaps the {} at {:#x}", table_offset_,
                      metadata_kind_name(hit->kind), hit->cluster_offset);
  }
  // Each block is checked against the metadata already registered and
  // against the blocks before it, then all are registered in one sorted
  // merge. Registering them one at a time, each after a lookup, moved the
  // map's tail for every block: quadratic in the table's length, so a
  // crafted table naming a million scattered blocks took minutes to open.
  // Blocks are single aligned clusters, so two of them overlap only when
  // their offsets are equal.
  map->add(MetadataKind::refcount_table, table_offset_, table_bytes);
  std::vector<std::uint64_t> blocks;
  std::unordered_set<std::uint64_t> seen;
  for (std::size_t i = 0; i < table_.size(); i++) {
    if (table_[i] == 0) continue;
    if (seen.contains(table_[i])) {
      map->remove(MetadataKind::refcount_table, table_offset_, table_bytes);
      return make_error(EINVAL, "refcount block {} at {:#x} overlaps the {} at {:#x}", i, table_[i],
                        metadata_kind_name(MetadataKind::refcount_block), table_[i]);
    }
    if (auto hit = map->find(table_[i], cs)) {
      map->remove(MetadataKind::refcount_table, table_offset_, table_bytes);
      return make_error(EINVAL, "refcount block {} at {:#x} overlaps the {} at {:#x}", i, table_[i],
                        metadata_kind_name(hit->kind), hit->cluster_offset);
    }
    seen.insert(table_[i]);
    blocks.push_back(table_[i]);
  }
  map->add_clusters(MetadataKind::refcount_block, blocks, cs);
  map_ = map;
  // Every block write-back is checked too (captures the map and the file,
  // not this object, which may still be moved).
  cache_->set_writeback([map, file = file_](std::uint64_t offset, std::span<const std::byte> data) -> Result<void> {
    QNBD_TRY(map->check(offset, data.size(), kind_bit(MetadataKind::refcount_block)));
    return file->pwrite(data, offset);
  });
  return ok();
}

Result<TableCache::Handle> Refcounts::block(std::uint64_t ti) {
  if (ti >= table_.size() || table_[ti] == 0) return TableCache::Handle{};
  return cache_->get(table_[ti]);
}

Result<void> Refcounts::cache_new_block(std::uint64_t offset, std::span<const std::byte> data) {
  TableCache::Handle h = QNBD_TRY(cache_->get_empty(offset));
  std::copy(data.begin(), data.end(), h.mutable_data().begin());
  return ok();
}

Result<std::uint64_t> Refcounts::get(std::uint64_t cluster_index) {
  const std::uint64_t ti = cluster_index >> geometry_.block_entries_bits();
  const TableCache::Handle b = QNBD_TRY(block(ti));
  if (!b) return std::uint64_t{0};
  return get_refcount_entry(b.data(), geometry_.refcount_order, cluster_index & (geometry_.block_entries() - 1));
}

Result<void> Refcounts::set(std::uint64_t cluster_index, std::uint64_t value) {
  return set_internal(cluster_index, value, 0);
}

Result<void> Refcounts::set_internal(std::uint64_t cluster_index, std::uint64_t value, unsigned depth) {
  if (value > max_refcount(geometry_.refcount_order)) {
    return make_error(EOVERFLOW, "refcount {} exceeds the maximum for refcount_bits {}", value,
                      1u << geometry_.refcount_order);
  }
  const std::uint64_t ti = cluster_index >> geometry_.block_entries_bits();
  if (ti >= table_.size()) {
    if (value == 0) return ok();  // uncovered clusters already count 0
    QNBD_TRY(grow_table(ti + 1));
  }
  if (table_[ti] == 0) {
    if (value == 0) return ok();
    QNBD_TRY(create_block(ti, depth));
  }
  TableCache::Handle b = QNBD_TRY(block(ti));
  if (!b) return make_error(EIO, "refcount block {} vanished", ti);
  set_refcount_entry(b.mutable_data(), geometry_.refcount_order, cluster_index & (geometry_.block_entries() - 1),
                     value);
  cache_->mark_dirty(b);
  if (value != 0 && cluster_index >= end_cluster_) end_cluster_ = cluster_index + 1;
  if (value == 0 && cluster_index < free_hint_) free_hint_ = cluster_index;
  return ok();
}

Result<void> Refcounts::update(std::uint64_t host_offset, std::uint64_t length, std::int64_t addend) {
  if (length == 0) return ok();
  const unsigned cb = geometry_.cluster_bits;
  const auto end = checked_add(host_offset, length);
  if (!end) return make_error(EINVAL, "refcount update range overflows");
  const std::uint64_t first = host_offset >> cb;
  const std::uint64_t last = (*end - 1) >> cb;
  const std::uint64_t max = max_refcount(geometry_.refcount_order);
  // Validate the whole range first so a failure changes nothing.
  for (std::uint64_t ci = first; ci <= last; ci++) {
    const std::uint64_t rc = QNBD_TRY(get(ci));
    if (addend < 0 && rc < static_cast<std::uint64_t>(-addend)) {
      return make_error(EIO, "refcount of cluster {:#x} would drop below zero", ci << cb);
    }
    if (addend > 0 && max - rc < static_cast<std::uint64_t>(addend)) {
      return make_error(EOVERFLOW, "refcount of cluster {:#x} would exceed {}", ci << cb, max);
    }
  }
  for (std::uint64_t ci = first; ci <= last; ci++) {
    const std::uint64_t rc = QNBD_TRY(get(ci));
    QNBD_TRY(set(ci, rc + static_cast<std::uint64_t>(addend)));
  }
  return ok();
}

Result<std::uint64_t> Refcounts::find_free(std::uint64_t n) {
  std::uint64_t run_start = free_hint_;
  std::uint64_t run = 0;
  bool all_used_before = true;
  for (std::uint64_t ci = free_hint_;; ci++) {
    if (ci >> (56 - geometry_.cluster_bits) != 0) {
      return make_error(ENOSPC, "no free host cluster below the 56-bit offset limit");
    }
    bool busy = reserved_ && reserved_(ci);
    for (const auto& [start, count] : pending_) {
      if (ci >= start && ci - start < count) busy = true;
    }
    if (!busy) busy = QNBD_TRY(get(ci)) != 0;
    if (busy) {
      run = 0;
      run_start = ci + 1;
      if (all_used_before) free_hint_ = ci + 1;
      continue;
    }
    all_used_before = false;
    if (++run == n) return run_start;
  }
}

Result<std::uint64_t> Refcounts::allocate(std::uint64_t n) {
  if (n == 0) return make_error(EINVAL, "cannot allocate 0 clusters");
  const std::uint64_t first = QNBD_TRY(find_free(n));
  // A cluster that holds metadata but counts 0 (a corrupt image) must not
  // be handed out: the caller would write guest data or a new table there.
  if (map_) QNBD_TRY(map_->check(first << geometry_.cluster_bits, n << geometry_.cluster_bits));
  // While the run's refcounts are being raised, new refcount blocks or a
  // moved table must not land inside it.
  pending_.emplace_back(first, n);
  Result<void> r = ok();
  for (std::uint64_t i = 0; i < n && r; i++) r = set_internal(first + i, 1, 0);
  pending_.pop_back();
  if (!r) return std::move(r).error();
  return first << geometry_.cluster_bits;
}

Result<void> Refcounts::write_table_entry(std::uint64_t ti) {
  std::byte e[8];
  store_be64(e, table_[ti]);
  if (map_) QNBD_TRY(map_->check(table_offset_ + ti * 8, 8, kind_bit(MetadataKind::refcount_table)));
  return file_->pwrite(e, table_offset_ + ti * 8);
}

Result<void> Refcounts::create_block(std::uint64_t ti, unsigned depth) {
  if (depth > 8) return make_error(EIO, "refcount block allocation does not converge");
  const std::uint64_t c = QNBD_TRY(find_free(1));
  if (map_) QNBD_TRY(map_->check(c << geometry_.cluster_bits, geometry_.cluster_size()));
  const std::uint64_t c_ti = c >> geometry_.block_entries_bits();
  const std::uint64_t offset = c << geometry_.cluster_bits;
  std::vector<std::byte> data(geometry_.cluster_size(), std::byte{0});
  if (c_ti == ti) {
    // The block describes itself (as QEMU's alloc_refcount_block allows).
    set_refcount_entry(data, geometry_.refcount_order, c & (geometry_.block_entries() - 1), 1);
  } else {
    // Another block covers the new one: raise that refcount and make it
    // durable before anything points at the new block.
    pending_.emplace_back(c, 1);
    Result<void> r = set_internal(c, 1, depth + 1);
    pending_.pop_back();
    QNBD_TRY(std::move(r));
    QNBD_TRY(flush());
    if (table_[ti] != 0) {
      // A nested allocation created this very block meanwhile; give the
      // cluster back (it was never referenced).
      return set_internal(c, 0, depth + 1);
    }
  }
  // The block's contents hit the disk before the table entry points at it.
  QNBD_TRY(file_->pwrite(data, offset));
  QNBD_TRY(sync_if_ordered());
  table_[ti] = offset;
  if (map_) map_->add(MetadataKind::refcount_block, offset, data.size());
  QNBD_TRY(write_table_entry(ti));
  if (c >= end_cluster_) end_cluster_ = c + 1;
  return cache_new_block(offset, data);
}

Result<void> Refcounts::grow_table(std::uint64_t min_entries) {
  const unsigned eb = geometry_.block_entries_bits();
  const std::uint64_t per_cluster = geometry_.table_entries_per_cluster();
  const std::uint64_t cluster_size = geometry_.cluster_size();
  const std::uint64_t old_entries = table_.size();
  const std::uint64_t old_offset = table_offset_;
  const std::uint32_t old_clusters = table_clusters_;

  // The new table and the refcount blocks describing it go after everything
  // in use, as QEMU does: no free-space search can then collide with them.
  std::uint64_t start = end_cluster_;
  for (const auto& [s, count] : pending_) start = std::max(start, s + count);
  const std::uint64_t want = std::max({min_entries, old_entries + old_entries / 2, std::uint64_t{1}});

  auto missing_blocks = [&](std::uint64_t first_ti, std::uint64_t last_ti) {
    std::uint64_t n = 0;
    for (std::uint64_t ti = first_ti; ti <= last_ti; ti++) {
      if (ti >= old_entries || table_[ti] == 0) n++;
    }
    return n;
  };
  // Fixed point: blocks_n blocks followed by table_n table clusters, all
  // covered by blocks and all addressable by the table.
  std::uint64_t blocks_n = 0;
  std::uint64_t table_n = div_round_up(want, per_cluster);
  for (int iter = 0;; iter++) {
    if (iter > 64) return make_error(EIO, "refcount table growth does not converge");
    const std::uint64_t area_end = start + blocks_n + table_n;
    const std::uint64_t first_ti = start >> eb;
    const std::uint64_t last_ti = (area_end - 1) >> eb;
    const std::uint64_t t = div_round_up(std::max(want, last_ti + 1), per_cluster);
    const std::uint64_t b = missing_blocks(first_ti, last_ti);
    if (t == table_n && b == blocks_n) break;
    table_n = std::max(t, table_n);
    blocks_n = std::max(b, blocks_n);
  }
  if (table_n * cluster_size > MAX_REFTABLE_BYTES) {
    return make_error(ENOSPC, "the refcount table would exceed {} bytes", MAX_REFTABLE_BYTES);
  }

  const std::uint64_t area_end = start + blocks_n + table_n;
  if (map_) QNBD_TRY(map_->check(start << geometry_.cluster_bits, (area_end - start) << geometry_.cluster_bits));
  std::vector<std::uint64_t> new_table(table_n * per_cluster, 0);
  std::copy(table_.begin(), table_.end(), new_table.begin());
  std::unordered_map<std::uint64_t, std::vector<std::byte>> new_blocks;
  std::uint64_t next_block = start;
  for (std::uint64_t ti = start >> eb; ti <= (area_end - 1) >> eb; ti++) {
    if (ti < old_entries && table_[ti] != 0) continue;
    new_table[ti] = next_block++ << geometry_.cluster_bits;
    new_blocks[ti].assign(cluster_size, std::byte{0});
  }
  // Refcount 1 for every cluster of the new area, in a new block or in an
  // existing (cached, dirty) one.
  for (std::uint64_t ci = start; ci < area_end; ci++) {
    const std::uint64_t ti = ci >> eb;
    if (auto it = new_blocks.find(ti); it != new_blocks.end()) {
      set_refcount_entry(it->second, geometry_.refcount_order, ci & (geometry_.block_entries() - 1), 1);
    } else {
      TableCache::Handle b = QNBD_TRY(block(ti));
      if (!b) return make_error(EIO, "refcount block {} vanished", ti);
      set_refcount_entry(b.mutable_data(), geometry_.refcount_order, ci & (geometry_.block_entries() - 1), 1);
      cache_->mark_dirty(b);
    }
  }
  // 1. blocks and table contents, then flush: nothing points at them yet.
  for (const auto& [ti, data] : new_blocks) QNBD_TRY(file_->pwrite(data, new_table[ti]));
  std::vector<std::byte> raw(table_n * cluster_size);
  for (std::size_t i = 0; i < new_table.size(); i++) store_be64(raw.data() + 8 * i, new_table[i]);
  const std::uint64_t new_offset = (start + blocks_n) << geometry_.cluster_bits;
  QNBD_TRY(file_->pwrite(raw, new_offset));
  QNBD_TRY(flush());  // dirty existing blocks + fdatasync
  // 2. switch the header: refcount_table_offset (byte 48) and
  // refcount_table_clusters (byte 56) are adjacent, so one write moves both.
  std::byte hdr[12];
  store_be64(hdr, new_offset);
  store_be32(hdr + 8, static_cast<std::uint32_t>(table_n));
  QNBD_TRY(file_->pwrite(hdr, 48));
  QNBD_TRY(sync_if_ordered());
  if (map_) {
    for (const auto& [ti, data] : new_blocks) map_->add(MetadataKind::refcount_block, new_table[ti], cluster_size);
    map_->add(MetadataKind::refcount_table, new_offset, table_n * cluster_size);
    map_->remove(MetadataKind::refcount_table, old_offset, std::uint64_t{old_clusters} * cluster_size);
  }
  table_ = std::move(new_table);
  table_offset_ = new_offset;
  table_clusters_ = static_cast<std::uint32_t>(table_n);
  end_cluster_ = std::max(end_cluster_, area_end);
  for (const auto& [ti, data] : new_blocks) QNBD_TRY(cache_new_block(table_[ti], data));
  // 3. only now free the old table; a crash before this point leaks it.
  if (old_clusters != 0) {
    QNBD_TRY(update(old_offset, std::uint64_t{old_clusters} * cluster_size, -1));
  }
  return ok();
}

Result<void> Refcounts::flush() {
  QNBD_TRY(cache_->flush());
  return file_->flush();
}

}  // namespace qnbd::image::qcow2
