// qcow2 driver: open (header, tables, chain), read path and block status.
#include "image/qcow2/qcow2_image.hpp"

#include <algorithm>
#include <cstring>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"
#include "image/qcow2/bitmap.hpp"
#include "image/qcow2/compress.hpp"
#include "image/qcow2/refcount.hpp"
#include "image/qcow2/snapshot.hpp"

namespace qnbd::image::qcow2 {
namespace {

// QEMU's default: enough L2 cache to map the whole disk, up to 32 MiB.
constexpr std::uint64_t kMaxL2CacheBytes = 32ull << 20;

// The top-level metadata regions must not overlap each other (cluster
// granularity, as QEMU's overlap checks, qcow2_check_metadata_overlap).
Result<void> check_metadata_overlaps(const Header& h) {
  struct Region {
    const char* name;
    std::uint64_t offset, bytes;
  };
  const std::uint64_t cs = h.cluster_size();
  std::vector<Region> regions{{"header", 0, cs},
                              {"refcount table", h.refcount_table_offset,
                               std::uint64_t{h.refcount_table_clusters} * cs},
                              {"active L1 table", h.l1_table_offset, std::uint64_t{h.l1_size} * 8}};
  if (h.nb_snapshots) regions.push_back({"snapshot table", h.snapshots_offset, std::uint64_t{h.nb_snapshots} * 40});
  if (h.bitmaps) {
    regions.push_back({"bitmap directory", h.bitmaps->bitmap_directory_offset, h.bitmaps->bitmap_directory_size});
  }
  for (std::size_t a = 0; a < regions.size(); ++a) {
    for (std::size_t b = a + 1; b < regions.size(); ++b) {
      const Region& x = regions[a];
      const Region& y = regions[b];
      if (x.bytes == 0 || y.bytes == 0) continue;
      // Offsets are validated (aligned, no overflow) before this runs.
      std::uint64_t x_end = align_up(x.offset + x.bytes, cs), y_end = align_up(y.offset + y.bytes, cs);
      if (x.offset < y_end && y.offset < x_end) {
        return make_error(EINVAL, "{} at {:#x} overlaps the {} at {:#x}", y.name, y.offset, x.name, x.offset);
      }
    }
  }
  return ok();
}

}  // namespace

Qcow2Image::~Qcow2Image() {
  // Best effort for an owner that never called close(): cached L2 tables
  // and queued frees would otherwise be lost (close() reports errors).
  if (writable_ && !closed_) (void)flush();
}

Result<std::unique_ptr<Qcow2Image>> Qcow2Image::open(Parts parts, const OpenOptions& options) {
  std::unique_ptr<Qcow2Image> img(new Qcow2Image());
  img->file_ = std::move(parts.file);
  img->path_ = parts.path;
  File& file = *img->file_;
  img->file_size_ = QNBD_TRY(file.size());

  img->header_ = QNBD_TRY(read_header(file, img->file_size_));
  const Header& h = img->header_;
  QNBD_TRY(check_metadata_overlaps(h));

  if (!options.read_only) {
    if (h.corrupt()) return make_error(EROFS, "image is corrupt; it can only be opened read-only");
    if (h.dirty()) {
      // Stale refcounts (lazy_refcounts): rebuild them, then read the
      // header again (the rebuild may have moved the refcount table).
      QNBD_TRY(img->repair_dirty_image(file));
      img->file_size_ = QNBD_TRY(file.size());
      img->header_ = QNBD_TRY(read_header(file, img->file_size_));
      QNBD_TRY(check_metadata_overlaps(h));
    }
  }
  if (h.dirty()) log::debug("{}: dirty bit set (refcounts may be stale); reading is safe", parts.path);

  img->geometry_ = L2Geometry{h.cluster_bits, h.version, h.extended_l2(), h.has_data_file()};
  img->size_ = align_down(h.size, 512);

  // The external data file (qcow2.txt "Header", incompatible bit 2).
  if (h.has_data_file()) {
    img->data_file_name_ = options.data_file.empty() ? h.data_file : options.data_file;
    if (parts.data_file) {
      img->data_file_ = std::move(parts.data_file);
    } else {
      if (img->data_file_name_.empty()) return make_error(EINVAL, "'data-file' is required for this image");
      std::string path = img->data_file_name_;
      if (path[0] != '/') {
        auto slash = parts.path.rfind('/');
        if (slash != std::string::npos) path = parts.path.substr(0, slash + 1) + path;
      }
      auto df = open_posix_file(path, options.read_only ? OpenMode::read_only : OpenMode::read_write, options.cache);
      if (!df) return make_error(df.error().code, "could not open data file: {}", df.error().message);
      QNBD_TRY((*df)->set_lock(lock_request(options.lock, LockRole::data_file, false, !options.read_only)));
      img->data_file_ = std::move(*df);
    }
  } else if (!options.data_file.empty() || parts.data_file) {
    return make_error(EINVAL, "'data-file' can only be set for images with an external data file");
  }

  // The active L1 table (bounds checked by parse_header: aligned, <= 32 MiB,
  // inside the file).
  img->l1_.resize(h.l1_size);
  if (h.l1_size) {
    std::vector<std::byte> raw(std::size_t{h.l1_size} * 8);
    QNBD_TRY(file.read_exact(raw, h.l1_table_offset, "L1 table"));
    for (std::size_t i = 0; i < h.l1_size; ++i) img->l1_[i] = load_be64(raw.data() + i * 8);
  }

  img->snapshots_ = QNBD_TRY(read_snapshot_table(file, h, img->file_size_, &img->snapshots_size_));
  if (h.has_data_file() && !img->snapshots_.empty()) {
    return make_error(EINVAL, "internal snapshots are not allowed with an external data file");
  }
  if (options.load_snapshot) {
    if (!options.read_only) return make_error(EINVAL, "a snapshot can only be loaded read-only");
    QNBD_TRY(img->load_snapshot_l1(*options.load_snapshot));
  }
  img->bitmaps_ = QNBD_TRY(read_bitmap_directory(file, h, img->file_size_));
  img->intent_ = std::move(parts.intent);
  img->bitmap_store_ = std::make_unique<BitmapStore>(file, img->header_, img->bitmaps_, img->file_size_,
                                                     !options.read_only, img->intent_);
  if (options.read_only && (h.autoclear_features & AUTOCLEAR_QNBD_INTENT)) {
    // Left by a writer that crashed: say whether the next writable open
    // can recover (nothing is written here).
    Header copy = img->header_;
    auto r = recover_from_intent(file, copy, nullptr, img->file_size_, img->intent_);
    img->intent_state_ = r ? r->state : "stale";
    img->intent_detail_ = r ? r->detail : r.error().message;
    // And export what it would store, so that a backup of a crashed,
    // stopped disk (a read-only serve -B) needs no full copy. Not under
    // force-share: a writer may hold the image, its record still growing.
    if (r && r->state == "pending" && !options.lock.force_share) {
      // A crash inside arming, or between a store's header switch and its
      // last autoclear write, leaves AUTOCLEAR_BITMAPS clear: the header
      // hides the directory the record vouches for. Serve that directory,
      // with the record's recovery in place of its in_use entries, as the
      // writable open will store it.
      if (!(h.autoclear_features & AUTOCLEAR_BITMAPS) && !r->directory.empty()) {
        img->bitmaps_ = std::move(r->directory);
        img->bitmap_store_ =
            std::make_unique<BitmapStore>(file, img->header_, img->bitmaps_, img->file_size_, false, img->intent_);
      }
      img->bitmap_store_->adopt_read_only(std::move(r->recovered));
    }
  }

  const std::uint64_t cluster_size = h.cluster_size();
  const std::uint64_t l2_coverage = h.l2_entries() * cluster_size;
  std::uint64_t tables_needed = std::max<std::uint64_t>(div_round_up(h.size, l2_coverage), 1);
  std::uint64_t capacity =
      std::clamp<std::uint64_t>(tables_needed, 4, std::max<std::uint64_t>(kMaxL2CacheBytes / cluster_size, 4));
  img->l2_cache_ = std::make_unique<TableCache>(file, cluster_size, capacity, "L2 table");

  if (!h.backing_file.empty()) {
    if (!parts.open_backing)
      return make_error(EINVAL, "image has a backing file '{}' but none can be opened", h.backing_file);
    img->backing_ = QNBD_TRY(parts.open_backing(h.backing_file, h.backing_format));
  }
  img->full_backing_filename_ = parts.full_backing_filename;
  img->pass_discard_request_ = options.discard_unmap;
  img->writes_through_ = writes_through(options.cache);
  if (!options.read_only) QNBD_TRY(img->init_writer());
  return img;
}

Result<bool> Qcow2Image::continue_unstored_recovery(const IntentRecovery& failed) {
  // The failed rewrite may have left allocations in the refcount cache, or
  // a moved refcount table, that never reached the file; what the file
  // holds is a state its crash ordering makes consistent (a crash at the
  // failing call leaves the same). So read everything again, as a fresh
  // open would; the guest's tables (L1, snapshots) are not touched by it.
  file_size_ = QNBD_TRY(file_->size());
  header_ = QNBD_TRY(read_header(*file_, file_size_));
  QNBD_TRY(check_metadata_overlaps(header_));
  QNBD_TRY(reopen_bitmap_store());
  RefcountGeometry rg{header_.cluster_bits, header_.refcount_order};
  refcounts_ = std::make_unique<Refcounts>(
      QNBD_TRY(Refcounts::load(*file_, rg, header_.refcount_table_offset, header_.refcount_table_clusters)));
  QNBD_TRY(build_metadata_map());
  l2_cache_->set_dependency(&refcounts_->block_cache());

  IntentRecovery now = QNBD_TRY(recover_from_intent(*file_, header_, nullptr, file_size_, intent_));
  const Error store_error{failed.error_code ? failed.error_code : EIO, failed.detail};
  if (now.state == "none") {
    // The header switch was written before the failure (a sync after it,
    // or freeing the old clusters, failed): the bitmaps are stored
    // consistent and the old clusters may leak. The record is removed once
    // the switch is known durable; until then a power loss may bring back
    // the old header, which the record still matches.
    intent_state_ = "recovered";
    intent_detail_ = fmt::format("bitmaps stored, then the rewrite failed ({}); clusters may leak", failed.detail);
    log::warn("{}: {}", path_, intent_detail_);
    if (file_->flush() && intent_.remove) intent_.remove();
    return false;
  }
  if (now.state != "pending" || !intent_.open_writable) return store_error;
  if (now.contents.chunks.empty()) {
    // No request was issued since arming (a request marks its chunks
    // first, and marks start after arming's step 4), so the stored
    // contents are exact and finishing needs no new cluster: the tracked
    // entries' in_use cleared in place (arming's step 3 undone: the
    // record matches the directory with and without it), then one write
    // of the autoclear word sets AUTOCLEAR_BITMAPS and clears
    // AUTOCLEAR_QNBD_INTENT. This also covers a crash inside arming, when
    // AUTOCLEAR_BITMAPS is still clear.
    std::vector<std::byte> dir(static_cast<std::size_t>(now.directory_size));
    QNBD_TRY(file_->read_exact(dir, now.directory_offset, "bitmap directory"));
    QNBD_TRY(set_in_use_flags(dir, now.contents.tracked, false));
    QNBD_TRY(file_->pwrite(dir, now.directory_offset));
    QNBD_TRY(file_->flush());
    std::byte raw[8];
    QNBD_TRY(file_->read_exact(raw, kAutoclearFeaturesOffset, "header"));
    store_be64(raw, (load_be64(raw) | AUTOCLEAR_BITMAPS) & ~AUTOCLEAR_QNBD_INTENT);
    QNBD_TRY(file_->pwrite(raw, kAutoclearFeaturesOffset));
    QNBD_TRY(file_->flush());
    header_ = QNBD_TRY(read_header(*file_, file_size_));
    QNBD_TRY(reopen_bitmap_store());
    register_bitmaps();
    if (intent_.remove) intent_.remove();
    intent_state_ = "recovered";
    intent_detail_ =
        fmt::format("no change since the record was armed; the bitmaps were finished in place ({})", failed.detail);
    log::warn("{}: {}", path_, intent_detail_);
    return false;
  }
  // Marks exist only once arming has set AUTOCLEAR_BITMAPS again.
  if (!header_.bitmaps || !(header_.autoclear_features & AUTOCLEAR_BITMAPS)) return store_error;
  // The armed state of the crashed session, as on disk: the tracked
  // bitmaps in_use, the record covering every change since their last
  // store. Keep it armed and hold the recovered contents in memory; the
  // store at close writes them (and retires the record) once there is room.
  if (now.from_next) {
    if (!intent_.promote_next) return store_error;
    QNBD_TRY(intent_.promote_next());
  }
  std::unique_ptr<File> f = QNBD_TRY(intent_.open_writable());
  auto record = QNBD_TRY(
      IntentRecord::adopt(std::move(f), now.contents, header_.size, static_cast<std::uint32_t>(bitmaps_.size())));
  bitmap_store_->adopt(std::move(record), std::move(now.recovered));
  intent_state_ = "kept";
  intent_detail_ =
      fmt::format("{}; they are held in memory and stored at close, and the record stays armed", failed.detail);
  log::warn("{}: {}", path_, intent_detail_);
  return true;
}

// qemu-nbd -l: the snapshot's L1 table becomes the one reads walk, as
// qcow2_snapshot_load_tmp switches it (qcow2.txt "Snapshots": each
// snapshot keeps its own L1 table; its L2 tables and clusters are shared
// and kept by their refcounts). The image is read-only, so nothing is ever
// written through it; its size stays the image's.
Result<void> Qcow2Image::load_snapshot_l1(const SnapshotRef& ref) {
  auto find = [&](bool by_id, bool by_name, const std::string& id, const std::string& name) -> const SnapshotInfo* {
    for (const auto& s : snapshots_) {
      if (by_id && s.id != id) continue;
      if (by_name && s.name != name) continue;
      return &s;
    }
    return nullptr;
  };
  const SnapshotInfo* sn = nullptr;
  if (ref.id_or_name) {
    sn = find(true, false, ref.id, "");
    if (!sn) sn = find(false, true, "", ref.id);
  } else if (ref.has_id || ref.has_name) {
    sn = find(ref.has_id, ref.has_name, ref.id, ref.name);
  }
  if (!sn) return make_error(ENOENT, "Failed to load snapshot: Can't find snapshot");
  // read_snapshot_table checked the offset's alignment and the entry count
  // (at most QCOW_MAX_L1_SIZE / 8); the read fails past the end of the file.
  std::vector<std::uint64_t> l1(sn->l1_size);
  if (sn->l1_size) {
    std::vector<std::byte> raw(std::size_t{sn->l1_size} * 8);
    auto r = file_->read_exact(raw, sn->l1_table_offset, "snapshot L1 table");
    if (!r) return make_error(r.error().code, "Failed to load snapshot: {}", r.error().message);
    for (std::size_t i = 0; i < sn->l1_size; ++i) l1[i] = load_be64(raw.data() + i * 8);
  }
  l1_ = std::move(l1);
  log::info("{}: serving internal snapshot id '{}' name '{}' (read-only)", path_, sn->id, sn->name);
  return ok();
}

Capabilities Qcow2Image::capabilities() const {
  Capabilities c;
  c.writable = writable_;
  if (writable_) {
    c.can_trim = true;
    c.can_write_zeroes = true;
    // Metadata-only zeroing needs the v3 zero flag and no raw data file.
    c.can_fast_zero = header_.version >= 3 && !header_.data_file_raw();
  }
  c.preferred_block = static_cast<std::uint32_t>(std::min<std::uint64_t>(header_.cluster_size(), 65536));
  return c;
}

Result<void> Qcow2Image::read_compressed(std::span<std::byte> buf, std::uint64_t offset, std::uint64_t l2_entry) {
  const std::uint64_t cluster_size = header_.cluster_size();
  CompressedDescriptor d = parse_compressed_descriptor(l2_entry, header_.cluster_bits);
  if (d.host_offset >= file_size_.load(std::memory_order_relaxed)) {
    return make_error(EIO, "image is corrupt: compressed cluster at {:#x} is beyond the end of the file",
                      d.host_offset);
  }
  // Reused per-thread buffers: no allocation per compressed cluster.
  thread_local std::vector<std::byte> in, out;
  if (in.size() < d.bytes) in.resize(d.bytes);
  if (out.size() < cluster_size) out.resize(cluster_size);
  std::span<std::byte> src(in.data(), d.bytes);
  QNBD_TRY(file_->read_zero_fill(src, d.host_offset));
  auto r = decompress_cluster(header_.compression_type, src, std::span(out.data(), cluster_size));
  if (!r) {
    return make_error(EIO, "{} (guest offset {:#x}, host offset {:#x})", r.error().message,
                      align_down(offset, cluster_size), d.host_offset);
  }
  std::memcpy(buf.data(), out.data() + (offset & (cluster_size - 1)), buf.size());
  return ok();
}

Result<void> Qcow2Image::read_unallocated(std::span<std::byte> buf, std::uint64_t offset) {
  std::size_t from_backing = 0;
  if (backing_ && offset < backing_->size()) {
    from_backing = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), backing_->size() - offset));
    QNBD_TRY(backing_->read(buf.first(from_backing), offset));
  }
  // Past the end of a shorter backing file (or with none): zeroes.
  std::memset(buf.data() + from_backing, 0, buf.size() - from_backing);
  return ok();
}

