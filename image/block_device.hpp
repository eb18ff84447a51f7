// BlockDevice: the interface the NBD server drives (one object per export,
// shared by every connection to it).
//
// Thread-safety: every method may be called concurrently from several
// threads. Calls block until the I/O is done. Ranges are validated by the
// caller (offset + length <= size()); implementations still refuse ranges
// outside the device with EINVAL/ENOSPC rather than trusting that.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/info.hpp"
#include "image/io/file.hpp"

namespace qnbd::image {

// What a device can do; the server derives NBD transmission flags from it.
struct Capabilities {
  bool writable = false;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = false;
  bool can_write_zeroes = false;
  bool can_fast_zero = false;   // write_zeroes(fast_only) can succeed quickly
  bool can_multi_conn = true;   // one shared object: flush is visible to all
  std::uint32_t min_block = 1;  // smallest I/O unit honoured exactly
  std::uint32_t preferred_block = 4096;
};

// One extent of block status, consecutive from the requested offset.
struct Extent {
  std::uint64_t length = 0;
  bool allocated = false;  // data is stored (in this image or its backing chain); false = hole
  bool zero = false;       // reads as zeroes
  // Which layer supplies the data: 0 = none in the chain, 1 = this image,
  // 2 = its backing file, ... (NBD qemu:allocation-depth).
  std::uint32_t depth = 0;
};

// One layer's status for a range, as QEMU's bdrv_block_status on one node
// (its driver plus the generic part in block/io.c). Used to walk backing
// chains and by `qnbd map`, which prints the same fields as
// `qemu-img map --output=json`.
struct LayerStatus {
  std::uint64_t length = 0;   // bytes with this status, from the queried offset
  bool data = false;          // BDRV_BLOCK_DATA: reads come from this layer's storage
  bool zero = false;          // BDRV_BLOCK_ZERO: reads as zeroes
  bool present = false;       // BDRV_BLOCK_ALLOCATED: this layer decides the contents
  bool offset_valid = false;  // BDRV_BLOCK_OFFSET_VALID: host_offset is meaningful
  bool compressed = false;
  std::uint64_t host_offset = 0;
  const File* file = nullptr;  // the file host_offset points into
};

// Where a range's bytes lie in a host file, for reads the server sends
// straight from the page cache (splice(2)) instead of copying them through
// a buffer (BlockDevice::host_run).
struct HostRun {
  std::uint64_t length = 0;       // bytes from the queried offset (>= 1)
  int fd = -1;                    // -1: this run must go through read()
  std::uint64_t host_offset = 0;  // where the run starts in fd
};

// One run of a dirty bitmap's status (NBD qemu:dirty-bitmap:NAME context).
struct BitmapExtent {
  std::uint64_t length = 0;
  bool dirty = false;  // NBD_STATE_DIRTY
};

// ---- Live bitmap changes (the control socket's bitmap commands and
// checkpoints; image/checkpoint.hpp runs them) ----

// One operation of a live bitmap edit: the meaning of `qnbd bitmap` at rest
// (image/qcow2/bitmap_edit.hpp), on an image open for writing.
struct LiveBitmapOp {
  enum class Kind { add, remove, clear, enable, disable, merge };
  Kind kind = Kind::add;
  std::string name;               // the bitmap the operation applies to
  std::string source;             // merge: the bitmap merged into `name`
  std::uint64_t granularity = 0;  // add: 0 = the at-rest default
  bool disabled = false;          // add: create it disabled
};

// A bitmap as the control socket's status shows it.
struct BitmapState {
  std::string name;
  std::uint64_t granularity = 0;
  bool enabled = false;  // recording writes
  bool in_use = false;   // found in_use (inconsistent) at open: only remove works
  std::uint64_t dirty_bytes = 0;
};

// A validated live edit of one device, holding the device's edit lock until
// destroyed. checkpoint.cpp drives it: commit() with the device's write
// gate closed (in memory only, cannot fail), then persist() with writes
// running again.
class BitmapTransaction {
 public:
  virtual ~BitmapTransaction() = default;
  virtual void commit() noexcept = 0;
  [[nodiscard]] virtual Result<void> persist() = 0;
};

class WriteGate;

struct ZeroFlags {
  bool may_unmap = true;   // may release allocation (NBD: NO_HOLE not set)
  bool fast_only = false;  // fail with ENOTSUP unless it is cheap (NBD FAST_ZERO)
  bool fua = false;
  // Leave ranges that already read as zeroes and hold nothing (qcow2: whole
  // L2 spans without a table) as they are, instead of marking them zero in
  // this layer as QEMU does. For requests QEMU could never receive (longer
  // than a compact request header carries), so that zeroing a whole huge
  // sparse image stays cheap.
  bool skip_empty_spans = false;
};

struct DiscardFlags {
  bool fua = false;
  // As ZeroFlags::skip_empty_spans: for requests QEMU could never receive.
  bool skip_empty_spans = false;
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  // Virtual size in bytes.
  virtual std::uint64_t size() const = 0;
  virtual Capabilities capabilities() const = 0;
  // "raw" or "qcow2".
  virtual const char* format() const = 0;

