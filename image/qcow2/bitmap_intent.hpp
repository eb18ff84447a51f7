// Write-intent record: what makes the enabled persistent bitmaps of a
// writable qcow2 image survive a crash or a power loss
// (docs/crash-safe-bitmaps.md has the design, the format and the argument).
//
// The record is a small file beside the image (IMAGE.qnbd-intent) holding
// one bit per "recovery chunk" of the virtual disk. Before the first guest
// change of a chunk is issued, its bit is written to the record and the
// record is synced; so every chunk that may hold a change not yet in the
// stored bitmaps is marked durably. After a crash, the next writable open
// ORs the marked chunks into the bitmaps' last stored contents and stores
// them consistent (in_use cleared).
//
// The record is only trusted while the image says so: autoclear feature bit
// AUTOCLEAR_QNBD_INTENT (qcow2.txt "Header" autoclear features: a writer
// that does not know a bit must clear it before writing). QEMU clears every
// unknown autoclear bit on each writable open (qemu-io, qemu-img check -r,
// qemu-img bitmap, qemu-nbd), so a change made by any other tool makes the
// record stale, and the record also names the bitmap directory (offset,
// size, checksum) and the disk size it was armed for.
//
// Thread-safety: IntentRecord::mark may be called from any thread; one
// mutex serializes the record writes, a set chunk is tested without it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/io/file.hpp"

namespace qnbd::image::qcow2 {

// Reserved autoclear bit used by qnbd only (never assigned by qcow2.txt;
// the highest bit to stay clear of future assignments).
inline constexpr std::uint64_t AUTOCLEAR_QNBD_INTENT = 1ull << 63;

// Whether the qcow2 header in `file` has AUTOCLEAR_QNBD_INTENT set (a
// crashed qnbd writer's record may be pending); false for a file too short
// to hold the autoclear word.
[[nodiscard]] Result<bool> intent_bit_set(File& file);
// Clear AUTOCLEAR_QNBD_INTENT in the header and sync: the record is no
// longer trusted (a tool changed what it does not cover).
[[nodiscard]] Result<void> clear_intent_bit(File& file);

// The file's fixed header (big-endian, as qcow2):
//   0  u32 magic "QNWI"    4  u32 version (1)
//   8  u64 chunk_size      16 u64 disk_size (the header's size field)
//   24 u64 bitmap_directory_offset      32 u64 bitmap_directory_size
//   40 u64 directory_checksum (FNV-1a 64 of the directory as armed: the
//      tracked entries in_use)
//   48 u64 directory_checksum_before (the same directory before in_use was
//      set: what is on disk if the crash came inside the arming sequence)
//   56 u32 nb_bitmaps      60 u32 chunk_bits_offset (a multiple of 512)
//   64 u64 header_checksum (FNV-1a 64 of bytes 0..63 and the tracked bits)
//   72 tracked bits: ceil(nb_bitmaps / 8) bytes, bit i (LSB first) set if
//      directory entry i was tracked (enabled, consistent) when armed
//   chunk_bits_offset: ceil(chunks / 8) bytes, bit c = chunk c may differ.
inline constexpr std::uint32_t INTENT_MAGIC = 0x514e5749;  // "QNWI"
inline constexpr std::uint32_t INTENT_VERSION = 1;
inline constexpr std::uint64_t INTENT_MIN_CHUNK = 64 * 1024;
inline constexpr std::uint64_t INTENT_MAX_CHUNK = 1ull << 40;
inline constexpr std::uint64_t INTENT_DEFAULT_CHUNK = 64ull << 20;

std::uint64_t fnv1a64(std::span<const std::byte> data, std::uint64_t h = 0xcbf29ce484222325ull);

// How a BitmapStore reaches its record file. open(true) creates (or
// truncates) it and makes its name durable; open(false) opens an existing
// one, returning null if there is none. remove() deletes it (best effort).
struct IntentAccess {
  std::function<Result<std::unique_ptr<File>>(bool create)> open;
  std::function<void()> remove;  // the record and the next one
  // The next record, armed for the directory a live edit is about to switch
  // to while the record still covers the one on disk
  // (docs/crash-safe-bitmaps.md, "Live edits"); promote_next makes it the
  // record (an atomic rename). Optional: without them a live edit retires
  // the record.
  std::function<Result<std::unique_ptr<File>>(bool create)> open_next;
  std::function<Result<void>()> promote_next;
  std::function<void()> remove_next;
  // The existing record opened read-write, so that a writable open whose
  // recovery could not store the bitmaps keeps it armed
  // (docs/crash-safe-bitmaps.md, "When recovery cannot store"). Optional:
  // without it that open fails, as it did before.
  std::function<Result<std::unique_ptr<File>>()> open_writable;
  std::uint64_t chunk_size = INTENT_DEFAULT_CHUNK;
  std::string name;  // for messages and info
  explicit operator bool() const { return static_cast<bool>(open); }
};

// The naming rule: the record of image PATH is PATH + ".qnbd-intent" (the
// path as given to open, in the image's directory). create syncs the
// directory so the name survives a power loss; chunk_size 0 = default.
inline constexpr const char* INTENT_SUFFIX = ".qnbd-intent";
IntentAccess intent_access(const std::string& image_path, std::uint64_t chunk_size);

// What the image identifies a record by.
struct IntentIdentity {
  std::uint64_t disk_size = 0;
  std::uint64_t directory_offset = 0;
  std::uint64_t directory_size = 0;
  std::uint64_t directory_checksum = 0;         // as armed (in_use set)
  std::uint64_t directory_checksum_before = 0;  // arm: before marking; read: unused
  std::uint32_t nb_bitmaps = 0;
};

// A record read back for recovery.
struct IntentContents {
  std::uint64_t chunk_size = 0;
  bool before_marking = false;        // the directory on disk is the pre-arming one
  std::vector<bool> tracked;          // per directory entry
  std::vector<std::uint64_t> chunks;  // indexes of marked chunks
};

// Read and validate `file` against `id` (id.directory_checksum: the
// directory on disk now, which may match either checksum the record
// holds); an error says why it is not trusted (the caller then treats the
// bitmaps as inconsistent).
[[nodiscard]] Result<IntentContents> read_intent(File& file, const IntentIdentity& id);

class IntentRecord {
 public:
  // Write a fresh record (header, tracked bits, all chunks clear) to `file`
  // and sync it. The image's autoclear bit may be set only after this.
  [[nodiscard]] static Result<std::unique_ptr<IntentRecord>> arm(std::unique_ptr<File> file, const IntentIdentity& id,
                                                                 std::uint64_t chunk_size,
                                                                 const std::vector<bool>& tracked);