Result<void> Qcow2Image::read(std::span<std::byte> buf, std::uint64_t offset) {
  if (!range_within(offset, buf.size(), size_)) {
    return make_error(EINVAL, "{}: read {:#x}+{} is outside the image ({} bytes)", path_, offset, buf.size(), size_);
  }
  if (!buf.empty()) metadata_preallocated();
  while (!buf.empty()) {
    Mapping m = QNBD_TRY(get_host_offset(offset, buf.size()));
    std::span<std::byte> part = buf.first(static_cast<std::size_t>(m.bytes));
    QNBD_TRY(read_mapped(part, offset, m));
    buf = buf.subspan(part.size());
    offset += part.size();
  }
  return ok();
}

Result<void> Qcow2Image::read_mapped(std::span<std::byte> part, std::uint64_t offset, const Mapping& m) {
  switch (m.type) {
    case SubclusterType::normal: return data_file().read_zero_fill(part, m.host_offset);
    case SubclusterType::compressed: return read_compressed(part, offset, m.l2_entry);
    case SubclusterType::zero_plain:
    case SubclusterType::zero_alloc: std::memset(part.data(), 0, part.size()); return ok();
    case SubclusterType::unallocated_plain:
    case SubclusterType::unallocated_alloc: return read_unallocated(part, offset);
  }
  return ok();
}