  [[nodiscard]] virtual Result<void> read(std::span<std::byte> buf, std::uint64_t offset) = 0;
  [[nodiscard]] virtual Result<void> write(std::span<const std::byte> buf, std::uint64_t offset, bool fua) = 0;
  [[nodiscard]] virtual Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) = 0;
  [[nodiscard]] virtual Result<void> discard(std::uint64_t offset, std::uint64_t length, DiscardFlags flags) = 0;
  [[nodiscard]] virtual Result<void> flush() = 0;

  // Fill `out` with consecutive extents starting at offset, covering at most
  // `length` bytes (and at least one byte when length > 0). Returns how many
  // extents were written; adjacent extents with equal status are merged. The
  // total may be less than length when `out` fills up. Never allocates on the
  // hot path: metadata comes from the engine's bounded cache.
  [[nodiscard]] virtual Result<std::size_t> block_status(std::uint64_t offset, std::uint64_t length,
                                                         std::span<Extent> out) = 0;

  // Status of [offset, offset + max_length) in this layer only (no backing
  // recursion); length >= 1 when max_length >= 1. A range this layer does
  // not decide has present = false, and zero = true if there is nothing
  // below (no backing, or past the backing file's end), as QEMU reports.
  // The default: everything is data of this layer.
  [[nodiscard]] virtual Result<LayerStatus> layer_status(std::uint64_t /*offset*/, std::uint64_t max_length) {
    LayerStatus st;
    st.length = max_length;
    st.data = st.present = true;
    return st;
  }
  // The first run of [offset, offset + max_length) as bytes of a host
  // file. A device names a descriptor only where what a guest offset maps
  // to cannot change while the device is open (a raw file; a qcow2 image
  // opened read-only): the server takes the pages after this call returns
  // and the socket hands them to the client later still, holding no lock,
  // so on a writable qcow2 a cluster freed and given to another offset in
  // between would send that offset's bytes. Bytes of a host range that a
  // concurrent write changes in place are what any read racing that write
  // may return (NBD proto.md "Ordering of messages and writes"). The
  // default: every run goes through read().
  [[nodiscard]] virtual Result<HostRun> host_run(std::uint64_t /*offset*/, std::uint64_t max_length) {
    return HostRun{max_length, -1, 0};
  }
  // The backing image, or nullptr (owned by this device).
  virtual BlockDevice* backing() const { return nullptr; }
  // Description for `qnbd info`.
  virtual ImageInfo info() const {
    ImageInfo i;
    i.format = format();
    i.virtual_size = size();
    return i;
  }