  // Take over a record that read_intent accepted (`contents`, read from
  // `file` for a directory of `nb_bitmaps` entries and a disk of
  // `disk_size` bytes): nothing is written; later marks add to the chunks
  // it already holds. `file` must be open read-write.
  [[nodiscard]] static Result<std::unique_ptr<IntentRecord>> adopt(std::unique_ptr<File> file,
                                                                   const IntentContents& contents,
                                                                   std::uint64_t disk_size, std::uint32_t nb_bitmaps);

  // Make every chunk touched by [offset, offset+length) durable in the
  // record; returns once it is (no I/O when all were already marked).
  [[nodiscard]] Result<void> mark(std::uint64_t offset, std::uint64_t length);

  // Mark the chunks `other` has marked (same chunk size), with one write
  // and one sync: a record armed for a new directory starts with every
  // chunk the old one covers.
  [[nodiscard]] Result<void> mark_from(IntentRecord& other);

  std::uint64_t chunk_size() const { return chunk_size_; }
  std::uint64_t marked_chunks() const { return marked_count_.load(std::memory_order_relaxed); }

  // Tests only: the mutations the crash tests must detect (the record
  // write not synced before the guest write; one chunk never recorded; a
  // next record that does not start with the old record's chunks).
  static inline std::atomic<bool> test_drop_sync{false};
  static inline std::atomic<bool> test_skip_mark{false};
  static inline std::atomic<bool> test_skip_fill{false};

 private:
  IntentRecord() = default;
  std::unique_ptr<File> file_;
  std::uint64_t chunk_size_ = 0;
  unsigned chunk_shift_ = 0;
  std::uint64_t disk_size_ = 0;
  std::uint64_t bits_offset_ = 0;
  std::mutex mutex_;
  std::vector<std::byte> bits_;                         // durable copy, under mutex_
  std::unique_ptr<std::atomic<std::uint64_t>[]> done_;  // published (durable) chunk bits
  std::size_t done_words_ = 0;
  std::atomic<std::uint64_t> marked_count_{0};
};

}  // namespace qnbd::image::qcow2
