// qcow2 check and repair; see check.hpp. Message wording and the counting
// rules (what is a leak, what a corruption, when the refcount structure must
// be rebuilt) follow qemu-img check so both tools report the same numbers.
#include "image/qcow2/check.hpp"

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "image/qcow2/cluster.hpp"
#include "image/qcow2/format.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/overlap.hpp"
#include "image/qcow2/refcount.hpp"

namespace qnbd::image::qcow2 {
namespace {
// printf's "%#x": like {:#x} but plain "0" for zero, as QEMU's messages.
// A value, not a string, so that a message nobody listens to (say() with no
// sink) formats nothing: a crafted image reports one message per reference.
struct CHex {
  std::uint64_t v;
};
}  // namespace
}  // namespace qnbd::image::qcow2

template <>
struct fmt::formatter<qnbd::image::qcow2::CHex> : fmt::formatter<std::uint64_t> {
  template <typename FormatContext>
  auto format(qnbd::image::qcow2::CHex h, FormatContext& ctx) const {
    return h.v ? fmt::format_to(ctx.out(), "{:#x}", h.v) : fmt::format_to(ctx.out(), "0");
  }
};

namespace qnbd::image::qcow2 {
namespace {

// References past the end of the file are counted in a map; this many
// distinct ones means the metadata is garbage and we stop counting.
constexpr std::size_t kMaxBeyondEof = 1 << 20;

// The two loops below have no branch worth steering a fuzzer by, yet under
// libFuzzer's comparison tracing they cost more than the rest of a check of
// a large sparse table (fuzz/README.md "Long runs"): leave them
// uninstrumented there. No effect on gcc builds.
// (Not inlined: the coverage pass runs after inlining, and would
// instrument the loop again inside its callers.)
#if defined(__clang__)
#define QNBD_CHECK_NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline))
#else
#define QNBD_CHECK_NO_COVERAGE
#endif

// Big-endian table entries (qcow2.txt: all numbers are big endian) to host
// order, in place.
QNBD_CHECK_NO_COVERAGE void decode_be64_table(std::uint64_t* table, std::size_t entries) {
  for (std::size_t i = 0; i < entries; i++) table[i] = load_be64(&table[i]);
}

// The index of the first of `entries` table entries, from `from` on, that
// has a bit set (an entry is `words` 64-bit words: 2 for extended L2
// entries), or `entries` if there is none. A zero entry (unallocated, empty
// bitmap) is what most of a sparse table holds, and every walk skips it;
// byte order does not matter for that test.
QNBD_CHECK_NO_COVERAGE std::size_t next_nonzero_entry(const void* table, std::size_t words, std::size_t from,
                                                      std::size_t entries) {
  const auto* p = static_cast<const unsigned char*>(table);
  for (std::size_t i = from; i < entries; i++) {
    std::uint64_t any = 0;
    for (std::size_t k = 0; k < words; k++) {
      std::uint64_t w;
      std::memcpy(&w, p + (i * words + k) * 8, 8);
      any |= w;
    }
    if (any) return i;
  }
  return entries;
}

class Checker {
 public:
  Checker(File& file, RepairMode fix, const CheckMessageSink& sink) : file_(file), fix_(fix), sink_(sink) {}

  Result<CheckResult> run() {
    file_size_ = QNBD_TRY(file_.size());
    h_ = QNBD_TRY(read_header(file_, file_size_));
    cb_ = h_.cluster_bits;
    cs_ = h_.cluster_size();
    nb_clusters_ = div_round_up(file_size_, cs_);
    res_.total_clusters = div_round_up(h_.size, cs_);
    load_refcount_table();
    report_incomplete_snapshots();

    calculate_refcounts();
    if (aborted_) return res_;
    // A first pass only reports (QEMU's pre-compare); repairs follow.
    const std::uint64_t errors_before_compare = res_.check_errors;
    compare_refcounts(RepairMode::none);
    if (rebuild_ && fix_ == RepairMode::all) {
      // Unreadable stored refcounts stop mattering once they are rebuilt.
      res_.check_errors = errors_before_compare;
      say("Rebuilding refcount structure");
      if (auto r = rebuild_refcount_structure(); !r) {
        say("ERROR rebuilding refcount structure: {}", r.error().message);
        res_.check_errors++;
        return res_;
      }
      // As QEMU, recount against the new structure: what is left is what
      // a following check finds, not a guess from the first walk (growing
      // the file can turn a reference past its end into a valid one).
      const CheckResult old = res_;
      res_ = CheckResult{};
      // The fixes the first walk queued may name entries the new structure
      // no longer reaches (fuzz/corpus/check/repair-compressed-copied-fix-
      // after-rebuild: the L1 table lies in the header cluster, so the new
      // refcount_table_offset changed L1 entries and an L2 table fell out
      // of the walk). Fixing one would count a corruption as fixed that
      // the recount never counted (36 reported left, 37 found) and write
      // into a cluster that is free now. The recount queues its own.
      compressed_copied_fixes_.clear();
      calculate_refcounts();
      // And as QEMU, fix the leaks this recount finds against the new
      // structure (a table or block of the old one that something else
      // still names keeps the count the rebuild gave it): only leaks it
      // cannot fix are left.
      if (auto w = Refcounts::load(file_, RefcountGeometry{cb_, h_.refcount_order}, h_.refcount_table_offset,
                                   h_.refcount_table_clusters)) {
        compare_refcounts(RepairMode::leaks,
                          [&](std::uint64_t k, std::uint64_t v) { return w->set(k, v).has_value(); });
        if (!w->flush()) res_.check_errors++;
        drop_cached_blocks();  // re-read what was just written
      } else {
        compare_refcounts(RepairMode::none);
      }
      if (rebuild_) say("ERROR rebuilt refcount structure is still broken");
      // The recount walks the structure only; incomplete snapshot entries,
      // reported once before it, are still there, and are counted again
      // (not reported again): the new structure may have grown the file
      // under a snapshot table that ran past its end, so more of its
      // entries are read now (fuzz/corpus/check/repair-grows-file-under-
      // snapshot-table: 6,369 incomplete entries before the rebuild, 7,424
      // after, and the repair said 1,055 fewer were left than a following
      // check found).
      const std::uint64_t incomplete = count_incomplete_snapshots(nullptr);
      const std::uint64_t left = res_.corruptions + incomplete, leaks_left = res_.leaks;
      const std::uint64_t errors = res_.check_errors;
      res_ = old;
      res_.check_errors += errors;
      if (left < res_.corruptions) res_.corruptions_fixed += res_.corruptions - left;
      if (leaks_left < res_.leaks) res_.leaks_fixed += res_.leaks - leaks_left;
      res_.corruptions = left;
      res_.leaks = leaks_left;
    } else if (fix_ != RepairMode::none) {
      if (rebuild_) {
        say("ERROR need to rebuild refcount structures");
        res_.check_errors++;
        return res_;
      }
      if (res_.leaks || res_.corruptions) {
        res_.leaks = 0;
        res_.corruptions = unrepairable_ + overflows_;
        QNBD_TRY(apply_in_place_fixes());
      }
    }
    if (aborted_) return res_;
    QNBD_TRY(check_oflag_copied());
    if (aborted_) return res_;
    for (const auto& [where, entry] : compressed_copied_fixes_) {
      std::byte e[8];
      store_be64(e, entry);
      if (!write_allowed(where, 8, MetadataKind::active_l2)) {
        res_.check_errors++;
        continue;
      }
      if (file_.pwrite(e, where)) {
        // Counted as a corruption by the walk (and so kept by the repair
        // paths above): it is fixed now.
        res_.corruptions_fixed++;
        if (res_.corruptions) res_.corruptions--;
      } else {
        res_.check_errors++;
      }
    }
    if (!compressed_copied_fixes_.empty()) QNBD_TRY(file_.flush());
    // A fix can grow the file after the last count (a COPIED fix in an L2
    // table that runs past the end, a new refcount block: QEMU's repairs
    // write there too), and a reference that ran a cluster or more past
    // the old end may now name clusters inside it, whose refcounts a
    // following check finds wrong (fuzz/corpus/check/repair-in-place-fix-
    // grows-file: 21 reported left, 22 found). Then what is left is what a
    // fresh check, without repairs or messages, finds.
    if (fix_ != RepairMode::none && QNBD_TRY(file_.size()) != file_size_) {
      const CheckMessageSink quiet;
      Checker again(file_, RepairMode::none, quiet);
      if (auto left = again.run()) {
        res_.corruptions = left->corruptions;
        res_.leaks = left->leaks;
        res_.check_errors += left->check_errors;
      } else {
        res_.check_errors++;
      }
    }
    // A successful repair makes the image clean and consistent again: clear
    // the dirty bit (refcounts are now exact) and the corrupt bit, as QEMU
    // does, in one write of incompatible_features after everything else is
    // on disk.
    const std::uint64_t clear = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
    if (fix_ != RepairMode::none && res_.check_errors == 0 && res_.corruptions == 0 && h_.version >= 3 &&
        (h_.incompatible_features & clear)) {
      std::byte e[8];
      store_be64(e, h_.incompatible_features & ~clear);
      QNBD_TRY(file_.flush());
      QNBD_TRY(file_.pwrite(e, 72));
      QNBD_TRY(file_.flush());
    }
    return res_;
  }

