// parse_header: golden decoding and every header and extension reject (the
// checks of QEMU's qcow2_do_open and qcow2_read_extensions), each with a
// message naming the defect.
#include <doctest/doctest.h>

#include <cstring>
#include <string>

#include "common/endian.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/header.hpp"
#include "image_test_support.hpp"

using namespace qnbd;
using namespace qnbd::image::qcow2;
using qnbd::test::HandImage;

namespace {

HandImage base() {
  HandImage h;
  h.build();
  return h;
}

Result<Header> parse(const HandImage& h) { return parse_header(h.bytes, h.bytes.size()); }

std::string error_of(const HandImage& h) {
  auto r = parse(h);
  REQUIRE_FALSE(r.has_value());
  return r.error().message;
}

// Append a header extension at `pos` (inside cluster 0); returns the next position.
std::size_t add_ext(HandImage& h, std::size_t pos, std::uint32_t type, const std::string& data) {
  store_be32(h.bytes.data() + pos, type);
  store_be32(h.bytes.data() + pos + 4, static_cast<std::uint32_t>(data.size()));
  for (std::size_t i = 0; i < data.size(); ++i) h.bytes[pos + 8 + i] = static_cast<std::byte>(data[i]);
  return pos + 8 + ((data.size() + 7) & ~std::size_t{7});
}

}  // namespace

TEST_CASE("header: golden v3 fields and extensions") {
  HandImage h = base();
  std::size_t pos = 112;
  pos = add_ext(h, pos, EXT_BACKING_FORMAT, "raw");
  std::string feature(48, '\0');
  feature[0] = 0;
  feature[1] = 5;
  std::memcpy(feature.data() + 2, "zoned", 5);
  pos = add_ext(h, pos, EXT_FEATURE_TABLE, feature);
  pos = add_ext(h, pos, 0x12345678, "opaque!");
  // Backing file name after the extensions.
  const std::string backing = "../base.img";
  store_be64(h.bytes.data() + 8, 512);
  store_be32(h.bytes.data() + 16, static_cast<std::uint32_t>(backing.size()));
  std::memcpy(h.bytes.data() + 512, backing.data(), backing.size());

  auto r = parse(h);
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  const Header& hd = *r;
  CHECK(hd.version == 3);
  CHECK(hd.cluster_bits == 12);
  CHECK(hd.size == (1u << 20));
  CHECK(hd.l1_size == 1);
  CHECK(hd.l1_table_offset == 3 * 4096);
  CHECK(hd.refcount_table_offset == 4096);
  CHECK(hd.refcount_order == 4);
  CHECK(hd.header_length == 112);
  CHECK(hd.backing_file == backing);
  CHECK(hd.backing_format == "raw");
  REQUIRE(hd.unknown_extensions.size() == 1);
  CHECK(hd.unknown_extensions[0].type == 0x12345678u);
  CHECK(hd.unknown_extensions[0].data.size() == 7);
  CHECK(hd.feature_name(0, 5) == "zoned");
  CHECK(hd.feature_name(0, 1) == "corrupt bit");
}

TEST_CASE("header: v2 ignores v3 fields") {
  HandImage h;
  h.version = 2;
  h.build();
  // v2 extensions start at byte 72 (here: the end marker); a v3 reader
  // would take byte 96 as refcount_order.
  store_be32(h.bytes.data() + 96, 9);
  auto r = parse(h);
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  CHECK(r->incompatible_features == 0);
  CHECK(r->refcount_order == 4);
  CHECK(r->header_length == 72);
}

TEST_CASE("header: unknown header bytes are kept") {
  HandImage h = base();
  store_be32(h.bytes.data() + 100, 120);
  h.bytes[115] = std::byte{0xab};
  auto r = parse(h);
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  REQUIRE(r->unknown_header_fields.size() == 8);
  CHECK(r->unknown_header_fields[3] == std::byte{0xab});
}

