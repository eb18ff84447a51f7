// Fuzz entry: the write-intent record (IMAGE.qnbd-intent,
// docs/crash-safe-bitmaps.md) read back by a writable open, the path
// `qnbd serve` takes on an image a crashed writer left with
// AUTOCLEAR_QNBD_INTENT set. The image is one of the crash states of
// fuzz_intent.hpp (made by the real code), optionally with a few bytes
// changed (the header fields and bitmap directory the record's identity is
// checked against); the record's bytes are the fuzzer's.
//
// Input: u8 select (template = (select & 0x3f) % count; bit 7: no record
// file at all; bit 6: the record lies under the next record's name,
// IMAGE.qnbd-intent.next, as a crash inside a live edit leaves it, with
// no IMAGE.qnbd-intent), u8 patches (% 5), each u32 offset + u8 xor (offset bit 31: inside
// the first 512 bytes, else anywhere in the image), then the record bytes.
//
// Properties checked (each can fail):
// - a record the open does not recover from changes nothing: the open
//   succeeds or fails as it does with no record, leaves the image file
//   byte for byte as that open does, and the bitmaps in the same state
//   (inconsistent ones stay inconsistent, exactly as without the feature);
//   the reason is one line; except that a trusted record whose bitmap
//   store would allocate over metadata (the image's refcounts call that
//   cluster free) fails the open at the overlap guard, in one line, and
//   only a plausible record gets there;
// - a record is recovered from only if it passes this target's own
//   validation (magic, version, chunk size a power of two in [64 KiB,
//   1 TiB], the tracked-bits offset, the header checksum, the disk size).
// Setting QNBD_FUZZ_INTENT_SEEDS=DIR makes the first run write the seed
// corpus (valid records of every template and a few damaged ones) to DIR.
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "common/endian.hpp"
#include "fuzz_input.hpp"
#include "fuzz_intent.hpp"
#include "sparse_file.hpp"

using namespace qnbd;
using namespace qnbd::image;
using qnbd::fuzz::Reader;

namespace {

const std::vector<fuzz::IntentTemplate>& templates() {
  static const auto t = [] {
    std::vector<fuzz::IntentTemplate> v;
    for (const auto& s : fuzz::intent_shapes()) {
      v.push_back(fuzz::make_intent_template(s));
      if (v.back().image.empty() || v.back().record.empty()) fuzz::fail("building an intent template failed");
    }
    return v;
  }();
  return t;
}

// The templates as SparseFiles: a copy per run shares their pages.
const std::vector<std::unique_ptr<fuzz::SparseFile>>& template_files() {
  static const auto f = [] {
    std::vector<std::unique_ptr<fuzz::SparseFile>> v;
    for (const auto& t : templates()) {
      v.push_back(std::make_unique<fuzz::SparseFile>("f.qcow2"));
      (void)v.back()->pwrite(t.image, 0);
    }
    return v;
  }();
  return f;
}

struct Outcome {
  bool opened = false;
  std::string state, detail, error;
  std::unique_ptr<fuzz::SparseFile> file;
  std::vector<std::pair<std::string, bool>> in_use;
};

Outcome open_once(const fuzz::SparseFile& image, const std::span<const std::uint8_t>* record, bool as_next = false) {
  Outcome out;
  out.file = std::make_unique<fuzz::SparseFile>(image, "f.qcow2");
  qcow2::Qcow2Image::Parts parts;
  parts.file = std::make_unique<image::ForwardingFile>(*out.file);
  parts.path = "f.qcow2";
  parts.intent.name = "f.qcow2.qnbd-intent";
  parts.intent.chunk_size = 65536;
  auto record_file = [record](bool create, bool present, const char* name) -> Result<std::unique_ptr<File>> {
    if (create) return std::unique_ptr<File>(std::make_unique<MemFile>(name));
    if (!record || !present) return std::unique_ptr<File>();
    auto b = std::as_bytes(*record);
    return std::unique_ptr<File>(std::make_unique<MemFile>(name, std::vector<std::byte>(b.begin(), b.end())));
  };
  parts.intent.open = [=](bool create) { return record_file(create, !as_next, "f.qcow2.qnbd-intent"); };
  parts.intent.open_next = [=](bool create) { return record_file(create, as_next, "f.qcow2.qnbd-intent.next"); };
  parts.intent.promote_next = []() -> Result<void> { return ok(); };
  parts.intent.remove = [] {};
  parts.intent.remove_next = [] {};
  OpenOptions o;
  o.format = ImageFormat::qcow2;
  o.read_only = false;
  auto img = qcow2::Qcow2Image::open(std::move(parts), o);
  if (img) {
    out.opened = true;
    out.state = (*img)->intent_state();
    out.detail = (*img)->intent_detail();
    for (const auto& b : (*img)->bitmaps()) out.in_use.emplace_back(b.name, b.in_use);
    (void)(*img)->close();
  } else {
    out.error = img.error().message;
  }
  return out;
}

// This target's own reading of the record format (bitmap_intent.hpp), not
// the engine's: what a record must at least satisfy to be trusted.
bool record_plausible(std::span<const std::uint8_t> r, fuzz::SparseFile& image) {
  std::byte size_field[8]{};
  (void)image.pread(size_field, 24);
  if (r.size() < 72) return false;
  const auto* p = reinterpret_cast<const std::byte*>(r.data());
  if (load_be32(p) != qcow2::INTENT_MAGIC || load_be32(p + 4) != 1) return false;
  const std::uint64_t chunk = load_be64(p + 8);
  if (!std::has_single_bit(chunk) || chunk < (64u << 10) || chunk > (1ull << 40)) return false;
  if (load_be64(p + 16) != load_be64(size_field)) return false;  // the header's size
  const std::uint64_t tracked = (std::uint64_t{load_be32(p + 56)} + 7) / 8;
  if (load_be32(p + 60) != (72 + tracked + 511) / 512 * 512 || r.size() < 72 + tracked) return false;
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t i = 0; i < 72 + tracked; ++i) {
    if (i >= 64 && i < 72) continue;
    h = (h ^ r[i]) * 0x100000001b3ull;
  }
  return h == load_be64(p + 64);
}

