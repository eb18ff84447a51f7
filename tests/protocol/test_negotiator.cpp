#include <doctest/doctest.h>

#include <functional>

#include "negotiator_test_support.hpp"
#include "protocol/constants.hpp"
#include "protocol/negotiator.hpp"

using namespace qnbd::protocol;
using qnbd::test::Bytes;
using qnbd::test::info_go_data;
using qnbd::test::option;
using qnbd::test::parse_replies;

namespace {

StaticCatalog make_catalog() {
  ExportInfo a;
  a.name = "";
  a.description = "default disk";
  a.size = 1 << 20;
  a.read_only = false;
  a.can_trim = a.can_write_zeroes = a.can_fast_zero = true;
  ExportInfo b;
  b.name = "ro";
  b.size = 4096;
  b.read_only = true;
  b.allocation_depth = true;
  b.bitmaps = {"b0", "b1"};
  b.min_block = 512;
  return StaticCatalog({a, b});
}

struct Outcome {
  std::vector<std::byte> sent;
  Action::Kind end = Action::Kind::need_bytes;
  Negotiated result;
};

// Drive a negotiator with `input`, delivered in pieces cut at `cuts`
// (ascending offsets); never feeds more than it asks for.
Outcome drive(const ExportCatalog& cat, const std::vector<std::byte>& input, std::vector<std::size_t> cuts) {
  Negotiator n(cat);
  Outcome o;
  std::size_t pos = 0, cut_i = 0;
  for (int guard = 0; guard < 100000; ++guard) {
    auto a = n.next();
    if (a.kind == Action::Kind::send) {
      o.sent.insert(o.sent.end(), a.data.begin(), a.data.end());
      continue;
    }
    if (a.kind == Action::Kind::need_bytes) {
      REQUIRE(a.bytes > 0);
      if (pos == input.size()) {
        o.end = Action::Kind::need_bytes;
        return o;
      }
      while (cut_i < cuts.size() && cuts[cut_i] <= pos) ++cut_i;
      std::size_t limit = cut_i < cuts.size() ? cuts[cut_i] : input.size();
      std::size_t take = std::min(a.bytes, limit - pos);
      n.feed(std::span(input.data() + pos, take));
      pos += take;
      continue;
    }
    o.end = a.kind;
    if (a.kind == Action::Kind::start_transmission) o.result = n.result();
    return o;
  }
  FAIL("negotiator did not converge");
  return o;
}

Bytes greeting() { return Bytes().u64(NBDMAGIC).u64(IHAVEOPT).u16(3); }
Bytes rep(std::uint32_t opt, std::uint32_t type, const Bytes& data = {}) {
  return Bytes().u64(NBD_REP_MAGIC).u32(opt).u32(type).u32(static_cast<std::uint32_t>(data.v.size())).add(data);
}
Bytes meta_data(std::string_view name, std::vector<std::string_view> queries) {
  Bytes d;
  d.u32(static_cast<std::uint32_t>(name.size())).str(name).u32(static_cast<std::uint32_t>(queries.size()));
  for (auto q : queries) d.u32(static_cast<std::uint32_t>(q.size())).str(q);
  return d;
}

// Run a script once whole, byte by byte, and cut at every single offset:
// the output must not depend on how the bytes arrive.
Outcome run_all_splits(const ExportCatalog& cat, const Bytes& script) {
  auto whole = drive(cat, script.v, {});
  std::vector<std::size_t> every;
  for (std::size_t i = 1; i < script.v.size(); ++i) every.push_back(i);
  auto bytewise = drive(cat, script.v, every);
  CHECK(bytewise.sent == whole.sent);
  CHECK(bytewise.end == whole.end);
  for (std::size_t i = 1; i < script.v.size(); ++i) {
    auto split = drive(cat, script.v, {i});
    CHECK(split.sent == whole.sent);
    CHECK(split.end == whole.end);
  }
  return whole;
}

}  // namespace

