// serialize_header (qcow2.txt "Header", "Header extensions"; QEMU's rewrite
// rules) against parse_header, and create_qcow2's layout.
#include <doctest/doctest.h>

#include <cstring>

#include "common/endian.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/header.hpp"
#include "test_refcount_support.hpp"

using namespace qnbd;
using namespace qnbd::image::qcow2;
using qnbd::test::VecFile;

namespace {

Header sample_v3() {
  Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.size = 1ull << 30;
  h.l1_size = 2;
  h.l1_table_offset = 3 << 16;
  h.refcount_table_offset = 1 << 16;
  h.refcount_table_clusters = 1;
  h.feature_names = qemu_feature_names();
  return h;
}

void check_same(const Header& a, const Header& b) {
  CHECK(a.version == b.version);
  CHECK(a.cluster_bits == b.cluster_bits);
  CHECK(a.size == b.size);
  CHECK(a.l1_size == b.l1_size);
  CHECK(a.l1_table_offset == b.l1_table_offset);
  CHECK(a.refcount_table_offset == b.refcount_table_offset);
  CHECK(a.refcount_table_clusters == b.refcount_table_clusters);
  CHECK(a.incompatible_features == b.incompatible_features);
  CHECK(a.compatible_features == b.compatible_features);
  CHECK(a.refcount_order == b.refcount_order);
  CHECK(a.compression_type == b.compression_type);
  CHECK(a.unknown_header_fields == b.unknown_header_fields);
  CHECK(a.backing_file == b.backing_file);
  CHECK(a.backing_format == b.backing_format);
  CHECK(a.data_file == b.data_file);
  REQUIRE(a.feature_names.size() == b.feature_names.size());
  for (std::size_t i = 0; i < a.feature_names.size(); i++) {
    CHECK(a.feature_names[i].type == b.feature_names[i].type);
    CHECK(a.feature_names[i].bit == b.feature_names[i].bit);
    CHECK(a.feature_names[i].name == b.feature_names[i].name);
  }
  REQUIRE(a.unknown_extensions.size() == b.unknown_extensions.size());
  for (std::size_t i = 0; i < a.unknown_extensions.size(); i++) {
    CHECK(a.unknown_extensions[i].type == b.unknown_extensions[i].type);
    CHECK(a.unknown_extensions[i].data == b.unknown_extensions[i].data);
  }
  CHECK(a.bitmaps.has_value() == b.bitmaps.has_value());
}

// serialize -> parse -> serialize must give the same bytes and fields.
void round_trip(const Header& h) {
  auto bytes = serialize_header(h);
  REQUIRE(bytes);
  CHECK(bytes->size() == h.cluster_size());
  auto parsed = parse_header(*bytes, 64ull << 20);
  if (!parsed) FAIL(parsed.error().message);
  check_same(h, *parsed);
  auto again = serialize_header(*parsed);
  REQUIRE(again);
  CHECK(*again == *bytes);
}

}  // namespace

TEST_CASE("serialize_header: round trips through parse_header") {
  SUBCASE("default v3") { round_trip(sample_v3()); }
  SUBCASE("backing file and format") {
    Header h = sample_v3();
    h.backing_file = "../images/base image.qcow2";
    h.backing_format = "qcow2";
    round_trip(h);
    auto bytes = *serialize_header(h);
    // The name sits right after the end-of-extensions marker (qcow2.txt
    // "Header extensions").
    const std::uint64_t off = load_be64(bytes.data() + 8);
    CHECK(load_be32(bytes.data() + 16) == h.backing_file.size());
    CHECK(load_be32(bytes.data() + off - 8) == EXT_END);
    CHECK(std::memcmp(bytes.data() + off, h.backing_file.data(), h.backing_file.size()) == 0);
  }
  SUBCASE("features, zstd, external data file, unknown fields and extensions") {
    Header h = sample_v3();
    h.incompatible_features = INCOMPAT_COMPRESSION | INCOMPAT_DATA_FILE | INCOMPAT_EXTL2;
    h.compatible_features = COMPAT_LAZY_REFCOUNTS;
    h.autoclear_features = AUTOCLEAR_DATA_FILE_RAW;
    h.compression_type = COMPRESSION_ZSTD;
    h.refcount_order = 6;
    h.l1_size = 4;  // extended L2 entries halve what one L2 table maps
    h.data_file = "data.raw";
    h.unknown_header_fields = {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4},
                               std::byte{5}, std::byte{6}, std::byte{7}, std::byte{8}};
    h.unknown_extensions.push_back({0x12345678, {std::byte{0xaa}, std::byte{0xbb}, std::byte{0xcc}}});
    h.unknown_extensions.push_back({0x0badf00d, {}});
    round_trip(h);
    auto bytes = *serialize_header(h);
    CHECK(load_be32(bytes.data() + 100) == 120);  // 112 + 8 unknown bytes
    CHECK(bytes[104] == std::byte{COMPRESSION_ZSTD});
    for (int i = 105; i < 112; i++) CHECK(bytes[i] == std::byte{0});  // padding
  }
  SUBCASE("bitmaps extension") {
    Header h = sample_v3();
    h.autoclear_features = AUTOCLEAR_BITMAPS;
    h.bitmaps = BitmapsExtension{1, 32, 5 << 16};
    round_trip(h);
  }
  SUBCASE("version 2 with a backing file") {
    Header h = sample_v3();
    h.version = 2;
    h.header_length = V2_HEADER_LENGTH;
    h.feature_names.clear();
    h.backing_file = "base.raw";
    h.backing_format = "raw";
    round_trip(h);
    auto bytes = *serialize_header(h);
    CHECK(load_be32(bytes.data() + 72) == EXT_BACKING_FORMAT);  // extensions start at 72
  }
  SUBCASE("512-byte clusters") {
    Header h = sample_v3();
    h.cluster_bits = 9;
    h.refcount_table_offset = 512;
    h.l1_table_offset = 3 * 512;
    h.l1_size = 1u << 15;
    h.feature_names.clear();
    h.backing_file = std::string(300, 'b');
    round_trip(h);
  }
}