// write, write_zeroes, discard, flush and close: write.cpp.

// QEMU's qcow2_detect_metadata_preallocation: an image whose refcounted
// clusters clearly outnumber the host blocks really allocated was created
// with preallocation=metadata, so its data clusters may be holes in the
// host file. QEMU then asks the host file about each data range
// (BDRV_BLOCK_RECURSE) and reports holes as zero; `map` must do the same.
//
// QEMU guesses once, inside its first qcow2_co_block_status call, and its
// block layer makes that call earlier than the first BLOCK_STATUS: for
// every structured READ (nbd/server.c sends holes as such), for the
// copy-on-write regions of an allocating write (qcow2.c is_zero_cow), for
// the unaligned head and tail of a zeroing (qcow2_co_pwrite_zeroes). A
// fresh image with a bitmap reads as preallocated (five or six refcounted
// clusters, three allocated), one with some data written does not, so the
// moment decides what a map reports later: the callers of
// metadata_preallocated() are those moments. The count is QEMU's: the
// refcounts as the writer holds them (its cache, with this request's
// allocations), over the clusters of the file as long as it is now.
bool Qcow2Image::metadata_preallocated_locked() {
  if (metadata_prealloc_checked_.load(std::memory_order_relaxed)) return metadata_prealloc_;
  auto guess = [&]() -> Result<bool> {
    const std::uint64_t real_allocation = QNBD_TRY(file_->allocated_size());
    const std::uint64_t real_clusters = real_allocation >> header_.cluster_bits;
    const std::uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
    const std::uint64_t end_cluster = div_round_up(QNBD_TRY(file_->size()), header_.cluster_size());
    std::optional<Refcounts> loaded;
    if (!refcounts_) {
      RefcountGeometry rg{header_.cluster_bits, header_.refcount_order};
      Refcounts::Options ro;
      ro.max_cached_blocks = 2;  // a sequential scan
      loaded.emplace(
          QNBD_TRY(Refcounts::load(*file_, rg, header_.refcount_table_offset, header_.refcount_table_clusters, ro)));
    }
    Refcounts& refcounts = refcounts_ ? *refcounts_ : *loaded;
    std::uint64_t count = 0;
    for (std::uint64_t i = 0; i < end_cluster && count < threshold; ++i) {
      count += QNBD_TRY(refcounts.get(i)) != 0;
    }
    return count >= threshold;
  }();
  // As QEMU: a guess that fails (unreadable refcounts) is "no", never the
  // failure of the READ or write that happened to make it.
  if (!guess) log::debug("{}: metadata preallocation not guessed: {}", path_, guess.error().message);
  metadata_prealloc_ = guess && *guess;
  metadata_prealloc_checked_.store(true, std::memory_order_release);
  return metadata_prealloc_;
}