TEST_CASE("header: rejects name the defect") {
  struct Case {
    const char* what;
    void (*patch)(HandImage&);
    const char* expect;
  };
  const Case cases[] = {
      {"bad magic", [](HandImage& h) { h.bytes[0] = std::byte{0}; }, "magic"},
      {"version 4", [](HandImage& h) { store_be32(h.bytes.data() + 4, 4); }, "version 4"},
      {"cluster_bits 8", [](HandImage& h) { store_be32(h.bytes.data() + 20, 8); }, "cluster_bits 8"},
      {"cluster_bits 22", [](HandImage& h) { store_be32(h.bytes.data() + 20, 22); }, "cluster_bits 22"},
      {"header_length 96", [](HandImage& h) { store_be32(h.bytes.data() + 100, 96); }, "header_length 96"},
      {"header_length 108", [](HandImage& h) { store_be32(h.bytes.data() + 100, 108); }, "multiple of 8"},
      {"unknown incompat named",
       [](HandImage& h) {
         store_be64(h.bytes.data() + 72, 1ull << 5);
         add_ext(h, 112, EXT_FEATURE_TABLE, std::string("\0\5zoned", 7) + std::string(41, '\0'));
       },
       "unknown incompatible feature bit 5 (\"zoned\")"},
      {"unknown incompat unnamed", [](HandImage& h) { store_be64(h.bytes.data() + 72, 1ull << 40); },
       "unknown incompatible feature bit 40"},
      {"aes", [](HandImage& h) { store_be32(h.bytes.data() + 32, 1); }, "encrypted"},
      {"luks", [](HandImage& h) { store_be32(h.bytes.data() + 32, 2); }, "encrypted"},
      {"crypt 7", [](HandImage& h) { store_be32(h.bytes.data() + 32, 7); }, "encryption method 7"},
      {"zstd without bit", [](HandImage& h) { h.bytes[104] = std::byte{1}; }, "compression type feature bit"},
      {"bit without type", [](HandImage& h) { store_be64(h.bytes.data() + 72, INCOMPAT_COMPRESSION); },
       "compression_type is 0"},
      {"compression type 2",
       [](HandImage& h) {
         store_be64(h.bytes.data() + 72, INCOMPAT_COMPRESSION);
         h.bytes[104] = std::byte{2};
       },
       "unknown compression type 2"},
      {"extended L2 small clusters", [](HandImage& h) { store_be64(h.bytes.data() + 72, INCOMPAT_EXTL2); },
       "subcluster"},
      {"refcount_order 7", [](HandImage& h) { store_be32(h.bytes.data() + 96, 7); }, "refcount_order 7"},
      {"backing name too long",
       [](HandImage& h) {
         store_be64(h.bytes.data() + 8, 512);
         store_be32(h.bytes.data() + 16, 1024);
       },
       "backing file name too long"},
      {"backing name outside cluster 0",
       [](HandImage& h) {
         store_be64(h.bytes.data() + 8, 4000);
         store_be32(h.bytes.data() + 16, 200);
       },
       "first cluster"},
      {"refcount table unaligned", [](HandImage& h) { store_be64(h.bytes.data() + 48, 4096 + 512); },
       "refcount table offset"},
      {"refcount table zero clusters", [](HandImage& h) { store_be32(h.bytes.data() + 56, 0); }, "refcount table"},
      {"refcount table too big", [](HandImage& h) { store_be32(h.bytes.data() + 56, 4096); },
       "refcount table is too large"},
      {"L1 unaligned", [](HandImage& h) { store_be64(h.bytes.data() + 40, 3 * 4096 + 8); }, "L1 table offset"},
      {"L1 past EOF", [](HandImage& h) { store_be64(h.bytes.data() + 40, 1ull << 40); }, "end of the file"},
      {"L1 too small", [](HandImage& h) { store_be64(h.bytes.data() + 24, 8ull << 20); }, "L1 table is too small"},
      {"L1 over 32 MiB", [](HandImage& h) { store_be32(h.bytes.data() + 36, (32u << 20) / 8 + 1); },
       "L1 table is too large"},
      {"size overflow", [](HandImage& h) { store_be64(h.bytes.data() + 24, ~0ull); }, "too big"},
      {"too many snapshots", [](HandImage& h) { store_be32(h.bytes.data() + 60, 65537); }, "too many snapshots"},
      {"data-file-raw without data file",
       [](HandImage& h) { store_be64(h.bytes.data() + 88, AUTOCLEAR_DATA_FILE_RAW); },
       "data-file-raw requires a data file"},
      {"bitmaps bit without extension", [](HandImage& h) { store_be64(h.bytes.data() + 88, AUTOCLEAR_BITMAPS); },
       "no bitmaps extension"},
      {"bitmaps extension bad length",
       [](HandImage& h) {
         store_be64(h.bytes.data() + 88, AUTOCLEAR_BITMAPS);
         add_ext(h, 112, EXT_BITMAPS, std::string(16, '\0'));
       },
       "bitmaps extension has length 16"},
      {"bitmaps extension zero bitmaps",
       [](HandImage& h) {
         store_be64(h.bytes.data() + 88, AUTOCLEAR_BITMAPS);
         add_ext(h, 112, EXT_BITMAPS, std::string(24, '\0'));
       },
       "nb_bitmaps is 0"},
      {"extension too large",
       [](HandImage& h) {
         store_be32(h.bytes.data() + 112, 0x99999999);
         store_be32(h.bytes.data() + 116, 5000);
       },
       "too large"},
      {"backing format too long", [](HandImage& h) { add_ext(h, 112, EXT_BACKING_FORMAT, std::string(16, 'q')); },
       "backing file format name too long"},
      {"duplicate extension",
       [](HandImage& h) {
         std::size_t p = add_ext(h, 112, EXT_DATA_FILE, "a");
         add_ext(h, p, EXT_DATA_FILE, "b");
       },
       "appears twice"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    HandImage h = base();
    c.patch(h);
    std::string msg = error_of(h);
    CHECK_MESSAGE(msg.find(c.expect) != std::string::npos, msg);
    CHECK(msg.find('\n') == std::string::npos);
  }
}

TEST_CASE("header: bitmaps extension ignored when the autoclear bit is clear") {
  HandImage h = base();
  std::string ext(24, '\0');
  store_be32(ext.data(), 1);
  store_be64(ext.data() + 16, 7 * 4096);
  add_ext(h, 112, EXT_BITMAPS, ext);
  auto r = parse(h);
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  CHECK_FALSE(r->bitmaps.has_value());
}

TEST_CASE("header: a file shorter than the header is refused") {
  HandImage h = base();
  h.bytes.resize(50);
  CHECK(error_of(h).find("too small") != std::string::npos);
}

namespace {

// Counts the bytes read, so a test can see what read_header costs.
class CountingFile final : public qnbd::image::File {
 public:
  explicit CountingFile(std::vector<std::byte> b) : f_("count.qcow2", std::move(b)) {}
  qnbd::Result<std::size_t> pread(std::span<std::byte> b, std::uint64_t o) override {
    read_ += b.size();
    return f_.pread(b, o);
  }
  qnbd::Result<void> pwrite(std::span<const std::byte> b, std::uint64_t o) override { return f_.pwrite(b, o); }
  qnbd::Result<void> flush() override { return f_.flush(); }
  qnbd::Result<void> truncate(std::uint64_t s) override { return f_.truncate(s); }
  qnbd::Result<std::uint64_t> size() override { return f_.size(); }
  const std::string& name() const override { return f_.name(); }
  std::uint64_t read_ = 0;

 private:
  qnbd::image::MemFile f_;
};

// read_header must give what parse_header gives over the first
// min(file size, 2 MiB) bytes, whatever the layout.
void same_as_parse(const std::vector<std::byte>& bytes, std::uint64_t* read = nullptr) {
  auto full = parse_header(std::span(bytes).first(std::min<std::size_t>(bytes.size(), 2u << 20)), bytes.size());
  CountingFile f(bytes);
  auto got = read_header(f, bytes.size());
  REQUIRE(full.has_value() == got.has_value());
  if (read) *read = f.read_;
  if (!full) {
    CHECK(full.error().message == got.error().message);
    return;
  }
  CHECK(got->header_length == full->header_length);
  CHECK(got->backing_file == full->backing_file);
  CHECK(got->backing_format == full->backing_format);
  CHECK(got->data_file == full->data_file);
  CHECK(got->unknown_extensions.size() == full->unknown_extensions.size());
  CHECK(got->unknown_header_fields == full->unknown_header_fields);
  CHECK(got->feature_names.size() == full->feature_names.size());
}

}  // namespace

TEST_CASE("read_header: reads only the part of a 2 MiB cluster 0 the header uses") {
  HandImage h;
  h.cluster_bits = 21;
  h.build(1);
  std::size_t pos = add_ext(h, 112, EXT_BACKING_FORMAT, "raw");
  (void)pos;
  std::uint64_t read = 0;
  same_as_parse(h.bytes, &read);
  CHECK(read <= 4096);  // 2 MiB before read_header
}

TEST_CASE("read_header: extensions and the backing file name far into cluster 0") {
  HandImage h;
  h.cluster_bits = 21;
  h.build(1);
  // Unknown extensions of 64 KiB each up to 1 MiB, then the backing format;
  // the backing file name near the end of the cluster.
  std::size_t pos = 112;
  const std::string big(65536 - 8, 'x');
  while (pos < (1u << 20)) pos = add_ext(h, pos, 0x7e570000u + static_cast<std::uint32_t>(pos), big);
  pos = add_ext(h, pos, EXT_BACKING_FORMAT, "raw");
  const std::string backing = "far/away.img";
  const std::uint64_t at = (2u << 20) - 4096;
  store_be64(h.bytes.data() + 8, at);
  store_be32(h.bytes.data() + 16, static_cast<std::uint32_t>(backing.size()));
  std::memcpy(h.bytes.data() + at, backing.data(), backing.size());
  same_as_parse(h.bytes);
  auto r = parse(h);
  REQUIRE_MESSAGE(r, r.error().message);
  CHECK(r->backing_file == backing);
  CHECK(r->backing_format == "raw");
  CHECK(r->unknown_extensions.size() == 16);

  SUBCASE("an extension running past the end of the file") {
    h.bytes.resize((1u << 20) + 4096);  // cut inside cluster 0
    same_as_parse(h.bytes);
  }
  SUBCASE("small extensions past the first 4 KiB, no end marker before the backing name") {
    for (std::size_t p = 112; p + 8 <= at; p += 8) {
      store_be32(h.bytes.data() + p, 0x7e570001u);
      store_be32(h.bytes.data() + p + 4, 0);
    }
    same_as_parse(h.bytes);
  }
}

TEST_CASE("read_header: header_length and short files") {
  for (std::uint32_t cluster_bits : {9u, 12u, 16u, 21u}) {
    for (std::uint32_t hl : {104u, 112u, 120u, 4096u, 8192u}) {
      HandImage h;
      h.cluster_bits = cluster_bits;
      h.build(1);
      store_be32(h.bytes.data() + 100, hl);
      CAPTURE(cluster_bits);
      CAPTURE(hl);
      same_as_parse(h.bytes);
      for (std::size_t cut : {std::size_t{50}, std::size_t{100}, std::size_t{4000}, std::size_t{4100}}) {
        auto b = h.bytes;
        b.resize(std::min(b.size(), cut));
        same_as_parse(b);
      }
    }
  }
}