TEST_CASE("greeting is 18 bytes: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES") {
  auto cat = make_catalog();
  auto o = drive(cat, {}, {});
  CHECK(o.sent == greeting().v);
  CHECK(o.end == Action::Kind::need_bytes);
}

TEST_CASE("unknown client flags close the connection") {
  auto cat = make_catalog();
  auto o = run_all_splits(cat, Bytes().u32(0x4));
  CHECK(o.end == Action::Kind::close);
  CHECK(o.sent == greeting().v);
}

TEST_CASE("EXPORT_NAME with NO_ZEROES: 10-byte reply; without: 134 bytes") {
  auto cat = make_catalog();
  const std::uint16_t flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE |
                              NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  auto o = run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_EXPORT_NAME)));
  CHECK(o.end == Action::Kind::start_transmission);
  CHECK(o.sent == greeting().u64(1 << 20).u16(flags).v);
  CHECK(o.result.mode == ReplyMode::simple);
  auto o2 = run_all_splits(cat, Bytes().u32(1).add(option(NBD_OPT_EXPORT_NAME)));
  CHECK(o2.sent == greeting().u64(1 << 20).u16(flags).zeros(124).v);
}

TEST_CASE("EXPORT_NAME of an unknown export, or after extended headers, hard-disconnects") {
  auto cat = make_catalog();
  auto o = run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_EXPORT_NAME, Bytes().str("nope"))));
  CHECK(o.end == Action::Kind::close);
  auto o2 = run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_EXTENDED_HEADERS)).add(option(NBD_OPT_EXPORT_NAME)));
  CHECK(o2.end == Action::Kind::close);
  CHECK(o2.sent == greeting().add(rep(NBD_OPT_EXTENDED_HEADERS, NBD_REP_ACK)).v);
}

TEST_CASE("bad option magic and oversize option length close") {
  auto cat = make_catalog();
  auto o = run_all_splits(cat, Bytes().u32(3).u64(0x1122334455667788ULL).u32(3).u32(0));
  CHECK(o.end == Action::Kind::close);
  auto o2 = drive(cat, Bytes().u32(3).u64(IHAVEOPT).u32(99).u32(kMaxOptionDrain + 1).v, {});
  CHECK(o2.end == Action::Kind::close);
}