  // ---- Persistent dirty bitmaps (qcow2 bitmaps extension, qcow2.txt "Bitmaps") ----
  // The server exports a bitmap as the NBD context qemu:dirty-bitmap:NAME.
  //
  // Find bitmap `name` and make it exportable: loads its data on first use.
  // Refused, with qemu-nbd's reasons, when the name is unknown (ENOENT), the
  // bitmap is in_use/inconsistent (EINVAL), or it is enabled while the export
  // is read-only on a writable image (EINVAL). Returns a handle for
  // bitmap_status(); the same name always gives the same handle.
  [[nodiscard]] virtual Result<std::size_t> export_bitmap(const std::string& name) {
    return make_error(ENOENT, "no persistent dirty bitmap named '{}' (format {} has none)", name, format());
  }
  // A server about to accept writes: enabled bitmaps are marked in_use on
  // disk now (as qemu does when it opens an image for writing), so the
  // first write does not wait for that header update. Without this call
  // the first write does it. No-op for formats without bitmaps.
  [[nodiscard]] virtual Result<void> start_tracking() { return ok(); }
  // Dirty status of bitmap `handle` from offset: fills `out` with merged
  // consecutive runs at the bitmap's granularity (the first run starts at
  // offset, the last is clipped at offset+length and at the device end).
  // Returns the count; never allocates. Writes through this device mark the
  // enabled bitmaps before they are acknowledged.
  [[nodiscard]] virtual Result<std::size_t> bitmap_status(std::size_t /*handle*/, std::uint64_t /*offset*/,
                                                          std::uint64_t /*length*/, std::span<BitmapExtent> /*out*/) {
    return make_error(ENOENT, "no such bitmap");
  }

  // The persistent bitmaps now (may load a bitmap's data to count it).
  [[nodiscard]] virtual Result<std::vector<BitmapState>> bitmap_states() { return std::vector<BitmapState>{}; }
  // Validate `ops` against the bitmaps now and load what they need; the
  // edit is applied by the returned transaction (see BitmapTransaction).
  // Errors use qemu-img's words (ENOENT not found, EEXIST exists, EINVAL
  // inconsistent or bad argument, ENOTSUP no bitmaps in this format).
  [[nodiscard]] virtual Result<std::unique_ptr<BitmapTransaction>> begin_bitmap_edit(
      const std::vector<LiveBitmapOp>& /*ops*/) {
    return make_error(ENOTSUP, "format {} has no persistent dirty bitmaps", format());
  }
  // The gate every guest write of this device passes (null: the device has
  // no bitmaps to switch).
  virtual WriteGate* write_gate() { return nullptr; }

  // Flush and release; after close() only the destructor may be called.
  // Called on clean shutdown so a writer can store state (bitmaps, the dirty
  // bit) and report errors; the destructor must not throw.
  [[nodiscard]] virtual Result<void> close() { return flush(); }
};

enum class ImageFormat { detect, raw, qcow2 };

// Which internal snapshot to serve (qemu-nbd -l/--load-snapshot). QEMU's
// rules: a bare argument is tried as an id, then as a name
// (bdrv_snapshot_load_tmp_by_id_or_name); with snapshot.id= and/or
// snapshot.name= each one given must match (find_snapshot_by_id_and_name).
struct SnapshotRef {
  std::string id;
  std::string name;
  bool has_id = false;
  bool has_name = false;
  bool id_or_name = false;  // the bare form: `id` holds the argument
};