Result<LayerStatus> Qcow2Image::layer_status(std::uint64_t offset, std::uint64_t max_length) {
  if (offset >= size_ || max_length == 0) {
    return make_error(EINVAL, "{}: block status at {:#x} is outside the image", path_, offset);
  }
  const bool preallocated = metadata_preallocated();
  Mapping m = QNBD_TRY(get_host_offset(offset, std::min(max_length, size_ - offset)));
  LayerStatus st;
  st.length = m.bytes;
  // As qcow2_co_block_status: an offset for every type with a host cluster.
  if (has_host_cluster(m.type)) {
    st.offset_valid = true;
    st.host_offset = m.host_offset;
    st.file = data_file_ ? data_file_.get() : file_.get();
  }
  if (m.type == SubclusterType::zero_plain || m.type == SubclusterType::zero_alloc) {
    st.zero = true;
  } else if (m.type == SubclusterType::normal || m.type == SubclusterType::compressed) {
    st.data = true;
  }
  st.compressed = m.type == SubclusterType::compressed;
  if (st.data && st.offset_valid && preallocated) {
    // block/io.c BDRV_BLOCK_RECURSE: ask the host file. A hole that runs to
    // its end (or a range past it) is zero for the whole run; otherwise the
    // run is cut where the host file changes between data and hole.
    File& f = data_file();
    const std::uint64_t fsize = QNBD_TRY(f.size());
    if (st.host_offset >= fsize) {
      st.zero = true;
    } else {
      File::Extent e = QNBD_TRY(f.probe_extent(st.host_offset, st.length));
      if (e.hole && st.host_offset + e.length >= fsize) {
        st.zero = true;
      } else {
        st.length = std::max<std::uint64_t>(1, std::min(st.length, e.length));
        st.zero = e.hole;
      }
    }
  }
  st.present = st.data || st.zero;
  // block/io.c: nothing below (or past the backing file's end) reads as zero.
  if (!st.present && (!backing_ || offset >= backing_->size())) st.zero = true;
  return st;
}