TEST_CASE("option data: 1 MiB is processed; above, up to 32 MiB, dropped unread with TOO_BIG") {
  auto cat = make_catalog();
  // 3,000 queries (about 72 KB, as a client asking for many bitmaps sends):
  // unknown namespaces are ignored, the known ones selected once each.
  std::vector<std::string> names;
  for (int i = 0; i < 2998; ++i) names.push_back("x-vendor:context-" + std::to_string(i));
  names.push_back("base:allocation");
  names.push_back("qemu:dirty-bitmap:b1");
  std::vector<std::string_view> queries(names.begin(), names.end());
  auto set = option(NBD_OPT_SET_META_CONTEXT, meta_data("ro", queries));
  REQUIRE(set.v.size() > (64u << 10));
  auto script =
      Bytes().u32(3).add(option(NBD_OPT_STRUCTURED_REPLY)).add(set).add(option(NBD_OPT_GO, info_go_data("ro", {})));
  auto o = drive(cat, script.v, {100, 5000, 40000, 70000});
  REQUIRE(o.end == Action::Kind::start_transmission);
  auto reps = parse_replies(o.sent, 18);
  REQUIRE(reps.size() >= 4);
  CHECK(reps[1].data == Bytes().u32(kContextIdBaseAllocation).str("base:allocation").v);
  CHECK(reps[2].data == Bytes().u32(kContextIdFirstBitmap + 1).str("qemu:dirty-bitmap:b1").v);
  CHECK(reps[3].type == NBD_REP_ACK);
  CHECK(o.result.contexts.size() == 2);

  // Exactly at the cap: processed (an unknown option: UNSUP).
  auto at_cap = Bytes().u64(IHAVEOPT).u32(99).u32(kMaxOptionLength).zeros(kMaxOptionLength);
  auto o2 = drive(cat, Bytes().u32(3).add(at_cap).add(option(NBD_OPT_ABORT)).v, {});
  auto reps2 = parse_replies(o2.sent, 18);
  REQUIRE(reps2.size() == 2);
  CHECK(reps2[0].type == NBD_REP_ERR_UNSUP);

  // Above it: the data is dropped however it arrives, the option gets
  // TOO_BIG and the next option is parsed as usual.
  for (std::uint32_t len : {kMaxOptionLength + 1, kMaxOptionDrain}) {
    CAPTURE(len);
    for (std::uint32_t code : {NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO, 99u}) {
      auto big = Bytes().u64(IHAVEOPT).u32(code).u32(len).zeros(len);
      auto tail = Bytes().add(option(NBD_OPT_GO, info_go_data("", {})));
      auto in = Bytes().u32(3).add(big).add(tail);
      auto o3 = drive(cat, in.v, {30, 4096, 1u << 20, len / 2 + 7});
      REQUIRE(o3.end == Action::Kind::start_transmission);
      auto reps3 = parse_replies(o3.sent, 18);
      REQUIRE(reps3.size() >= 2);
      CHECK(reps3[0].opt == code);
      CHECK(reps3[0].type == NBD_REP_ERR_TOO_BIG);
      CHECK(reps3[1].opt == NBD_OPT_GO);
    }
  }
  // ABORT above the cap is still an ABORT; EXPORT_NAME (no error reply) closes.
  auto ab = Bytes().u32(3).u64(IHAVEOPT).u32(NBD_OPT_ABORT).u32(kMaxOptionLength + 1).zeros(kMaxOptionLength + 1);
  auto o4 = drive(cat, ab.v, {});
  CHECK(o4.end == Action::Kind::close);
  CHECK(o4.sent == greeting().add(rep(NBD_OPT_ABORT, NBD_REP_ACK)).v);
  auto en = Bytes().u32(3).u64(IHAVEOPT).u32(NBD_OPT_EXPORT_NAME).u32(kMaxOptionLength + 1).zeros(kMaxOptionLength + 1);
  auto o5 = drive(cat, en.v, {});
  CHECK(o5.end == Action::Kind::close);
  CHECK(o5.sent == greeting().v);
}

TEST_CASE("unknown option: UNSUP, data drained, next option parsed") {
  auto cat = make_catalog();
  auto script = Bytes().u32(3).add(option(99, Bytes().str("abcdef"))).add(option(NBD_OPT_ABORT));
  auto o = run_all_splits(cat, script);
  CHECK(o.end == Action::Kind::close);
  auto reps = parse_replies(o.sent, 18);
  REQUIRE(reps.size() == 2);
  CHECK(reps[0].opt == 99);
  CHECK(reps[0].type == NBD_REP_ERR_UNSUP);
  CHECK(reps[1].opt == NBD_OPT_ABORT);
  CHECK(reps[1].type == NBD_REP_ACK);
  CHECK(reps[1].data.empty());
}

TEST_CASE("options without data reject data; STARTTLS is POLICY") {
  auto cat = make_catalog();
  auto script = Bytes()
                    .u32(3)
                    .add(option(NBD_OPT_LIST, Bytes().u8(1)))
                    .add(option(NBD_OPT_STARTTLS))
                    .add(option(NBD_OPT_STARTTLS, Bytes().u8(1)))
                    .add(option(NBD_OPT_STRUCTURED_REPLY, Bytes().u8(1)))
                    .add(option(NBD_OPT_EXTENDED_HEADERS, Bytes().u8(1)))
                    .add(option(NBD_OPT_PEEK_EXPORT));
  auto reps = parse_replies(run_all_splits(cat, script).sent, 18);
  REQUIRE(reps.size() == 6);
  CHECK(reps[0].type == NBD_REP_ERR_INVALID);
  CHECK(reps[1].type == NBD_REP_ERR_POLICY);
  CHECK(reps[2].type == NBD_REP_ERR_INVALID);
  CHECK(reps[3].type == NBD_REP_ERR_INVALID);
  CHECK(reps[4].type == NBD_REP_ERR_INVALID);
  CHECK(reps[5].type == NBD_REP_ERR_UNSUP);
}