struct OpenOptions {
  ImageFormat format = ImageFormat::detect;
  bool read_only = true;
  CacheMode cache = CacheMode::writeback;
  bool discard_unmap = false;  // --discard=unmap: trims release space
  std::string data_file;       // overrides the qcow2 external data file name
  LockOptions lock;            // QEMU-compatible image locks (image/io/lock.hpp)
  // Backing files opened for a writable top image are read-only; the chain
  // is bounded so a loop or a hostile chain cannot recurse forever.
  unsigned max_backing_depth = 64;
  // Persistent bitmaps that survive a crash (docs/crash-safe-bitmaps.md):
  // a writable qcow2 open keeps a write-intent record beside the image
  // (IMAGE.qnbd-intent) and recovers from one left by a crash. Off: the
  // record is neither written nor trusted (bitmaps of a crashed writer stay
  // inconsistent). recovery_chunk: bytes of guest disk per record bit (a
  // power of two, 64 KiB to 1 TiB; 0 = the default, 64 MiB).
  bool recover_bitmaps = true;
  std::uint64_t recovery_chunk = 0;
  // Serve this internal snapshot of the top image instead of its active
  // layer (read-only only; a qcow2 image only). The disk keeps the image's
  // current size, as qemu's qcow2_snapshot_load_tmp leaves it.
  std::optional<SnapshotRef> load_snapshot;
  // The top image is a range of its file (QEMU's raw node with offset and
  // size under the format: json:/--image-opts, image/io/range_file.hpp):
  // it starts `offset` bytes in and is `size` bytes long (else runs to the
  // end of the file). Checked against the file as QEMU checks it.
  struct FileRange {
    std::uint64_t offset = 0;
    std::optional<std::uint64_t> size;
  };
  std::optional<FileRange> file_range;
  // qcow2 "backing": null: the top image's backing file is not opened;
  // what it would have supplied reads as zeroes, unallocated.
  bool no_backing = false;
  // Opens the top image's backing device instead of the file its header
  // names: -s/--snapshot's overlay over an image given with a range or
  // "backing": null, which a file name in the overlay cannot express.
  std::function<Result<std::unique_ptr<BlockDevice>>()> open_top_backing;
};

// block_status() for any device, from layer_status() walked down the
// backing chain: allocated = data somewhere, zero, depth = 1-based layer that
// decides the contents (0: none; past a shorter backing layer's end, that
// layer, as qemu-nbd). Merges equal neighbours; no heap use.
[[nodiscard]] Result<std::size_t> chain_block_status(BlockDevice& top, std::uint64_t offset, std::uint64_t length,
                                                     std::span<Extent> out);

// Whether block status through the chain calls every byte of
// [offset, offset + length) zero (a range inside top).
[[nodiscard]] Result<bool> chain_reads_zero(BlockDevice& top, std::uint64_t offset, std::uint64_t length);

// Append `x` to out[0, n), merged into the last extent when its status
// (allocated, zero, depth) is the same; false when a new extent is needed
// and `out` is full (n unchanged).
[[nodiscard]] bool append_extent(std::span<Extent> out, std::size_t& n, const Extent& x);

// One entry of `qemu-img map --output=json` (its MapEntry): depth is
// 0-based here, as qemu-img prints it.
struct MapEntry {
  std::uint64_t start = 0;
  std::uint64_t length = 0;
  std::uint32_t depth = 0;
  bool present = false;
  bool zero = false;
  bool data = false;
  bool compressed = false;
  bool has_offset = false;
  std::uint64_t offset = 0;
  const File* file = nullptr;  // file `offset` refers to (when has_offset)
};
// qemu-img's get_block_status(): the status of the range at offset, walking
// the chain until a layer decides it. Not merged.
[[nodiscard]] Result<MapEntry> map_block_status(BlockDevice& top, std::uint64_t offset, std::uint64_t length);

// Open an image file, detecting the format unless told. Errors are one line
// naming the file and the defect.
[[nodiscard]] Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, const OpenOptions& options);

// qemu-nbd -s/--snapshot: the image opened read-only as the backing file of
// a new, writable qcow2 overlay in $TMPDIR (else /var/tmp), so writes never
// reach the image. The overlay file is unlinked before this returns (its
// descriptor keeps it); `options` apply to both, read_only and
// recover_bitmaps aside.
[[nodiscard]] Result<std::unique_ptr<BlockDevice>> open_image_with_temporary_overlay(const std::string& path,
                                                                                     const OpenOptions& options);

}  // namespace qnbd::image