 private:
  // A view, not a string: the fixed lines come from loops a crafted image
  // can run millions of times (one overflow line per reference), and a
  // caller without a sink should not pay for building each one.
  void say(std::string_view line) {
    if (sink_) sink_(std::string(line));
  }
  // Formats only for a caller that listens: a crafted image can make check
  // report hundreds of thousands of defects, and a caller that passes no
  // sink (the fuzz target) should not pay for their text.
  template <typename... Args>
  void say(fmt::format_string<Args...> format, Args&&... args) {
    if (sink_) sink_(fmt::format(format, std::forward<Args>(args)...));
  }

  // ---- computed refcounts --------------------------------------------
  void inc(std::uint64_t offset, std::uint64_t length) {
    if (length == 0) return;
    const auto end = checked_add(offset, length);
    if (!end) {
      res_.check_errors++;
      return;
    }
    if (*end > file_size_ && *end - file_size_ >= cs_) {
      // QEMU refuses to count these; the reference itself is the defect.
      say("ERROR: counting reference for region exceeding the end of the file by one "
          "cluster or more: offset {} size {}",
          CHex{offset}, CHex{length});
      res_.corruptions++;
      // The rebuild must not place refcount structures there: growing the
      // file would make that reference valid and the cluster doubly used.
      if (refused_.size() < kMaxBeyondEof || refused_.count(offset >> cb_)) {
        auto& last = refused_[offset >> cb_];
        last = std::max(last, ((*end - 1) >> cb_) + 1);
      } else {
        res_.check_errors++;
      }
      return;
    }
    const std::uint64_t max = max_refcount(h_.refcount_order);
    for (std::uint64_t k = offset >> cb_; k <= (*end - 1) >> cb_; k++) {
      std::uint64_t* count;
      if (k < computed_.size()) {
        count = &computed_[k];
      } else if (auto at = beyond_.lower_bound(k); at != beyond_.end() && at->first == k) {
        count = &at->second;
      } else if (beyond_.size() < kMaxBeyondEof) {
        count = &beyond_.emplace_hint(at, k, 0)->second;
      } else {
        res_.check_errors++;
        return;
      }
      // As QEMU: a count the image's refcount width cannot hold is a
      // corruption (refcount_bits=1 and a cluster shared by a snapshot).
      if (*count == max) {
        say("ERROR: overflow cluster offset=0x{:x}", k << cb_);
        say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if "
            "the image cannot be opened for writing");
        res_.corruptions++;
        overflows_++;  // no repair fixes it: the refcount width is too small
        overflowed_.insert(k);
        continue;
      }
      ++*count;
    }
  }

  // ---- stored refcounts ----------------------------------------------
  void load_refcount_table() {
    rt_.clear();
    drop_cached_blocks();
    metadata_.reset();  // the refcount structure it names may have moved
    const std::uint64_t bytes = std::uint64_t{h_.refcount_table_clusters} * cs_;
    rt_.resize(bytes / 8);
    if (!file_.read_exact(std::as_writable_bytes(std::span(rt_)), h_.refcount_table_offset, "refcount table")) {
      rt_.clear();
      res_.check_errors++;
      return;
    }
    decode_be64_table(rt_.data(), rt_.size());
  }

  bool block_usable(std::uint64_t offset) const {
    return offset != 0 && is_aligned(offset, cs_) && (offset >> cb_) < nb_clusters_;
  }

  // The stored refcount, or nullopt if its refcount block is misaligned or
  // beyond what QEMU can read (QEMU's qcow2_get_refcount fails with EIO).
  std::optional<std::uint64_t> stored(std::uint64_t k) {
    const unsigned bits = cb_ + 3 - h_.refcount_order;
    const std::uint64_t ti = k >> bits;
    if (ti >= rt_.size()) return 0;
    const std::uint64_t offset = rt_[ti] & REFT_OFFSET_MASK;
    if (offset != 0 && !is_aligned(offset, cs_)) {
      if (!reported_bad_refblock_) {
        reported_bad_refblock_ = true;
        say("qcow2: Image is corrupt: Refblock offset {} unaligned (reftable "
            "index: {}); further non-fatal corruption events will be suppressed",
            CHex{offset}, CHex{ti});
      }
      return std::nullopt;
    }
    // QEMU's block layer refuses a read that ends past its largest length
    // (INT64_MAX rounded down to 1 GiB): EIO, where a block merely past the
    // end of the file reads as zeroes.
    constexpr std::uint64_t kBdrvMaxLength = 0x7fffffffc0000000ull;
    if (offset > kBdrvMaxLength || cs_ > kBdrvMaxLength - offset) return std::nullopt;
    if (!block_usable(offset)) return 0;  // blocks past EOF read as zeroes
    return get_refcount_entry(cached_block(offset), h_.refcount_order, k & ((1ull << bits) - 1));
  }