TEST_CASE("LIST: one NBD_REP_SERVER per export in order, name + description, then ACK") {
  auto cat = make_catalog();
  auto o = run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_LIST)));
  auto expect = greeting()
                    .add(rep(NBD_OPT_LIST, NBD_REP_SERVER, Bytes().u32(0).str("default disk")))
                    .add(rep(NBD_OPT_LIST, NBD_REP_SERVER, Bytes().u32(2).str("ro")))
                    .add(rep(NBD_OPT_LIST, NBD_REP_ACK));
  CHECK(o.sent == expect.v);
}

TEST_CASE("GO: NAME, DESCRIPTION, BLOCK_SIZE, EXPORT infos then ACK, transmission") {
  auto cat = make_catalog();
  auto script = Bytes()
                    .u32(3)
                    .add(option(NBD_OPT_STRUCTURED_REPLY))
                    .add(option(NBD_OPT_GO, info_go_data("", {NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 77})));
  auto o = run_all_splits(cat, script);
  REQUIRE(o.end == Action::Kind::start_transmission);
  const std::uint16_t flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE |
                              NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO |
                              NBD_FLAG_SEND_DF;
  auto expect = greeting()
                    .add(rep(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK))
                    .add(rep(NBD_OPT_GO, NBD_REP_INFO, Bytes().u16(NBD_INFO_NAME)))
                    .add(rep(NBD_OPT_GO, NBD_REP_INFO, Bytes().u16(NBD_INFO_DESCRIPTION).str("default disk")))
                    .add(rep(NBD_OPT_GO, NBD_REP_INFO, Bytes().u16(NBD_INFO_BLOCK_SIZE).u32(1).u32(4096).u32(32 << 20)))
                    .add(rep(NBD_OPT_GO, NBD_REP_INFO, Bytes().u16(NBD_INFO_EXPORT).u64(1 << 20).u16(flags)))
                    .add(rep(NBD_OPT_GO, NBD_REP_ACK));
  CHECK(o.sent == expect.v);
  CHECK(o.result.mode == ReplyMode::structured);
  CHECK(o.result.transmission_flags == flags);
  CHECK(o.result.export_info->name == "");
  CHECK_FALSE(o.result.block_size_committed);
}

TEST_CASE("GO with BLOCK_SIZE commits the client to the export's minimum; INFO without it is refused") {
  auto cat = make_catalog();
  auto o = run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_GO, info_go_data("ro", {NBD_INFO_BLOCK_SIZE}))));
  REQUIRE(o.end == Action::Kind::start_transmission);
  CHECK(o.result.block_size_committed);
  CHECK(o.result.min_block == 512);
  CHECK((o.result.transmission_flags & NBD_FLAG_READ_ONLY) != 0);
  auto reps =
      parse_replies(run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_INFO, info_go_data("ro", {})))).sent, 18);
  REQUIRE(reps.size() == 2);
  CHECK(reps[0].type == NBD_REP_INFO);
  CHECK(reps.back().type == NBD_REP_ERR_BLOCK_SIZE_REQD);
}

TEST_CASE("INFO/GO errors: unknown export, malformed lengths; haggling continues") {
  auto cat = make_catalog();
  auto bad_len = Bytes().u32(100).str("x").u16(0);          // name length past the data
  auto trailing = Bytes().add(info_go_data("", {})).u8(0);  // 6 + N + 2R mismatch
  auto script = Bytes()
                    .u32(3)
                    .add(option(NBD_OPT_GO, info_go_data("missing", {})))
                    .add(option(NBD_OPT_INFO, bad_len))
                    .add(option(NBD_OPT_GO, trailing))
                    .add(option(NBD_OPT_INFO, info_go_data("", {})));
  auto o = run_all_splits(cat, script);
  CHECK(o.end == Action::Kind::need_bytes);
  auto reps = parse_replies(o.sent, 18);
  REQUIRE(reps.size() == 6);
  CHECK(reps[0].type == NBD_REP_ERR_UNKNOWN);
  CHECK(reps[1].type == NBD_REP_ERR_INVALID);
  CHECK(reps[2].type == NBD_REP_ERR_INVALID);
  CHECK(reps[3].type == NBD_REP_INFO);
  CHECK(reps[5].type == NBD_REP_ACK);
}

