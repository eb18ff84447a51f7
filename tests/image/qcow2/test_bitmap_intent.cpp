// The write-intent record read back at a writable open
// (docs/crash-safe-bitmaps.md, "Recovery"): a crash state made by the real
// code (image and record copied while the writer is still open), then the
// record damaged one way per case. Each damaged record must be refused
// with a one-line reason, and the open must then do exactly what it does
// with no record at all: the same bytes in the image file, the bitmaps left
// inconsistent the same way. The undamaged record must be recovered from.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>

#include "common/endian.hpp"
#include "image/io/fault_file.hpp"
#include "image/io/forwarding_file.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/check.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/format.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/qcow2_image.hpp"

using namespace qnbd;
using namespace qnbd::image;
namespace q = qnbd::image::qcow2;

namespace {

class Lent final : public File {
 public:
  explicit Lent(File& f) : f_(f) {}
  Result<std::size_t> pread(std::span<std::byte> b, std::uint64_t o) override { return f_.pread(b, o); }
  Result<void> pwrite(std::span<const std::byte> b, std::uint64_t o) override { return f_.pwrite(b, o); }
  Result<void> flush() override { return f_.flush(); }
  Result<void> truncate(std::uint64_t s) override { return f_.truncate(s); }
  Result<std::uint64_t> size() override { return f_.size(); }
  const std::string& name() const override { return f_.name(); }

 private:
  File& f_;
};

OpenOptions writable() {
  OpenOptions o;
  o.read_only = false;
  return o;
}

constexpr std::uint64_t kSize = 8u << 20;
constexpr std::uint64_t kChunk = 65536;

struct Crash {
  std::vector<std::byte> before;  // the image before the session's first write
  std::vector<std::byte> image, record;
};

// Two enabled bitmaps; 4 KiB written at 1 MiB; the power goes while open.
const Crash& crash() {
  static const Crash c = [] {
    Crash c;
    MemFile file("c.qcow2");
    q::CreateOptions o;
    o.size = kSize;
    REQUIRE(q::create_qcow2(file, o));
    for (const char* name : {"b0", "b1"}) {
      q::BitmapEdit e;
      e.bitmap = name;
      e.ops.push_back({q::BitmapOp::Kind::add, ""});
      REQUIRE(q::edit_bitmaps(file, e));
    }
    c.before = file.contents();
    MemFile rec("c.qcow2.qnbd-intent");
    q::Qcow2Image::Parts parts;
    parts.file = std::make_unique<Lent>(file);
    parts.path = "c.qcow2";
    parts.intent.name = rec.name();
    parts.intent.chunk_size = kChunk;
    parts.intent.open = [&rec](bool) -> Result<std::unique_ptr<File>> {
      return std::unique_ptr<File>(std::make_unique<Lent>(rec));
    };
    auto img = q::Qcow2Image::open(std::move(parts), writable());
    REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
    std::vector<std::byte> b(4096, std::byte{0x5a});
    REQUIRE((*img)->write(b, 1u << 20, false));
    c.image = file.contents();
    c.record = rec.contents();
    return c;
  }();
  return c;
}

struct Outcome {
  std::string state, detail;
  std::vector<std::byte> file;
  std::vector<bool> in_use;
};

// A writable open of the crash image with `record` (none if null), closed.
Outcome reopen(const std::vector<std::byte>* record) {
  Outcome out;
  MemFile file("c.qcow2", crash().image);
  q::Qcow2Image::Parts parts;
  parts.file = std::make_unique<Lent>(file);
  parts.path = "c.qcow2";
  parts.intent.name = "c.qcow2.qnbd-intent";
  parts.intent.chunk_size = kChunk;
  parts.intent.open = [record](bool create) -> Result<std::unique_ptr<File>> {
    if (create) return std::unique_ptr<File>(std::make_unique<MemFile>("c.qcow2.qnbd-intent"));
    if (!record) return std::unique_ptr<File>();
    return std::unique_ptr<File>(std::make_unique<MemFile>("c.qcow2.qnbd-intent", *record));
  };
  parts.intent.remove = [] {};
  auto img = q::Qcow2Image::open(std::move(parts), writable());
  REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
  out.state = (*img)->intent_state();
  out.detail = (*img)->intent_detail();
  for (const auto& b : (*img)->bitmaps()) out.in_use.push_back(b.in_use);
  REQUIRE((*img)->close());
  out.file = file.contents();
  return out;
}

// Recompute the header checksum (bytes 0..63 and the tracked bits), so a
// case changes only the field it names.
void reseal(std::vector<std::byte>& r) {
  const std::size_t tracked = (load_be32(r.data() + 56) + 7) / 8;
  std::uint64_t sum = q::fnv1a64(std::span(r).first(64));
  if (r.size() >= 72 + tracked) sum = q::fnv1a64(std::span(r).subspan(72, tracked), sum);
  store_be64(r.data() + 64, sum);
}

void expect_refused(std::vector<std::byte> record, const std::string& reason) {
  const Outcome none = reopen(nullptr);
  REQUIRE(none.state == "missing");
  REQUIRE(none.in_use == std::vector<bool>{true, true});  // inconsistent without a record
  const Outcome got = reopen(&record);
  INFO("detail: ", got.detail);
  CHECK(got.state == "stale");
  CHECK(got.detail.find(reason) != std::string::npos);
  CHECK(got.detail.find('\n') == std::string::npos);
  CHECK(got.in_use == none.in_use);
  CHECK(got.file == none.file);
}

}  // namespace