Result<HostRun> Qcow2Image::host_run(std::uint64_t offset, std::uint64_t max_length) {
  if (!range_within(offset, max_length, size_) || max_length == 0) {
    return make_error(EINVAL, "{}: host run {:#x}+{} is outside the image", path_, offset, max_length);
  }
  std::lock_guard lock(mutex_);
  // writable_ is set once, by the open, before any request. A writable
  // image frees clusters (discard, zeroing with unmap, COW of shared
  // clusters) and hands them out again, so its mapping is never lent out
  // (and not looked up here: read() does that).
  if (writable_) return HostRun{max_length, -1, 0};
  const Mapping m = QNBD_TRY(get_host_offset_locked(offset, max_length));
  HostRun run{m.bytes, -1, 0};
  if (m.type == SubclusterType::normal) {
    run.fd = data_file().splice_fd();
    run.host_offset = m.host_offset;
  }
  return run;
}

Result<std::size_t> Qcow2Image::block_status(std::uint64_t offset, std::uint64_t length, std::span<Extent> out) {
  if (!range_within(offset, length, size_)) {
    return make_error(EINVAL, "{}: block status {:#x}+{} is outside the image", path_, offset, length);
  }
  return chain_block_status(*this, offset, length, out);
}

Result<std::size_t> Qcow2Image::export_bitmap(const std::string& name) { return bitmap_store_->export_bitmap(name); }