TEST_CASE("serialize_header: limits and rules") {
  Header h = sample_v3();
  h.cluster_bits = 9;
  h.backing_file = std::string(1000, 'x');
  CHECK(serialize_header(h).error().code == EFBIG);  // does not fit in cluster 0
  h.cluster_bits = 16;
  h.backing_file = std::string(1024, 'x');
  CHECK(serialize_header(h).error().code == EINVAL);  // > 1023 bytes
  h.backing_file.clear();

  Header v2 = sample_v3();
  v2.version = 2;
  v2.feature_names.clear();
  v2.compatible_features = COMPAT_LAZY_REFCOUNTS;
  CHECK(serialize_header(v2).error().code == EINVAL);

  // Unknown autoclear bits are cleared on rewrite (qcow2.txt "Header",
  // autoclear_features).
  Header a = sample_v3();
  a.autoclear_features = 0x80 | AUTOCLEAR_DATA_FILE_RAW;
  a.incompatible_features = INCOMPAT_DATA_FILE;
  // Not `= "d"`: g++ 12 at -O3 reports a false -Wrestrict on that
  // assignment (GCC bug 105329).
  a.data_file.assign(1, 'd');
  auto bytes = *serialize_header(a);
  CHECK(load_be64(bytes.data() + 88) == AUTOCLEAR_DATA_FILE_RAW);
  // The bitmaps extension is dropped without its autoclear bit.
  Header b = sample_v3();
  b.bitmaps = BitmapsExtension{1, 32, 5 << 16};
  auto parsed = parse_header(*serialize_header(b), 64ull << 20);
  REQUIRE(parsed);
  CHECK(!parsed->bitmaps.has_value());
}

TEST_CASE("create_qcow2: qemu-img's layout and a header parse_header accepts") {
  VecFile f;
  CreateOptions o;
  o.size = 1ull << 30;
  REQUIRE(create_qcow2(f, o));
  // Header, refcount table, refcount block, then the 16-byte L1 table.
  CHECK(f.data.size() == 3 * 65536 + 16);
  auto h = parse_header(f.data, f.data.size());
  REQUIRE(h);
  CHECK(h->refcount_table_offset == 65536);
  CHECK(h->l1_table_offset == 3 * 65536);
  CHECK(h->l1_size == 2);
  CHECK(h->feature_names.size() == 8);
  CHECK(load_be64(f.data.data() + 65536) == 2 * 65536);  // table -> block
  for (int c = 0; c < 4; c++) CHECK(load_be16(f.data.data() + 2 * 65536 + 2 * c) == 1);
  CHECK(load_be16(f.data.data() + 2 * 65536 + 8) == 0);

  CreateOptions bad = o;
  bad.cluster_size = 1000;
  CHECK(!create_qcow2(f, bad));
  bad = o;
  bad.version = 2;
  bad.lazy_refcounts = true;
  CHECK(validate_create_options(bad).error().message.find("Lazy refcounts") == 0);
  bad = o;
  bad.extended_l2 = true;
  bad.cluster_size = 4096;
  CHECK(!validate_create_options(bad));
}