TEST_CASE("intent record: the undamaged record is recovered from") {
  const Outcome got = reopen(&crash().record);
  INFO("detail: ", got.detail);
  CHECK(got.state == "recovered");
  CHECK(got.in_use == std::vector<bool>{false, false});
}

TEST_CASE("intent record: a damaged record is refused and the bitmaps stay as without it") {
  const std::vector<std::byte>& good = crash().record;
  REQUIRE(good.size() >= 512 + 16);  // header, tracked bits, 128 chunk bits at 512

  SUBCASE("truncated inside the fixed header") {
    expect_refused(std::vector<std::byte>(good.begin(), good.begin() + 40), "truncated");
  }
  SUBCASE("truncated before the tracked bits") {
    expect_refused(std::vector<std::byte>(good.begin(), good.begin() + 72), "truncated");
  }
  SUBCASE("truncated inside the chunk bits") {
    expect_refused(std::vector<std::byte>(good.begin(), good.begin() + 512 + 8), "truncated");
  }
  SUBCASE("empty") { expect_refused({}, "truncated"); }
  SUBCASE("bad magic") {
    auto r = good;
    r[0] ^= std::byte{0x20};
    reseal(r);
    expect_refused(r, "bad magic");
  }
  SUBCASE("wrong version") {
    auto r = good;
    store_be32(r.data() + 4, 2);
    reseal(r);
    expect_refused(r, "unknown record version 2");
  }
  SUBCASE("header checksum wrong") {
    auto r = good;
    r[72] ^= std::byte{0x02};  // a tracked bit flipped, checksum left as is
    expect_refused(r, "checksum does not match");
  }
  SUBCASE("chunk size not a power of two") {
    auto r = good;
    store_be64(r.data() + 8, kChunk + 4096);
    reseal(r);
    expect_refused(r, "invalid chunk size");
  }
  SUBCASE("chunk size below 64 KiB") {
    auto r = good;
    store_be64(r.data() + 8, 32768);
    reseal(r);
    expect_refused(r, "invalid chunk size");
  }
  SUBCASE("chunk size above 1 TiB") {
    auto r = good;
    store_be64(r.data() + 8, 1ull << 41);
    reseal(r);
    expect_refused(r, "invalid chunk size");
  }
  SUBCASE("identity: another disk size") {
    auto r = good;
    store_be64(r.data() + 16, kSize * 2);
    reseal(r);
    expect_refused(r, "another disk size");
  }
  SUBCASE("identity: another bitmap directory offset") {
    auto r = good;
    store_be64(r.data() + 24, load_be64(r.data() + 24) + 65536);
    reseal(r);
    expect_refused(r, "bitmap directory changed");
  }
  SUBCASE("identity: another directory checksum") {
    auto r = good;
    store_be64(r.data() + 40, load_be64(r.data() + 40) ^ 1);
    store_be64(r.data() + 48, load_be64(r.data() + 48) ^ 1);
    reseal(r);
    expect_refused(r, "bitmap directory changed");
  }
  SUBCASE("nb_bitmaps past what the directory has (4 billion: refused before any allocation)") {
    auto r = good;
    store_be32(r.data() + 56, 0xffffffffu);
    reseal(r);
    expect_refused(r, "another bitmap directory");
  }
  SUBCASE("chunk_bits_offset past the end of the file") {
    auto r = good;
    store_be32(r.data() + 60, 1u << 30);
    reseal(r);
    expect_refused(r, "another bitmap directory");
  }
}

// ---- A recovery that cannot store (docs/crash-safe-bitmaps.md, "When
// recovery cannot store"): the open still serves the image, keeps the
// crashed session's record armed and the recovered bitmaps in memory, and
// the store at close (or the next open, after another crash) still finds
// every change.

