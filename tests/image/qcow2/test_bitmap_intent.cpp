// The write-intent record read back at a writable open
// (docs/crash-safe-bitmaps.md, "Recovery"): a crash state made by the real
// code (image and record copied while the writer is still open), then the
// record damaged one way per case. Each damaged record must be refused
// with a one-line reason, and the open must then do exactly what it does
// with no record at all: the same bytes in the image file, the bitmaps left
// inconsistent the same way. The undamaged record must be recovered from.
#include <doctest/doctest.h>

#include <string>

#include "common/endian.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/create.hpp"
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