  // Refcount blocks by host offset, at most kBlockCacheBytes of them (the
  // oldest read is dropped first): a crafted table can name one block from
  // every slot, or far more blocks than fit in memory, and check must still
  // run in bounded memory, as qemu-img check does with its small cache.
  const std::vector<std::byte>& cached_block(std::uint64_t offset) {
    auto it = blocks_.find(offset);
    if (it != blocks_.end()) return it->second;
    const std::size_t max_blocks = std::max<std::size_t>(4, kBlockCacheBytes / cs_);
    std::vector<std::byte> b;
    if (blocks_.size() >= max_blocks) {
      auto old = blocks_.find(block_order_.front());
      b = std::move(old->second);  // reuse the buffer
      blocks_.erase(old);
      block_order_.pop_front();
    }
    b.resize(cs_);
    if (!file_.read_exact(b, offset, "refcount block")) {
      res_.check_errors++;
      std::fill(b.begin(), b.end(), std::byte{0});
    }
    block_order_.push_back(offset);
    return blocks_.emplace(offset, std::move(b)).first->second;
  }
  void drop_cached_blocks() {
    blocks_.clear();
    block_order_.clear();
  }

  // ---- repair writes ---------------------------------------------------
  // Every in-place repair write goes through QEMU's pre-write overlap
  // check first. A corrupt image can name its header or its L1 table as an
  // L2 table (an L1 entry with a zero offset field names the header), and a
  // repair of "that L2 table" would rewrite the header or the L1 table
  // (fuzz/corpus/check/8dfcb632...: the header's l1_size was overwritten
  // and the image no longer opened). On a hit, as qemu-img check -r: the
  // image is marked corrupt, the write is refused and the check stops.
  // Registered: the structures QEMU knows at open time that this check
  // can name cheaply (header, active L1 and the L2 tables it names,
  // refcount table and blocks, bitmap directory); snapshot tables and
  // inactive L1 tables are not. The L2 tables matter when the L1 table
  // names its own cluster as an L2 table: a COPIED repair of an L1 entry
  // then rewrites "L2 entries" (fuzz/corpus/check/repair-l1-entry-in-an-
  // active-l2-table: they became compressed entries with COPIED set, four
  // new corruptions), and qemu-img refuses that write (overlaps with
  // active L2 table).
  bool write_allowed(std::uint64_t offset, std::uint64_t bytes, MetadataKind target) {
    if (!metadata_) {
      metadata_.emplace(cb_);
      metadata_->add(MetadataKind::header, 0, cs_);
      metadata_->add(MetadataKind::active_l1, h_.l1_table_offset, std::uint64_t{h_.l1_size} * 8);
      metadata_->add(MetadataKind::refcount_table, h_.refcount_table_offset,
                     std::uint64_t{h_.refcount_table_clusters} * cs_);
      // A hostile table can name one block from every slot: register each
      // block once, in ascending order (each add is then cheap).
      std::vector<std::uint64_t> blocks;
      for (std::uint64_t e : rt_) {
        const std::uint64_t block = e & REFT_OFFSET_MASK;
        if (block && is_aligned(block, cs_) && block < file_size_) blocks.push_back(block);
      }
      std::sort(blocks.begin(), blocks.end());
      blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
      metadata_->add_clusters(MetadataKind::refcount_block, blocks, cs_);
      // QEMU's QCOW2_OL_ACTIVE_L2: every nonzero offset field of the
      // in-memory L1 table, aligned or not, inside the file or past it.
      if (h_.l1_size) {
        if (auto l1 = read_table(h_.l1_table_offset, h_.l1_size)) {
          std::vector<std::uint64_t> tables;
          for (std::uint64_t e : *l1)
            if (e & L1E_OFFSET_MASK) tables.push_back(e & L1E_OFFSET_MASK);
          std::sort(tables.begin(), tables.end());
          tables.erase(std::unique(tables.begin(), tables.end()), tables.end());
          metadata_->add_clusters(MetadataKind::active_l2, tables, cs_);
        }
      }
      // The snapshot table and the inactive L1 tables, as QEMU's cached
      // overlap check: an OFLAG_COPIED fix in an L2 table lying over the
      // snapshot table rewrote a snapshot entry (l1_size 0x80000000), and
      // the repair's count of what is left came out one short
      // (fuzz/corpus/check/repair-copied-fix-in-snapshot-table).
      metadata_->add(MetadataKind::snapshot_table, h_.snapshots_offset, snapshots_size_);
      metadata_->add_ranges(MetadataKind::inactive_l1, snapshot_l1_tables_);
      if (h_.bitmaps && (h_.autoclear_features & AUTOCLEAR_BITMAPS) &&
          h_.bitmaps->bitmap_directory_size <= MAX_BITMAP_DIRECTORY_SIZE)
        metadata_->add(MetadataKind::bitmap_directory, h_.bitmaps->bitmap_directory_offset,
                       h_.bitmaps->bitmap_directory_size);
    }
    const auto hit = metadata_->find(offset, bytes, kind_bit(target));
    if (!hit) return true;
    if (!marked_corrupt_) {
      marked_corrupt_ = true;
      say("qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with {}); further "
          "corruption events will be suppressed",
          // QEMU's name for the header in this message.
          hit->kind == MetadataKind::header ? "qcow2_header" : metadata_kind_name(hit->kind));
      if (h_.version >= 3) {
        std::byte e[8];
        store_be64(e, h_.incompatible_features | INCOMPAT_CORRUPT);
        if (!file_.pwrite(e, 72) || !file_.flush()) res_.check_errors++;
      }
    }
    return false;
  }

  // ---- the metadata walk ---------------------------------------------
  void calculate_refcounts() {
    computed_.assign(nb_clusters_, 0);
    overflows_ = 0;
    overflowed_.clear();
    beyond_.clear();
    refused_.clear();
    refstruct_blocks_.clear();
    inc(0, cs_);  // header cluster
    check_refcounts_l1(h_.l1_table_offset, h_.l1_size, true);
    if (aborted_) return;

    if (h_.has_data_file() && h_.nb_snapshots) {
      say("ERROR {} snapshots in image with data file", h_.nb_snapshots);
      res_.corruptions++;
    }
    check_snapshots();
    if (aborted_) return;
    inc(h_.refcount_table_offset, std::uint64_t{h_.refcount_table_clusters} * cs_);
    if (h_.crypto_header) inc(h_.crypto_header->offset, h_.crypto_header->length);
    check_bitmaps();
    // Defects of the references themselves (past the end of the file,
    // reserved bits, misaligned clusters, ...): no refcount repair removes
    // them, and qemu-img check -r reports them again.
    unrepairable_ = res_.corruptions - overflows_;
    check_refblocks();
  }

  Result<std::vector<std::uint64_t>> read_table(std::uint64_t offset, std::uint64_t entries) {
    // A table running past the end of the file fails the read below; say
    // so before allocating and zeroing it (up to 32 MiB for an L1 table).
    const std::uint64_t size = QNBD_TRY(file_.size());
    if (entries > size / 8 || !range_within(offset, entries * 8, size)) {
      return make_error(EIO, "table at {:#x} ({} entries) runs past the end of the file", offset, entries);
    }
    std::vector<std::uint64_t> t(entries);
    QNBD_TRY(file_.read_exact(std::as_writable_bytes(std::span(t)), offset, "table"));
    decode_be64_table(t.data(), t.size());
    return t;
  }