namespace {

// A disk that fills up: any pwrite or truncate that would take the file
// past `room` fails with ENOSPC (the usual way a store fails: the file
// cannot grow). Overwrites inside it succeed.
class Filling final : public File {
 public:
  explicit Filling(File& f) : f_(f) {}
  std::uint64_t room = UINT64_MAX;
  Result<std::size_t> pread(std::span<std::byte> b, std::uint64_t o) override { return f_.pread(b, o); }
  Result<void> pwrite(std::span<const std::byte> b, std::uint64_t o) override {
    if (o + b.size() > room) return make_error(ENOSPC, "no space left on device (test)");
    return f_.pwrite(b, o);
  }
  Result<void> flush() override { return f_.flush(); }
  Result<void> truncate(std::uint64_t s) override {
    if (s > room) return make_error(ENOSPC, "no space left on device (test)");
    return f_.truncate(s);
  }
  Result<std::uint64_t> size() override { return f_.size(); }
  const std::string& name() const override { return f_.name(); }

 private:
  File& f_;
};

// The record of one test: a shared in-memory file behind every name.
struct RecordFiles {
  MemFile rec{"c.qcow2.qnbd-intent"};
  bool removed = false;
  q::IntentAccess access() {
    q::IntentAccess a;
    a.name = rec.name();
    a.chunk_size = kChunk;
    a.open = [this](bool create) -> Result<std::unique_ptr<File>> {
      if (create) REQUIRE(rec.truncate(0));
      if (removed && !create) return std::unique_ptr<File>();
      removed = false;
      return std::unique_ptr<File>(std::make_unique<Lent>(rec));
    };
    a.open_writable = [this]() -> Result<std::unique_ptr<File>> {
      return std::unique_ptr<File>(std::make_unique<Lent>(rec));
    };
    a.remove = [this] { removed = true; };
    return a;
  }
};

Result<std::unique_ptr<q::Qcow2Image>> open_with(std::unique_ptr<File> file, RecordFiles& r) {
  q::Qcow2Image::Parts parts;
  parts.file = std::move(file);
  parts.path = "c.qcow2";
  parts.intent = r.access();
  return q::Qcow2Image::open(std::move(parts), writable());
}

// The dirty 64 KiB granules of bitmap `name` (granularity 64 KiB), by index.
std::vector<std::uint64_t> dirty_granules(q::Qcow2Image& img, const std::string& name) {
  auto h = img.export_bitmap(name);
  REQUIRE_MESSAGE(h, (h ? "" : h.error().message));
  std::vector<std::uint64_t> out;
  std::uint64_t at = 0;
  while (at < kSize) {
    BitmapExtent e[64];
    auto n = img.bitmap_status(*h, at, kSize - at, e);
    REQUIRE(n);
    REQUIRE(*n > 0);
    for (std::size_t i = 0; i < *n; ++i) {
      if (e[i].dirty) {
        for (std::uint64_t g = at / kChunk; g < (at + e[i].length) / kChunk; ++g) out.push_back(g);
      }
      at += e[i].length;
    }
  }
  return out;
}

// The image read back with no fault, read-only: each bitmap consistent
// and its dirty granules; no corruption and no leak in the file.
std::vector<std::vector<std::uint64_t>> stored_bitmaps(const std::vector<std::byte>& image, bool may_leak = false) {
  MemFile copy("c.qcow2", image);
  auto c = q::check_qcow2(copy, q::RepairMode::none, {});
  REQUIRE(c);
  CHECK(c->corruptions == 0);
  if (!may_leak) CHECK(c->leaks == 0);
  q::Qcow2Image::Parts parts;
  parts.file = std::make_unique<Lent>(copy);
  parts.path = "c.qcow2";
  auto img = q::Qcow2Image::open(std::move(parts), OpenOptions{});
  REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
  std::vector<std::vector<std::uint64_t>> out;
  for (const auto& b : (*img)->bitmaps()) {
    CHECK_FALSE(b.in_use);
    out.push_back(dirty_granules(**img, b.name));
  }
  return out;
}

}  // namespace