TEST_CASE("STRUCTURED_REPLY / EXTENDED_HEADERS interplay") {
  auto cat = make_catalog();
  auto script = Bytes()
                    .u32(3)
                    .add(option(NBD_OPT_STRUCTURED_REPLY))
                    .add(option(NBD_OPT_STRUCTURED_REPLY))
                    .add(option(NBD_OPT_EXTENDED_HEADERS))
                    .add(option(NBD_OPT_STRUCTURED_REPLY))
                    .add(option(NBD_OPT_EXTENDED_HEADERS))
                    .add(option(NBD_OPT_GO, info_go_data("", {})));
  auto o = run_all_splits(cat, script);
  REQUIRE(o.end == Action::Kind::start_transmission);
  auto reps = parse_replies(o.sent, 18);
  CHECK(reps[0].type == NBD_REP_ACK);
  CHECK(reps[1].type == NBD_REP_ERR_INVALID);
  CHECK(reps[2].type == NBD_REP_ACK);
  CHECK(reps[3].type == NBD_REP_ERR_EXT_HEADER_REQD);
  CHECK(reps[4].type == NBD_REP_ERR_INVALID);
  CHECK(o.result.mode == ReplyMode::extended);
  CHECK((o.result.transmission_flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD) == 0);  // no contexts selected
}

TEST_CASE("SET_META_CONTEXT: ids, replacement, export binding at GO") {
  auto cat = make_catalog();
  auto set_ro =
      option(NBD_OPT_SET_META_CONTEXT, meta_data("ro", {"base:allocation", "qemu:dirty-bitmap:b1",
                                                        "qemu:allocation-depth", "base:allocation", "other:thing"}));
  SUBCASE("selection used when GO names the same export") {
    auto o = run_all_splits(cat, Bytes()
                                     .u32(3)
                                     .add(option(NBD_OPT_EXTENDED_HEADERS))
                                     .add(set_ro)
                                     .add(option(NBD_OPT_GO, info_go_data("ro", {}))));
    REQUIRE(o.end == Action::Kind::start_transmission);
    auto reps = parse_replies(o.sent, 18);
    REQUIRE(reps.size() >= 5);
    CHECK(reps[1].data == Bytes().u32(kContextIdBaseAllocation).str("base:allocation").v);
    CHECK(reps[2].data == Bytes().u32(kContextIdAllocationDepth).str("qemu:allocation-depth").v);
    CHECK(reps[3].data == Bytes().u32(kContextIdFirstBitmap + 1).str("qemu:dirty-bitmap:b1").v);
    CHECK(reps[4].type == NBD_REP_ACK);
    REQUIRE(o.result.contexts.size() == 3);
    CHECK((o.result.transmission_flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD) != 0);
  }
  SUBCASE("dropped when GO names another export") {
    auto o = run_all_splits(
        cat,
        Bytes().u32(3).add(option(NBD_OPT_STRUCTURED_REPLY)).add(set_ro).add(option(NBD_OPT_GO, info_go_data("", {}))));
    REQUIRE(o.end == Action::Kind::start_transmission);
    CHECK(o.result.contexts.empty());
  }
  SUBCASE("a failed SET still clears the previous selection") {
    auto bad = option(NBD_OPT_SET_META_CONTEXT, Bytes().u32(2).str("ro").u32(1).u32(50));
    auto o = run_all_splits(cat, Bytes()
                                     .u32(3)
                                     .add(option(NBD_OPT_STRUCTURED_REPLY))
                                     .add(set_ro)
                                     .add(bad)
                                     .add(option(NBD_OPT_GO, info_go_data("ro", {}))));
    REQUIRE(o.end == Action::Kind::start_transmission);
    CHECK(o.result.contexts.empty());
  }
  SUBCASE("SET without structured replies is INVALID") {
    auto reps = parse_replies(run_all_splits(cat, Bytes().u32(3).add(set_ro)).sent, 18);
    REQUIRE(reps.size() == 1);
    CHECK(reps[0].type == NBD_REP_ERR_INVALID);
  }
}