  void check_refcounts_l1(std::uint64_t l1_offset, std::uint32_t l1_size, bool active) {
    if (l1_size == 0) return;
    inc(l1_offset, std::uint64_t{l1_size} * 8);
    // As in check_refcounts_l2, the part of the table past the end of the
    // file reads as zeroes (QEMU's block layer) and holds nothing to walk:
    // read only what the file holds. Reading it whole cost a zeroed 32 MiB
    // buffer per snapshot, minutes for 4,096 snapshots naming L1 tables
    // past the end, and failed the read (an internal error per snapshot,
    // where qemu-img reports none: test-check-differential.sh).
    auto io_error = [this] {
      say("ERROR: I/O error in check_refcounts_l1");
      res_.check_errors++;
    };
    auto file_size = file_.size();
    if (!file_size) return io_error();
    const std::uint64_t entries =
        l1_offset >= *file_size ? 0 : std::min<std::uint64_t>(l1_size, div_round_up(*file_size - l1_offset, 8));
    // The table is walked in chunks of one reused buffer, and the host
    // file's holes in it are skipped (they read as zero entries): a crafted
    // image can name a mostly empty 32 MiB L1 table from each of thousands
    // of snapshots, and reading each whole into a fresh buffer cost minutes.
    // QEMU reads the table whole before walking it; chunks see the same
    // bytes, because nothing writes an L1 table during the walk (the no-
    // repair pass writes nothing; a repair's L2 entry fix is refused where
    // it would overlap any L1 table: write_allowed).
    for (std::uint64_t pos = 0; pos < entries;) {
      const std::uint64_t at = l1_offset + pos * 8;
      auto extent = file_.probe_extent(at, (entries - pos) * 8);
      if (!extent) return io_error();
      // Only entries wholly inside a hole are skipped; one that straddles
      // its end is read with the data after it.
      if (extent->hole && extent->length >= 8) {
        pos += extent->length / 8;
        continue;
      }
      const std::uint64_t n = std::min<std::uint64_t>(
          {entries - pos, kL1ChunkEntries, std::max<std::uint64_t>(1, div_round_up(extent->length, 8))});
      if (l1_buf_.size() < n) l1_buf_.resize(kL1ChunkEntries);
      const std::span chunk(l1_buf_.data(), n);
      if (!file_.read_zero_fill(std::as_writable_bytes(chunk), at)) return io_error();
      // Entries are decoded as the walk reaches them: most are zero.
      for (std::uint64_t k = next_nonzero_entry(chunk.data(), 1, 0, n); k < n;
           k = next_nonzero_entry(chunk.data(), 1, k + 1, n)) {
        if (!check_l1_entry(load_be64(&chunk[k]), active)) return;
      }
      pos += n;
    }
  }

  // One nonzero L1 entry of check_refcounts_l1: false when the check was
  // aborted.
  bool check_l1_entry(std::uint64_t l1e, bool active) {
    if (l1e & L1E_RESERVED_MASK) {
      say("ERROR found L1 entry with reserved bits set: {:x}", l1e);
      res_.corruptions++;
    }
    // A nonzero entry whose offset field is zero still names the table
    // at offset 0 (the header cluster): QEMU counts and walks it, so the
    // header's refcount comes out too high and the entry shows up.
    const std::uint64_t l2_offset = l1e & L1E_OFFSET_MASK;
    inc(l2_offset, cs_);
    if (!is_aligned(l2_offset, cs_)) {
      say("ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted", l2_offset);
      res_.corruptions++;
    }
    check_refcounts_l2(l2_offset, active);
    return !aborted_;
  }

  // How many of the L2 table's entries at l2_offset lie (at least in part)
  // inside the file; the rest read as zero entries, which check skips.
  std::uint64_t entries_in_file(std::uint64_t l2_offset, std::uint32_t esize) const {
    if (l2_offset >= file_size_) return 0;
    return std::min<std::uint64_t>(cs_ / esize, div_round_up(file_size_ - l2_offset, esize));
  }

  void check_refcounts_l2(std::uint64_t l2_offset, bool active) {
    // Fragmentation is judged within one L2 table, as QEMU does.
    std::uint64_t next_contiguous = 0;
    const std::uint32_t esize = h_.l2_entry_size();
    const bool ext = h_.extended_l2();
    // Like QEMU's block layer, bytes past the end of the file read as
    // zeroes, and a zero entry (unallocated, empty bitmap) changes nothing
    // below: read and walk only the entries the file holds. Without this,
    // an L1 table naming a table past EOF from each of its 65,000 slots
    // cost 65,000 zeroed 64 KiB buffers and 535 million empty iterations
    // per pass (fuzz/corpus/check/slow-l1-of-tables-past-eof).
    const std::uint64_t in_file = entries_in_file(l2_offset, esize);
    if (in_file == 0) return;
    std::vector<std::byte>& l2 = l2_buf_;  // one cluster, reused for every table
    l2.resize(cs_);
    if (!file_.read_zero_fill(l2, l2_offset)) {
      say("ERROR: I/O error in check_refcounts_l2");
      res_.check_errors++;
      return;
    }
    const std::size_t words = esize / 8;
    for (std::uint64_t i = next_nonzero_entry(l2.data(), words, 0, in_file); i < in_file;
         i = next_nonzero_entry(l2.data(), words, i + 1, in_file)) {
      const std::uint64_t e = load_be64(l2.data() + i * esize);
      const std::uint64_t bitmap = ext ? load_be64(l2.data() + i * esize + 8) : 0;
      if (e & QCOW_OFLAG_COMPRESSED) {
        const CompressedDescriptor d = parse_compressed_descriptor(e, cb_);
        if (e & QCOW_OFLAG_COPIED) {
          say("ERROR: coffset=0x{:x}: copied flag must never be set for compressed "
              "clusters",
              d.host_offset);
          res_.corruptions++;
          // QEMU only reports this; with -r all we also clear the flag.
          // After a rebuild the list is the recount's: what the walk of
          // the final structure still finds and counts.
          if (fix_ == RepairMode::all) {
            compressed_copied_fixes_.emplace_back(l2_offset + i * esize, e & ~QCOW_OFLAG_COPIED);
          }
        }
        if (h_.has_data_file()) {
          say("ERROR compressed cluster {} with data file, entry=0x{:x}", i, e & ~QCOW_OFLAG_COPIED);
          res_.corruptions++;
          continue;
        }
        if (bitmap) {
          // QEMU prints the entry with the copied flag already cleared.
          say("ERROR compressed cluster {} with non-zero subcluster allocation "
              "bitmap, entry=0x{:x}",
              i, e & ~QCOW_OFLAG_COPIED);
          res_.corruptions++;
          continue;
        }
        inc(d.host_offset, d.bytes);
        if (active) {
          res_.allocated_clusters++;
          res_.compressed_clusters++;
          // Compressed clusters count as fragmented, as in QEMU.
          res_.fragmented_clusters++;
        }
        continue;
      }
      if (e & L2E_STD_RESERVED_MASK) {
        say("ERROR found l2 entry with reserved bits set: {:x}", e);
        res_.corruptions++;
      }
      const std::uint64_t offset = e & L2E_OFFSET_MASK;
      const bool zero_flag = !ext && (e & QCOW_OFLAG_ZERO);
      const bool allocated = offset != 0 || (h_.has_data_file() && (e & QCOW_OFLAG_COPIED));
      if (!allocated) {
        // qcow2.txt "Extended L2 Entries": an unallocated cluster has no
        // allocated subclusters. QEMU reports this and no repair clears it.
        if (ext && !offset && (bitmap & QCOW_L2_BITMAP_ALL_ALLOC)) {
          say("ERROR: Unallocated cluster has non-zero subcluster allocation map");
          res_.corruptions++;
        }
        continue;  // unallocated or plain zero
      }
      // qcow2.txt "Extended L2 Entries": a subcluster cannot be both
      // allocated and zero.
      if (ext && ((bitmap >> 32) & bitmap)) {
        say("ERROR offset={:x}: Allocated cluster has corrupted subcluster allocation bitmap", offset);
        res_.corruptions++;
      }
      if (!is_aligned(offset, cs_)) {
        res_.corruptions++;
        const bool contains_data = ext ? (bitmap & QCOW_L2_BITMAP_ALL_ALLOC) != 0 : !zero_flag;
        if (contains_data) {
          say("ERROR offset={:x}: Data cluster is not properly aligned; L2 entry "
              "corrupted.",
              offset);
        } else {
          const bool repair = fix_ == RepairMode::all;
          say("{} offset={:x}: Preallocated cluster is not properly aligned; L2 "
              "entry corrupted.",
              repair ? "Repairing" : "ERROR", offset);
          if (repair) {
            // Nothing is stored there: turn it into a plain zero cluster.
            std::byte fixed[16] = {};
            if (ext) {
              store_be64(fixed + 8, QCOW_L2_BITMAP_ALL_ZEROES);
            } else {
              store_be64(fixed, QCOW_OFLAG_ZERO);
            }
            if (!write_allowed(l2_offset + i * esize, esize, MetadataKind::active_l2)) {
              say("ERROR: Overlap check failed");
              res_.check_errors++;
              aborted_ = true;  // as QEMU, stop checking: something is seriously wrong
              return;
            }
            if (file_.pwrite(std::span<const std::byte>(fixed, esize), l2_offset + i * esize) && file_.flush()) {
              res_.corruptions--;
              res_.corruptions_fixed++;
              continue;  // the cluster is unused now
            }
            res_.check_errors++;
          }
        }
      }
      if (active) {
        res_.allocated_clusters++;
        if (next_contiguous && offset != next_contiguous) res_.fragmented_clusters++;
        next_contiguous = offset + cs_;
      }
      if (!h_.has_data_file()) inc(offset, cs_);
    }
  }