TEST_CASE("intent record: on a full disk the open keeps the record armed and stores the bitmaps at close") {
  MemFile file("c.qcow2", crash().image);
  RecordFiles r;
  REQUIRE(r.rec.pwrite(crash().record, 0));
  auto filling = std::make_unique<Filling>(file);
  Filling& disk = *filling;
  disk.room = file.size().value();  // full: the file cannot grow
  auto img = open_with(std::move(filling), r);
  REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
  q::Qcow2Image& i = **img;
  INFO("detail: ", i.intent_detail());
  CHECK(i.intent_state() == "kept");
  CHECK(i.intent_detail().find("No space left") == std::string::npos);  // our wording, not strerror
  CHECK(i.intent_detail().find("no space left on device (test)") != std::string::npos);
  CHECK(i.info().intent_record == "armed");
  // The write before the crash (4 KiB at 1 MiB: chunk 16) is in both.
  CHECK(dirty_granules(i, "b0") == std::vector<std::uint64_t>{16});
  CHECK(dirty_granules(i, "b1") == std::vector<std::uint64_t>{16});

  // Overwriting an allocated cluster needs no room; it is served.
  std::vector<std::byte> data(4096, std::byte{0x33});
  REQUIRE(i.write(data, 1u << 20, false));
  // Room again: an allocating write at 5 MiB (chunk 80) marks the kept
  // record before it is issued, so a crash now still finds it.
  disk.room = UINT64_MAX;
  REQUIRE(i.write(data, 5u << 20, false));
  CHECK(dirty_granules(i, "b0") == std::vector<std::uint64_t>{16, 80});
  {
    MemFile crashed("c.qcow2", file.contents());
    RecordFiles r2;
    REQUIRE(r2.rec.pwrite(r.rec.contents(), 0));
    auto again = open_with(std::make_unique<Lent>(crashed), r2);
    REQUIRE_MESSAGE(again, (again ? "" : again.error().message));
    CHECK((*again)->intent_state() == "recovered");
    REQUIRE((*again)->close());
    CHECK(r2.removed);
    CHECK(stored_bitmaps(crashed.contents()) == std::vector<std::vector<std::uint64_t>>{{16, 80}, {16, 80}});
  }
  // The clean close stores them consistent and retires the record.
  REQUIRE(i.close());
  CHECK(r.removed);
  CHECK(stored_bitmaps(file.contents()) == std::vector<std::vector<std::uint64_t>>{{16, 80}, {16, 80}});
}

namespace {

// The calls FaultFile counts with op_mutating | op_flush, in order: true
// for the write of the header (offset 0).
class HeaderWriteRecorder final : public ForwardingFile {
 public:
  using ForwardingFile::ForwardingFile;
  std::vector<bool> header_write;
  Result<void> pwrite(std::span<const std::byte> b, std::uint64_t o) override {
    header_write.push_back(o == 0);
    return ForwardingFile::pwrite(b, o);
  }
  Result<void> flush() override { return note(ForwardingFile::flush()); }
  Result<void> truncate(std::uint64_t s) override { return note(ForwardingFile::truncate(s)); }
  Result<void> write_zeroes(std::uint64_t o, std::uint64_t n, bool u) override {
    return note(ForwardingFile::write_zeroes(o, n, u));
  }
  Result<void> write_zeroes_fast(std::uint64_t o, std::uint64_t n, bool u) override {
    return note(ForwardingFile::write_zeroes_fast(o, n, u));
  }
  Result<void> discard(std::uint64_t o, std::uint64_t n) override { return note(ForwardingFile::discard(o, n)); }

 private:
  Result<void> note(Result<void> r) {
    header_write.push_back(false);
    return r;
  }
};

}  // namespace

TEST_CASE("intent record: a recovery that fails at any write or sync still serves and loses no change") {
  // The writes, truncates and syncs of a recovery that succeeds...
  std::vector<bool> header_write;
  {
    MemFile file("c.qcow2", crash().image);
    RecordFiles r;
    REQUIRE(r.rec.pwrite(crash().record, 0));
    auto recorder = std::make_unique<HeaderWriteRecorder>(std::make_unique<Lent>(file));
    HeaderWriteRecorder& f = *recorder;
    auto img = open_with(std::move(recorder), r);
    REQUIRE(img);
    CHECK((*img)->intent_state() == "recovered");
    header_write = f.header_write;
  }
  const std::uint64_t calls = header_write.size();
  const auto switch_at = std::find(header_write.begin(), header_write.end(), true);
  REQUIRE(switch_at != header_write.end());
  const std::uint64_t header_call = static_cast<std::uint64_t>(switch_at - header_write.begin()) + 1;
  REQUIRE(header_call > 5);
  // ...then fail each one in turn (once, ENOSPC). Until the header write
  // the new clusters are given back; from it on they may leak.
  for (std::uint64_t n = 1; n <= calls; ++n) {
    CAPTURE(n);
    MemFile file("c.qcow2", crash().image);
    RecordFiles r;
    REQUIRE(r.rec.pwrite(crash().record, 0));
    FaultFile::Plan plan;
    plan.ops = FaultFile::op_mutating | FaultFile::op_flush;
    plan.error = ENOSPC;
    plan.fail_nth = n;
    auto img = open_with(std::make_unique<FaultFile>(std::make_unique<Lent>(file), plan), r);
    REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
    const std::string state = (*img)->intent_state();
    CHECK((state == "kept" || state == "recovered"));
    CHECK(dirty_granules(**img, "b0") == std::vector<std::uint64_t>{16});
    REQUIRE((*img)->close());
    CHECK(r.removed);
    CHECK(stored_bitmaps(file.contents(), n >= header_call) == std::vector<std::vector<std::uint64_t>>{{16}, {16}});
  }
}