TEST_CASE("LIST_META_CONTEXT replies carry id 0") {
  auto cat = make_catalog();
  auto o = run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_LIST_META_CONTEXT, meta_data("ro", {"qemu:"}))));
  auto reps = parse_replies(o.sent, 18);
  REQUIRE(reps.size() == 4);
  CHECK(reps[0].data == Bytes().u32(0).str("qemu:allocation-depth").v);
  CHECK(reps[1].data == Bytes().u32(0).str("qemu:dirty-bitmap:b0").v);
  CHECK(reps[2].data == Bytes().u32(0).str("qemu:dirty-bitmap:b1").v);
  CHECK(reps[3].type == NBD_REP_ACK);
}

TEST_CASE("shutting down: options get NBD_REP_ERR_SHUTDOWN, ABORT still ACKed") {
  struct Closing : StaticCatalog {
    using StaticCatalog::StaticCatalog;
    bool shutting_down() const override { return true; }
  } cat(*make_catalog().exports());
  auto reps = parse_replies(
      run_all_splits(cat, Bytes().u32(3).add(option(NBD_OPT_GO, info_go_data("", {}))).add(option(NBD_OPT_ABORT))).sent,
      18);
  REQUIRE(reps.size() == 2);
  CHECK(reps[0].type == NBD_REP_ERR_SHUTDOWN);
  CHECK(reps[1].type == NBD_REP_ACK);
}

TEST_CASE("SET_META_CONTEXT: a selection does not carry over to an export re-added under the same name") {
  // The first look-up (SET) sees `ro` as instance 1; later ones (GO) see
  // the list after `ro` was removed and added again: instance 2, other
  // bitmaps. The selection's context ids named instance 1's bitmaps.
  struct Changing : ExportCatalog {
    std::shared_ptr<const ExportList> before, after;
    mutable int calls = 0;
    std::shared_ptr<const ExportList> exports() const override { return calls++ == 0 ? before : after; }
  };
  ExportInfo v1;
  v1.name = "ro";
  v1.size = 4096;
  v1.bitmaps = {"b0", "b1"};
  v1.instance = 1;
  ExportInfo v2 = v1;
  v2.bitmaps = {"other"};
  v2.instance = 2;
  auto script = Bytes()
                    .u32(3)
                    .add(option(NBD_OPT_STRUCTURED_REPLY))
                    .add(option(NBD_OPT_SET_META_CONTEXT, meta_data("ro", {"qemu:dirty-bitmap:b1"})))
                    .add(option(NBD_OPT_GO, info_go_data("ro", {})));
  SUBCASE("re-added: dropped") {
    Changing cat;
    cat.before = std::make_shared<const ExportList>(ExportList{v1});
    cat.after = std::make_shared<const ExportList>(ExportList{v2});
    auto o = drive(cat, script.v, {});
    REQUIRE(o.end == Action::Kind::start_transmission);
    CHECK(o.result.export_info->instance == 2);
    CHECK(o.result.contexts.empty());
    CHECK((o.result.transmission_flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD) == 0);
  }
  SUBCASE("the same instance: kept") {
    Changing cat;
    cat.before = std::make_shared<const ExportList>(ExportList{v1});
    cat.after = cat.before;
    auto o = drive(cat, script.v, {});
    REQUIRE(o.end == Action::Kind::start_transmission);
    CHECK(o.result.contexts.size() == 1);
  }
}