  // qcow2.txt "Snapshots": version 3 snapshot entries carry at least 16
  // bytes of extra data (vm_state_size_large and disk_size). QEMU reports
  // shorter ones first, when it reads the table; its -r all rewrites the
  // table, which qnbd does not do (the entry stays reported). A table that
  // cannot be read is left to check_snapshots to report.
  void report_incomplete_snapshots() {
    res_.corruptions +=
        count_incomplete_snapshots([this](std::uint32_t i) { say("ERROR snapshot table entry {} is incomplete", i); });
  }

  // The number of incomplete entries, each passed to `on_entry` if given.
  std::uint64_t count_incomplete_snapshots(const std::function<void(std::uint32_t)>& on_entry) {
    if (h_.version < 3) return 0;
    std::uint64_t pos = h_.snapshots_offset, total = 0, incomplete = 0;
    for (std::uint32_t i = 0; i < h_.nb_snapshots; i++) {
      std::byte fixed[40];
      if (!file_.read_exact(fixed, pos, "snapshot table entry")) break;
      const std::uint32_t extra = load_be32(fixed + 36);
      if (extra > MAX_SNAPSHOT_EXTRA_DATA) break;
      if (extra < 16) {
        if (on_entry) on_entry(i);
        incomplete++;
      }
      const std::uint64_t entry = align_up(40 + extra + load_be16(fixed + 12) + load_be16(fixed + 14), 8);
      total += entry;
      pos += entry;
      if (total > MAX_SNAPSHOTS_TABLE_BYTES) break;
    }
    return incomplete;
  }

  void check_snapshots() {
    snapshots_size_ = 0;
    snapshot_l1_tables_.clear();
    if (h_.nb_snapshots == 0) return;
    std::uint64_t pos = h_.snapshots_offset;
    std::uint64_t total = 0;
    for (std::uint32_t i = 0; i < h_.nb_snapshots; i++) {
      std::byte fixed[40];
      if (!file_.read_exact(fixed, pos, "snapshot table entry")) {
        say("ERROR: could not read the snapshot table");
        res_.check_errors++;
        return;
      }
      const std::uint64_t l1_offset = load_be64(fixed);
      const std::uint32_t l1_size = load_be32(fixed + 8);
      const std::uint16_t id_len = load_be16(fixed + 12);
      const std::uint16_t name_len = load_be16(fixed + 14);
      const std::uint32_t extra = load_be32(fixed + 36);
      if (extra > MAX_SNAPSHOT_EXTRA_DATA) {
        say("ERROR: too much extra metadata in snapshot table entry");
        res_.check_errors++;
        return;
      }
      std::string id(id_len, '\0'), name(name_len, '\0');
      std::vector<std::byte> strings(id_len + name_len);
      if (!strings.empty() && !file_.read_exact(strings, pos + 40 + extra, "snapshot id and name")) {
        res_.check_errors++;
        return;
      }
      // Both may be empty (then strings.data() is null, not a memcpy source).
      if (id_len) std::memcpy(id.data(), strings.data(), id_len);
      if (name_len) std::memcpy(name.data(), strings.data() + id_len, name_len);
      // QEMU prints them as C strings: up to the first NUL.
      id.resize(std::strlen(id.c_str()));
      name.resize(std::strlen(name.c_str()));
      const std::uint64_t entry = align_up(40 + extra + id_len + name_len, 8);
      total += entry;
      pos += entry;
      if (total > MAX_SNAPSHOTS_TABLE_BYTES) {
        say("ERROR: snapshot table is too big");
        res_.check_errors++;
        return;
      }
      if (!is_aligned(l1_offset, cs_)) {
        say("ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster "
            "aligned; snapshot table entry corrupted",
            id, name, CHex{l1_offset});
        res_.corruptions++;
        continue;
      }
      if (std::uint64_t{l1_size} * 8 > MAX_L1_BYTES) {
        say("ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot "
            "table entry corrupted",
            id, name, CHex{l1_size});
        res_.corruptions++;
        continue;
      }
      snapshot_l1_tables_.emplace_back(l1_offset, std::uint64_t{l1_size} * 8);
      check_refcounts_l1(l1_offset, l1_size, false);
      if (aborted_) return;
    }
    snapshots_size_ = total;
    inc(h_.snapshots_offset, total);
  }