TEST_CASE("intent record: on a full disk a record with no change is finished in place") {
  // The power went inside arming, or after it and before the first mark:
  // no request was issued, so the stored contents are exact. Storing them
  // would need new clusters; undoing in_use and one write of the autoclear
  // word need none. Three moments: between arming's steps 2 and 3 (the
  // directory as before, bitmaps bit clear), 3 and 4 (directory in_use,
  // bitmaps bit clear), and after 4 (both set).
  MemFile before_file("c.qcow2", crash().before);
  auto h = q::read_header(before_file, before_file.size().value());
  REQUIRE(h);
  REQUIRE(h->bitmaps);
  const auto dir_at = static_cast<std::ptrdiff_t>(h->bitmaps->bitmap_directory_offset);
  const auto dir_len = static_cast<std::ptrdiff_t>(h->bitmaps->bitmap_directory_size);
  std::vector<std::byte> record = crash().record;
  const std::size_t bits_at = load_be32(record.data() + 60);
  std::fill(record.begin() + static_cast<std::ptrdiff_t>(bits_at), record.end(), std::byte{0});
  for (int moment = 0; moment < 3; ++moment) {
    CAPTURE(moment);
    std::vector<std::byte> image = crash().before;
    if (moment >= 1) {  // the armed directory (in_use set in place)
      std::copy(crash().image.begin() + dir_at, crash().image.begin() + dir_at + dir_len, image.begin() + dir_at);
    }
    std::uint64_t autoclear = load_be64(image.data() + 88) | q::AUTOCLEAR_QNBD_INTENT;
    if (moment < 2) autoclear &= ~std::uint64_t{1};
    store_be64(image.data() + 88, autoclear);
    MemFile file("c.qcow2", image);
    RecordFiles r;
    REQUIRE(r.rec.pwrite(record, 0));
    auto filling = std::make_unique<Filling>(file);
    filling->room = file.size().value();
    auto img = open_with(std::move(filling), r);
    REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
    INFO("detail: ", (*img)->intent_detail());
    CHECK((*img)->intent_state() == "recovered");
    CHECK(r.removed);
    CHECK(file.size().value() == image.size());  // nothing allocated
    const std::vector<std::byte> after = file.contents();
    const std::uint64_t now = load_be64(after.data() + 88);
    CHECK((now & 1) == 1);
    CHECK((now & q::AUTOCLEAR_QNBD_INTENT) == 0);
    // The directory is the one before arming again, byte for byte.
    CHECK(std::equal(after.begin() + dir_at, after.begin() + dir_at + dir_len, crash().before.begin() + dir_at));
    CHECK(dirty_granules(**img, "b0").empty());
    REQUIRE((*img)->close());
    CHECK(stored_bitmaps(file.contents()) == std::vector<std::vector<std::uint64_t>>{{}, {}});
  }
}

TEST_CASE("intent record: intent_bit_set reads the header's bit and clear_intent_bit clears only it") {
  std::vector<std::byte> header(512);
  const std::uint64_t other = 1;  // AUTOCLEAR_BITMAPS stays as it was
  store_be64(header.data() + q::kAutoclearFeaturesOffset, other | q::AUTOCLEAR_QNBD_INTENT);
  image::MemFile f("h.qcow2", header);
  auto set = q::intent_bit_set(f);
  REQUIRE(set);
  CHECK(*set);
  REQUIRE(q::clear_intent_bit(f));
  set = q::intent_bit_set(f);
  REQUIRE(set);
  CHECK_FALSE(*set);
  CHECK(load_be64(f.contents().data() + q::kAutoclearFeaturesOffset) == other);
  image::MemFile tiny("t.qcow2", std::vector<std::byte>(40));  // no autoclear word
  set = q::intent_bit_set(tiny);
  REQUIRE(set);
  CHECK_FALSE(*set);
}