Result<std::size_t> Qcow2Image::bitmap_status(std::size_t handle, std::uint64_t offset, std::uint64_t length,
                                              std::span<BitmapExtent> out) {
  if (!range_within(offset, length, size_)) {
    return make_error(EINVAL, "{}: bitmap status {:#x}+{} is outside the image", path_, offset, length);
  }
  return bitmap_store_->status(handle, offset, length, out);
}

Result<void> Qcow2Image::start_tracking() {
  if (!writable_) return ok();
  return bitmap_store_->before_write(0, 0);  // marks in_use; an empty range sets no bit
}

Result<void> Qcow2Image::bitmaps_before_write(std::uint64_t offset, std::uint64_t length) {
  return bitmap_store_->before_write(offset, length);
}

ImageInfo Qcow2Image::info() const {
  const Header& h = header_;
  ImageInfo i;
  i.format = "qcow2";
  i.filename = path_;
  i.virtual_size = size_;
  auto allocated = file_->allocated_size();
  if (allocated) i.actual_size = *allocated;
  i.dirty = h.dirty();
  i.cluster_size = h.cluster_size();
  i.compat = h.version == 2 ? "0.10" : "1.1";
  i.compression_type = h.compression_type == COMPRESSION_ZSTD ? "zstd" : "zlib";
  i.lazy_refcounts = h.lazy_refcounts();
  i.extended_l2 = h.extended_l2();
  i.corrupt = h.corrupt();
  i.refcount_bits = h.refcount_bits();
  i.data_file = h.has_data_file() ? data_file_name_ : "";
  i.data_file_raw = h.data_file_raw();
  i.backing_filename = h.backing_file;
  i.full_backing_filename = full_backing_filename_;
  i.backing_format = h.backing_format;
  i.bitmaps = bitmaps_;
  i.has_bitmaps_extension = h.bitmaps.has_value();
  i.intent_record = intent_state_;
  i.intent_record_detail = intent_detail_;
  if (const IntentRecord* r = bitmap_store_->intent_record()) {
    i.intent_record = "armed";
    i.intent_record_detail = fmt::format("{} chunk(s) of {} bytes marked", r->marked_chunks(), r->chunk_size());
  }
  i.snapshots = snapshots_;
  return i;
}

}  // namespace qnbd::image::qcow2