  void check_bitmaps() {
    if (!h_.bitmaps || !(h_.autoclear_features & AUTOCLEAR_BITMAPS)) return;
    const BitmapsExtension& b = *h_.bitmaps;
    if (b.bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE) {
      res_.check_errors++;
      return;
    }
    inc(b.bitmap_directory_offset, b.bitmap_directory_size);
    std::vector<std::byte> dir(b.bitmap_directory_size);
    if (!file_.read_exact(dir, b.bitmap_directory_offset, "bitmap directory")) {
      say("ERROR: could not read the bitmap directory");
      res_.check_errors++;
      return;
    }
    std::uint64_t pos = 0;
    for (std::uint32_t i = 0; i < b.nb_bitmaps; i++) {
      if (pos + 24 > dir.size()) {
        res_.check_errors++;
        return;
      }
      const std::uint64_t table_offset = load_be64(dir.data() + pos);
      const std::uint32_t table_size = load_be32(dir.data() + pos + 8);
      const std::uint16_t name_size = load_be16(dir.data() + pos + 18);
      const std::uint32_t extra = load_be32(dir.data() + pos + 20);
      pos += align_up(std::uint64_t{24} + extra + name_size, 8);
      // QEMU's bitmap limits (block/qcow2-bitmap.c) keep a hostile directory
      // from making us allocate gigabytes for one table.
      if (table_size > MAX_BITMAP_TABLE_SIZE || std::uint64_t{table_size} * cs_ > MAX_BITMAP_DATA_BYTES) {
        say("ERROR bitmap {} table is too large ({} entries)", i, table_size);
        res_.check_errors++;
        continue;
      }
      inc(table_offset, std::uint64_t{table_size} * 8);
      auto table = read_table(table_offset, table_size);
      if (!table) {
        res_.check_errors++;
        continue;
      }
      for (std::uint64_t e : *table) {
        const std::uint64_t off = e & BME_TABLE_ENTRY_OFFSET_MASK;
        if (off) inc(off, cs_);
      }
    }
  }

  void check_refblocks() {
    for (std::uint64_t i = 0; i < rt_.size(); i++) {
      const std::uint64_t offset = rt_[i] & REFT_OFFSET_MASK;
      if (rt_[i] & REFT_RESERVED_MASK) {
        // As QEMU: reported first, and the entry is not looked at further.
        say("ERROR refcount table entry {} has reserved bits set", i);
        res_.corruptions++;
        rebuild_ = true;
        // Not counted as a block of the structure either (QEMU does not
        // count it): the rebuild must not take a reference off it, which
        // would free a data cluster the entry happens to name.
        continue;
      }
      if (!offset) continue;
      refstruct_blocks_.push_back(offset);
      if (!is_aligned(offset, cs_)) {
        say("ERROR refcount block {} is not cluster aligned; refcount table entry "
            "corrupted",
            i);
        res_.corruptions++;
        rebuild_ = true;
        continue;
      }
      if ((offset >> cb_) >= nb_clusters_) {
        say("ERROR refcount block {} is outside image", i);
        res_.corruptions++;
        // QEMU repairs this under -r all (it grows the file; qnbd rebuilds
        // the structure instead) and otherwise only reports it: -r leaks
        // still fixes the leaks.
        if (fix_ == RepairMode::all) {
          rebuild_ = true;
        } else {
          unrepairable_++;  // what -r leaks leaves reported
        }
        continue;
      }
      inc(offset, cs_);
      if (computed_[offset >> cb_] != 1) {
        say("ERROR refcount block {} refcount={}", i, computed_[offset >> cb_]);
        res_.corruptions++;
        rebuild_ = true;
      }
    }
  }

  // ---- comparison ------------------------------------------------------
  template <typename F>
  void for_each_cluster(F&& f) {
    for (std::uint64_t k = 0; k < computed_.size(); k++) f(k, computed_[k]);
    for (const auto& [k, v] : beyond_) f(k, v);
  }

  // QEMU's compare_refcounts. With RepairMode::none only counts.
  // Sets the stored refcount of a cluster; false if it could not.
  using RefcountSetter = std::function<bool(std::uint64_t cluster, std::uint64_t value)>;

  void compare_refcounts(RepairMode fix, const RefcountSetter& set = {}) {
    std::uint64_t highest = 0;
    for_each_cluster([&](std::uint64_t k, std::uint64_t reference) {
      const std::optional<std::uint64_t> got = stored(k);
      if (!got) {
        say("Can't get refcount for cluster {}: Input/output error", k);
        res_.check_errors++;
        return;
      }
      const std::uint64_t refcount = *got;
      if (refcount > 0 || reference > 0) {
        highest = std::max(highest, k);
      }
      if (refcount == reference) return;
      std::uint64_t* num_fixed = nullptr;
      if (refcount == 0) {
        rebuild_ = true;
      } else if (refcount > reference && fix != RepairMode::none) {
        num_fixed = &res_.leaks_fixed;
      } else if (refcount < reference && fix == RepairMode::all) {
        num_fixed = &res_.corruptions_fixed;
      }
      say("{} cluster {} refcount={} reference={}",
          num_fixed              ? "Repairing"
          : refcount < reference ? "ERROR"
                                 : "Leaked",
          k, refcount, reference);
      if (num_fixed && set) {
        if (set(k, reference)) {
          (*num_fixed)++;
          return;
        }
      }
      if (refcount < reference) {
        res_.corruptions++;
      } else {
        res_.leaks++;
      }
    });
    res_.image_end_offset = (highest + 1) * cs_;  // as QEMU: at least one cluster
  }

  Result<void> apply_in_place_fixes() {
    auto r = Refcounts::load(file_, RefcountGeometry{cb_, h_.refcount_order}, h_.refcount_table_offset,
                             h_.refcount_table_clusters);
    if (r) {
      // The engine writes refcount blocks without the pre-write overlap
      // check: ask it here for the block each entry lies in. A block can be
      // another structure too (fuzz/corpus/check/repair-leak-in-refblock-
      // over-l1: the only refcount block is the L1 table, and clearing the
      // leaked clusters' bits rewrote the L1 entry; a second check found 48
      // corruptions where the repair said 3 were left). QEMU refuses that
      // block when its cache is written back, and the check fails with
      // nothing written: so here, at the first refusal, nothing is.
      const unsigned bits = cb_ + 3 - h_.refcount_order;
      bool refused = false;
      compare_refcounts(fix_, [&](std::uint64_t k, std::uint64_t v) {
        const std::uint64_t ti = k >> bits;
        const std::uint64_t block = ti < rt_.size() ? rt_[ti] & REFT_OFFSET_MASK : 0;
        if (refused || (block && !write_allowed(block, cs_, MetadataKind::refcount_block))) {
          refused = true;
          return false;
        }
        return r->set(k, v).has_value();
      });
      if (refused) {
        say("ERROR: Could not write refcount block; metadata overlap check failed: Input/output error");
        res_.check_errors++;
        aborted_ = true;
        return ok();
      }
      QNBD_TRY(r->flush());
    } else {
      // The engine will not load a structure with a block outside the
      // file or misaligned; QEMU still fixes, in place, every cluster
      // whose own block is sound (and reports the rest as left).
      compare_refcounts(fix_, [&](std::uint64_t k, std::uint64_t v) { return set_in_place(k, v); });
      QNBD_TRY(file_.flush());
    }
    drop_cached_blocks();  // re-read what was just written
    return ok();
  }

  // The stored refcount of cluster k set to v in its existing block, when
  // that block is sound (aligned, inside the file, no reserved bits) and
  // may be written; never allocates a block.
  bool set_in_place(std::uint64_t k, std::uint64_t v) {
    const unsigned bits = cb_ + 3 - h_.refcount_order;
    const std::uint64_t ti = k >> bits;
    if (ti >= rt_.size() || (rt_[ti] & REFT_RESERVED_MASK) || v > max_refcount(h_.refcount_order)) return false;
    const std::uint64_t offset = rt_[ti] & REFT_OFFSET_MASK;
    if (!block_usable(offset) || !write_allowed(offset, cs_, MetadataKind::refcount_block)) return false;
    // The cached copy is changed in place and only the bytes that hold the
    // entry are written (a repair may fix many clusters of one block).
    auto& block = const_cast<std::vector<std::byte>&>(cached_block(offset));
    const std::uint64_t index = k & ((1ull << bits) - 1);
    set_refcount_entry(block, h_.refcount_order, index, v);
    const std::uint64_t first = (index << h_.refcount_order) / 8;
    const std::uint64_t bytes = std::max<std::uint64_t>(1, (1ull << h_.refcount_order) / 8);
    if (!file_.pwrite(std::span<const std::byte>(block).subspan(first, bytes), offset + first)) {
      drop_cached_blocks();  // the cached copy no longer matches the file
      return false;
    }
    return true;
  }