void write_seeds(const char* dir) {
  unsigned n = 0;
  auto put = [&](std::uint8_t select, const std::vector<std::uint8_t>& patches, std::vector<std::byte> rec,
                 const char* what) {
    std::string path = std::string(dir) + "/seed-t" + std::to_string(select & 0x3f) + "-" + what;
    std::ofstream f(path, std::ios::binary);
    f.put(static_cast<char>(select));
    f.put(static_cast<char>(patches.size() / 5));
    f.write(reinterpret_cast<const char*>(patches.data()), static_cast<std::streamsize>(patches.size()));
    f.write(reinterpret_cast<const char*>(rec.data()), static_cast<std::streamsize>(rec.size()));
    ++n;
  };
  for (std::size_t i = 0; i < templates().size(); ++i) {
    const auto& t = templates()[i];
    const auto sel = static_cast<std::uint8_t>(i);
    put(sel, {}, t.record, "valid");
    put(sel | 0x80, {}, {}, "no-record");
    put(sel | 0x40, {}, t.record, "valid-as-next");
    put(sel, {}, std::vector<std::byte>(t.record.begin(), t.record.begin() + 40), "truncated");
    auto bad = t.record;
    bad[0] ^= std::byte{1};
    put(sel, {}, bad, "bad-magic");
    bad = t.record;
    bad[11] ^= std::byte{0x40};  // chunk size: not a power of two; checksum then wrong too
    put(sel, {}, bad, "bad-chunk");
    // The image's size field changed (byte 31 of the header, offset bit 31
    // set: inside the first 512 bytes): the record is for another disk.
    put(sel, {31, 0, 0, 0x80, 0x02}, t.record, "image-size-changed");
  }
  std::fprintf(stderr, "wrote %u intent seeds to %s\n", n, dir);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const bool seeded = [] {
    if (const char* d = std::getenv("QNBD_FUZZ_INTENT_SEEDS")) write_seeds(d);
    return true;
  }();
  (void)seeded;
  fuzz::quiet_logs();
  Reader r({data, size});
  const std::uint8_t select = r.u8();
  const std::size_t which = (select & 0x3f) % templates().size();
  fuzz::SparseFile image(*template_files()[which], "f.qcow2");
  const std::size_t image_size = templates()[which].image.size();
  const unsigned patches = r.u8() % 5;
  for (unsigned i = 0; i < patches; ++i) {
    std::uint32_t off = r.u32();
    const std::uint8_t x = r.u8();
    off = (off & 0x80000000u) ? off & 0x1ff : static_cast<std::uint32_t>(off % image_size);
    std::byte b[1]{};
    (void)image.pread(b, off);
    b[0] ^= std::byte{x};
    (void)image.pwrite(b, off);
  }
  const std::span<const std::uint8_t> record = r.take(r.left());
  const bool has_record = !(select & 0x80);
  const bool as_next = select & 0x40;

  const Outcome with = open_once(image, has_record ? &record : nullptr, as_next);
  if (with.opened && with.state == "recovered") {
    QNBD_FUZZ_CHECK(has_record && record_plausible(record, image));
    return 0;
  }
  if (!has_record) return 0;
  QNBD_FUZZ_CHECK(with.detail.find('\n') == std::string::npos);
  // A record the open trusts makes it store the bitmaps, and on an image
  // whose refcounts call a metadata cluster free the allocation for them
  // lands on it: the engine's pre-write overlap guard refuses, marks the
  // image corrupt and fails the open with one line, as QEMU does when any
  // write reaches such a cluster (corpus/intent/recovery-allocates-over-l1).
  // Only a plausible record can get that far.
  if (!with.opened && with.error.find("Preventing invalid write on metadata") != std::string::npos) {
    QNBD_FUZZ_CHECK(record_plausible(record, image));
    QNBD_FUZZ_CHECK(with.error.find('\n') == std::string::npos);
    return 0;
  }
  const Outcome without = open_once(image, nullptr);
  if (with.opened != without.opened || !with.file->same_contents(*without.file) || with.in_use != without.in_use) {
    std::fprintf(stderr, "with the record: %s %s %s (%s); without: %s %s (%s)\n", with.opened ? "opened" : "failed",
                 with.state.c_str(), with.detail.c_str(), with.error.c_str(), without.opened ? "opened" : "failed",
                 without.state.c_str(), without.error.c_str());
    fuzz::fail("a record not recovered from changed the outcome of the open");
  }
  return 0;
}