  // Write a complete new refcount table and blocks from the recomputed
  // refcounts, then switch the header to it (QEMU's
  // rebuild_refcount_structure). New clusters go first-fit into space no
  // metadata or data uses -- the old table and blocks count as used while
  // placing, so a crash before the header switch leaves the old structure
  // intact -- but the new blocks already count the old structure as free.
  // Unlike QEMU, placement also skips clusters that references a cluster or
  // more past the end of the file name (QEMU puts a block there, and once
  // the file has grown that data cluster doubles as a refcount block).
  Result<void> rebuild_refcount_structure() {
    std::map<std::uint64_t, std::uint64_t> used;  // placement view (old structure kept)
    for_each_cluster([&](std::uint64_t k, std::uint64_t v) {
      if (v) used[k] = v;
    });
    std::map<std::uint64_t, std::uint64_t> refs = used;  // what the new blocks say
    auto drop = [&](std::uint64_t offset, std::uint64_t length) {
      if (length == 0) return;
      for (std::uint64_t k = offset >> cb_; k <= (offset + length - 1) >> cb_; k++) {
        auto it = refs.find(k);
        // A count that overflowed stands for more references than it
        // holds: taking one off could free a cluster still in use. It
        // stays; the recount's leak repair settles it.
        if (it != refs.end() && !overflowed_.count(k) && --it->second == 0) refs.erase(it);
      }
    };
    drop(h_.refcount_table_offset, std::uint64_t{h_.refcount_table_clusters} * cs_);
    for (std::uint64_t off : refstruct_blocks_) {
      if (is_aligned(off, cs_) && (off >> cb_) < nb_clusters_) drop(off, cs_);
    }
    const std::uint64_t max = max_refcount(h_.refcount_order);
    for (auto& [k, v] : refs) {
      if (v > max) return make_error(EOVERFLOW, "cluster {} is referenced {} times", k, v);
    }

    const unsigned eb = cb_ + 3 - h_.refcount_order;
    const std::uint64_t per_cluster = cs_ / 8;
    // Clusters below `hint` are all used (placement only ever adds to
    // `used`, except when the table is moved, which lowers the hint), so
    // the scans stay linear overall.
    std::uint64_t hint = 0;
    // Regions named by references a cluster or more past the end of the
    // file, merged; placement skips them, but only so far: a crafted image
    // must not make the rebuild grow the file without bound.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> refused;
    for (const auto& [a, b] : refused_) {
      if (!refused.empty() && a <= refused.back().second) {
        refused.back().second = std::max(refused.back().second, b);
      } else {
        refused.emplace_back(a, b);
      }
    }
    const std::uint64_t skip_limit = nb_clusters_ + std::max<std::uint64_t>(kMaxRebuildSkipBytes >> cb_, 1);
    auto refused_end = [&](std::uint64_t k) -> std::uint64_t {
      auto it = std::upper_bound(refused.begin(), refused.end(), std::make_pair(k, UINT64_MAX));
      if (it == refused.begin()) return 0;
      --it;
      return k < it->second ? it->second : 0;
    };
    auto first_fit = [&](std::uint64_t n) -> Result<std::uint64_t> {
      while (used.count(hint)) hint++;
      std::uint64_t run_start = hint, run = 0;
      for (std::uint64_t k = hint;; k++) {
        if (const std::uint64_t end = refused_end(k)) {
          if (end > skip_limit) {
            return make_error(EFBIG, "references past the end of the file leave no room for the "
                                     "refcount structure");
          }
          run = 0;
          run_start = end;
          k = end - 1;
        } else if (used.count(k)) {
          run = 0;
          run_start = k + 1;
        } else if (++run == n) {
          return run_start;
        }
      }
    };
    std::map<std::uint64_t, std::uint64_t> block_at;  // table index -> cluster
    std::uint64_t table_start = 0, table_n = 0;
    for (int iter = 0;; iter++) {
      if (iter > 64) return make_error(EIO, "refcount rebuild does not converge");
      bool changed = false;
      std::set<std::uint64_t> needed;
      for (const auto& [k, v] : refs) needed.insert(k >> eb);
      for (const auto& [ti, c] : block_at) needed.insert(c >> eb);
      for (std::uint64_t k = table_start; k < table_start + table_n; k++) needed.insert(k >> eb);
      for (std::uint64_t ti : needed) {
        if (block_at.count(ti)) continue;
        const std::uint64_t c = QNBD_TRY(first_fit(1));
        used[c] = 1;
        block_at[ti] = c;
        changed = true;
      }
      const std::uint64_t want = div_round_up(*needed.rbegin() + 1, per_cluster);
      if (want != table_n) {
        for (std::uint64_t k = table_start; k < table_start + table_n; k++) used.erase(k);
        if (table_n) hint = std::min(hint, table_start);
        table_n = want;
        table_start = QNBD_TRY(first_fit(table_n));
        for (std::uint64_t k = table_start; k < table_start + table_n; k++) used[k] = 1;
        changed = true;
      }
      if (!changed) break;
    }
    if (table_n * cs_ > MAX_REFTABLE_BYTES) {
      return make_error(EFBIG, "rebuilt refcount table would exceed {} bytes", MAX_REFTABLE_BYTES);
    }
    for (const auto& [ti, c] : block_at) refs[c] = 1;
    for (std::uint64_t k = table_start; k < table_start + table_n; k++) refs[k] = 1;

    std::map<std::uint64_t, std::vector<std::byte>> blocks;
    for (const auto& [k, v] : refs) {
      auto& b = blocks[k >> eb];
      if (b.empty()) b.assign(cs_, std::byte{0});
      set_refcount_entry(b, h_.refcount_order, k & ((1ull << eb) - 1), v);
    }
    std::vector<std::byte> table(table_n * cs_, std::byte{0});
    for (auto& [ti, data] : blocks) {
      auto it = block_at.find(ti);
      if (it == block_at.end()) return make_error(EIO, "refcount rebuild lost block {}", ti);
      store_be64(table.data() + ti * 8, it->second << cb_);
      QNBD_TRY(file_.pwrite(data, it->second << cb_));
    }
    // Blocks that only describe free clusters are still written (all zero
    // but their own entry), so every table entry points at real contents.
    for (const auto& [ti, c] : block_at) {
      if (blocks.count(ti)) continue;
      std::vector<std::byte> empty(cs_, std::byte{0});
      store_be64(table.data() + ti * 8, c << cb_);
      QNBD_TRY(file_.pwrite(empty, c << cb_));
    }
    const std::uint64_t table_offset = table_start << cb_;
    QNBD_TRY(file_.pwrite(table, table_offset));
    QNBD_TRY(file_.flush());
    // Switch: refcount_table_offset (48) and refcount_table_clusters (56)
    // in one write, then flush.
    std::byte hdr[12];
    store_be64(hdr, table_offset);
    store_be32(hdr + 8, static_cast<std::uint32_t>(table_n));
    QNBD_TRY(file_.pwrite(hdr, 48));
    QNBD_TRY(file_.flush());
    h_.refcount_table_offset = table_offset;
    h_.refcount_table_clusters = static_cast<std::uint32_t>(table_n);
    file_size_ = QNBD_TRY(file_.size());
    nb_clusters_ = div_round_up(file_size_, cs_);
    load_refcount_table();
    rebuild_ = false;
    return ok();
  }

  // ---- COPIED flags (QEMU's check_oflag_copied) -------------------------
  Result<void> check_oflag_copied() {
    bool repair = fix_ == RepairMode::all ||
                  (fix_ == RepairMode::leaks && !res_.check_errors && !res_.corruptions && !res_.leaks);
    if (h_.l1_size == 0) return ok();
    auto l1 = read_table(h_.l1_table_offset, h_.l1_size);
    if (!l1) {
      res_.check_errors++;
      return ok();
    }
    const std::uint32_t esize = h_.l2_entry_size();
    for (std::uint64_t i = next_nonzero_entry(l1->data(), 1, 0, h_.l1_size); i < h_.l1_size;
         i = next_nonzero_entry(l1->data(), 1, i + 1, h_.l1_size)) {
      const std::uint64_t l1e = (*l1)[i];
      const std::uint64_t l2_offset = l1e & L1E_OFFSET_MASK;
      if (!l2_offset) continue;
      const std::optional<std::uint64_t> got = stored(l2_offset >> cb_);
      const std::uint64_t refcount = got.value_or(0);
      if (got && (refcount == 1) != ((l1e & QCOW_OFLAG_COPIED) != 0)) {
        res_.corruptions++;
        say("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}", repair ? "Repairing" : "ERROR", i, l1e,
            refcount);
        if (repair) {
          std::byte e[8];
          store_be64(e, refcount == 1 ? l1e | QCOW_OFLAG_COPIED : l1e & ~QCOW_OFLAG_COPIED);
          if (!write_allowed(h_.l1_table_offset + i * 8, 8, MetadataKind::active_l1)) {
            res_.check_errors++;
            aborted_ = true;
            return ok();
          }
          if (file_.pwrite(e, h_.l1_table_offset + i * 8)) {
            res_.corruptions--;
            res_.corruptions_fixed++;
          } else {
            res_.check_errors++;
          }
        }
      }
      // An unaligned table is read where it claims to be, as QEMU does
      // (the walk has reported it already).
      // Past the end of the file the table reads as zeroes (no entry to
      // check), as in the walk.
      const std::uint64_t in_file = entries_in_file(l2_offset, esize);
      if (in_file == 0) continue;
      std::vector<std::byte>& l2 = l2_buf_;
      l2.resize(cs_);
      if (!file_.read_zero_fill(l2, l2_offset)) {
        say("ERROR: Could not read L2 table");
        res_.check_errors++;
        return ok();
      }
      std::uint64_t dirty = 0;
      const std::size_t words = esize / 8;
      for (std::uint64_t j = next_nonzero_entry(l2.data(), words, 0, in_file); j < in_file;
           j = next_nonzero_entry(l2.data(), words, j + 1, in_file)) {
        const std::uint64_t e = load_be64(l2.data() + j * esize);
        if (e & QCOW_OFLAG_COMPRESSED) continue;
        const std::uint64_t data_offset = e & L2E_OFFSET_MASK;
        const bool normal_or_zero_alloc = data_offset != 0 || (h_.has_data_file() && (e & QCOW_OFLAG_COPIED));
        if (!normal_or_zero_alloc) continue;
        const std::optional<std::uint64_t> got_rc =
            h_.has_data_file() ? std::optional<std::uint64_t>(1) : stored(data_offset >> cb_);
        if (!got_rc) continue;
        const std::uint64_t rc = *got_rc;
        if ((rc == 1) != ((e & QCOW_OFLAG_COPIED) != 0)) {
          res_.corruptions++;
          say("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}", repair ? "Repairing" : "ERROR", e, rc);
          if (repair) {
            store_be64(l2.data() + j * esize, rc == 1 ? e | QCOW_OFLAG_COPIED : e & ~QCOW_OFLAG_COPIED);
            dirty++;
          }
        }
      }
      if (dirty) {
        if (!write_allowed(l2_offset, cs_, MetadataKind::active_l2)) {
          say("ERROR: Could not write L2 table; metadata overlap check failed: Input/output error");
          res_.check_errors++;
          aborted_ = true;
          return ok();
        }
        if (file_.pwrite(l2, l2_offset)) {
          res_.corruptions -= dirty;
          res_.corruptions_fixed += dirty;
        } else {
          res_.check_errors++;
        }
      }
    }
    if (repair) QNBD_TRY(file_.flush());
    return ok();
  }

  File& file_;
  RepairMode fix_;
  const CheckMessageSink& sink_;
  Header h_;
  CheckResult res_;
  std::uint64_t file_size_ = 0;
  std::uint64_t snapshots_size_ = 0;  // bytes of the snapshot table check_snapshots read
  std::vector<std::pair<std::uint64_t, std::uint64_t>> snapshot_l1_tables_;  // (offset, bytes) of each valid one
  std::uint64_t nb_clusters_ = 0;
  std::uint64_t cs_ = 0;
  unsigned cb_ = 0;
  std::vector<std::uint64_t> computed_;
  static constexpr std::uint64_t kL1ChunkEntries = 64 * 1024;
  std::vector<std::uint64_t> l1_buf_;    // a chunk of the L1 table being walked (big-endian)
  std::vector<std::byte> l2_buf_;        // the L2 table being walked
  std::optional<MetadataMap> metadata_;  // for write_allowed, built at the first repair write
  bool marked_corrupt_ = false;
  bool aborted_ = false;  // a repair write was refused: the check stops
  std::map<std::uint64_t, std::uint64_t> beyond_;
  std::vector<std::uint64_t> rt_;
  static constexpr std::size_t kBlockCacheBytes = 16u << 20;
  std::unordered_map<std::uint64_t, std::vector<std::byte>> blocks_;  // by host offset
  std::deque<std::uint64_t> block_order_;                             // oldest first
  std::vector<std::uint64_t> refstruct_blocks_;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> compressed_copied_fixes_;  // (file offset, entry)
  bool rebuild_ = false;
  // Refused references (see inc), first cluster -> one past the last.
  std::map<std::uint64_t, std::uint64_t> refused_;
  static constexpr std::uint64_t kMaxRebuildSkipBytes = 64ull << 20;
  std::uint64_t unrepairable_ = 0;                // corruptions of the reference walk, which repair leaves
  std::uint64_t overflows_ = 0;                   // references the refcount width cannot count, which repair leaves too
  std::unordered_set<std::uint64_t> overflowed_;  // clusters whose count overflowed (at most one per cluster)
  bool reported_bad_refblock_ = false;
};

}  // namespace

Result<CheckResult> check_qcow2(File& file, RepairMode repair, const CheckMessageSink& message) {
  Checker c(file, repair, message);
  return c.run();
}

}  // namespace qnbd::image::qcow2
