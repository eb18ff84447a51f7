// The Negotiator's TLS modes (NBD proto.md "TLS support", "FORCEDTLS mode",
// "NBD_OPT_STARTTLS"): expected bytes are written from the spec tables.
#include <doctest/doctest.h>

#include "negotiator_test_support.hpp"
#include "protocol/constants.hpp"
#include "protocol/negotiator.hpp"

using namespace qnbd::protocol;
using qnbd::test::Bytes;
using qnbd::test::info_go_data;
using qnbd::test::option;
using qnbd::test::parse_replies;
using qnbd::test::Rep;

namespace {

StaticCatalog tls_catalog() {
  ExportInfo a;
  a.name = "disk";
  a.description = "secret";
  a.size = 1 << 20;
  a.read_only = false;
  return StaticCatalog({a});
}

// Drives the negotiator through `before` (in clear), then, if it asks for
// start_tls, records it, calls tls_started() and feeds `after`.
struct TlsRun {
  std::vector<std::byte> sent;
  std::vector<Rep> replies;
  bool tls_asked = false;
  Action::Kind end = Action::Kind::need_bytes;
  Negotiated result;
  std::string close_reason;
};

TlsRun drive(const ExportCatalog& cat, TlsMode mode, const Bytes& before, const Bytes& after = {},
             bool upgrade = true) {
  Negotiator n(cat, mode);
  TlsRun r;
  const std::vector<std::byte>* in = &before.v;
  std::size_t pos = 0;
  for (int guard = 0; guard < 10000; ++guard) {
    auto a = n.next();
    if (a.kind == Action::Kind::send) {
      r.sent.insert(r.sent.end(), a.data.begin(), a.data.end());
      continue;
    }
    if (a.kind == Action::Kind::start_tls) {
      REQUIRE_FALSE(r.tls_asked);  // once per connection
      r.tls_asked = true;
      // Bytes fed before tls_started() must be ignored (they were never read).
      if (pos < in->size()) n.feed(std::span(in->data() + pos, 1));
      if (!upgrade) {
        r.end = a.kind;
        break;
      }
      n.tls_started();
      CHECK(n.tls_active());
      in = &after.v;
      pos = 0;
      continue;
    }
    if (a.kind == Action::Kind::need_bytes) {
      REQUIRE(a.bytes > 0);
      if (pos == in->size()) break;
      auto take = std::min(a.bytes, in->size() - pos);
      n.feed(std::span(in->data() + pos, take));
      pos += take;
      continue;
    }
    r.end = a.kind;
    if (a.kind == Action::Kind::start_transmission) r.result = n.result();
    break;
  }
  r.close_reason = n.close_reason();
  // The option replies after the 18-byte greeting (and before the
  // NBD_OPT_EXPORT_NAME reply, where a test ends with one).
  REQUIRE(r.sent.size() >= 18);
  r.replies = parse_replies(r.sent, 18, /*other_may_follow=*/true);
  return r;
}

Bytes flags() { return Bytes().u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES); }

}  // namespace

TEST_CASE("NOTLS: STARTTLS gets NBD_REP_ERR_POLICY and options work normally") {
  auto cat = tls_catalog();
  auto r =
      drive(cat, TlsMode::none, flags().add(option(NBD_OPT_STARTTLS)).add(option(NBD_OPT_GO, info_go_data("disk"))));
  CHECK_FALSE(r.tls_asked);
  REQUIRE(r.replies.size() >= 2);
  CHECK(r.replies[0].type == NBD_REP_ERR_POLICY);
  CHECK(r.end == Action::Kind::start_transmission);
}

TEST_CASE("FORCEDTLS before STARTTLS: every option but ABORT gets TLS_REQD, nothing about exports leaks") {
  auto cat = tls_catalog();
  const std::uint32_t opts[] = {NBD_OPT_LIST,
                                NBD_OPT_INFO,
                                NBD_OPT_GO,
                                NBD_OPT_STRUCTURED_REPLY,
                                NBD_OPT_LIST_META_CONTEXT,
                                NBD_OPT_SET_META_CONTEXT,
                                NBD_OPT_EXTENDED_HEADERS,
                                4 /* PEEK_EXPORT */,
                                0x1234 /* unknown */};
  auto script = flags();
  for (auto o : opts) {
    bool takes_name = o == NBD_OPT_INFO || o == NBD_OPT_GO;
    script.add(option(o, takes_name ? info_go_data("disk") : Bytes()));
  }
  script.add(option(NBD_OPT_ABORT));
  auto r = drive(cat, TlsMode::required, script);
  CHECK_FALSE(r.tls_asked);
  REQUIRE(r.replies.size() == std::size(opts) + 1);
  for (std::size_t i = 0; i < std::size(opts); ++i) {
    CAPTURE(opts[i]);
    CHECK(r.replies[i].opt == opts[i]);
    CHECK(r.replies[i].type == NBD_REP_ERR_TLS_REQD);
  }
  CHECK(r.replies.back().type == NBD_REP_ACK);  // ABORT still answered
  CHECK(r.end == Action::Kind::close);
  // The export's name and description never appear in clear.
  std::string sent(reinterpret_cast<const char*>(r.sent.data()), r.sent.size());
  CHECK(sent.find("secret") == std::string::npos);
  CHECK(sent.find("disk") == std::string::npos);
}

TEST_CASE("FORCEDTLS: an oversized option before STARTTLS gets TLS_REQD too") {
  auto cat = tls_catalog();
  auto big = Bytes().zeros(kMaxOptionLength + 1);
  auto r = drive(cat, TlsMode::required, flags().add(option(NBD_OPT_LIST, big)));
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].type == NBD_REP_ERR_TLS_REQD);
}

TEST_CASE("FORCEDTLS: EXPORT_NAME before STARTTLS closes without a reply") {
  auto cat = tls_catalog();
  auto r = drive(cat, TlsMode::required, flags().add(option(NBD_OPT_EXPORT_NAME, Bytes().str("disk"))));
  CHECK(r.end == Action::Kind::close);
  CHECK(r.sent.size() == 18);  // the greeting only
  CHECK(r.close_reason.find("STARTTLS") != std::string::npos);
}

TEST_CASE("FORCEDTLS: STARTTLS with data gets INVALID and no upgrade") {
  auto cat = tls_catalog();
  auto r = drive(cat, TlsMode::required, flags().add(option(NBD_OPT_STARTTLS, Bytes().u32(0))));
  CHECK_FALSE(r.tls_asked);
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].type == NBD_REP_ERR_INVALID);
}

TEST_CASE("FORCEDTLS: STARTTLS is acknowledged, then the handshake; nothing is read in clear before it") {
  auto cat = tls_catalog();
  // A byte the client pipelined after STARTTLS must not reach the negotiator.
  auto r = drive(cat, TlsMode::required, flags().add(option(NBD_OPT_STARTTLS)).add(Bytes().u8(0xff)), {}, false);
  CHECK(r.tls_asked);
  CHECK(r.end == Action::Kind::start_tls);
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].opt == NBD_OPT_STARTTLS);
  CHECK(r.replies[0].type == NBD_REP_ACK);
  CHECK(r.replies[0].data.empty());
}

TEST_CASE("FORCEDTLS after the upgrade: options work, a second STARTTLS is INVALID, no TLS_REQD") {
  auto cat = tls_catalog();
  auto after =
      Bytes().add(option(NBD_OPT_STARTTLS)).add(option(NBD_OPT_LIST)).add(option(NBD_OPT_GO, info_go_data("disk")));
  auto r = drive(cat, TlsMode::required, flags().add(option(NBD_OPT_STARTTLS)), after);
  CHECK(r.tls_asked);
  REQUIRE(r.replies.size() >= 4);
  CHECK(r.replies[0].type == NBD_REP_ACK);  // STARTTLS
  CHECK(r.replies[1].opt == NBD_OPT_STARTTLS);
  CHECK(r.replies[1].type == NBD_REP_ERR_INVALID);  // second STARTTLS
  CHECK(r.replies[2].type == NBD_REP_SERVER);       // LIST now lists
  for (auto& p : r.replies) CHECK(p.type != NBD_REP_ERR_TLS_REQD);
  CHECK(r.end == Action::Kind::start_transmission);
  REQUIRE(r.result.export_info != nullptr);
  CHECK(r.result.export_info->name == "disk");
}

TEST_CASE("FORCEDTLS after the upgrade: EXPORT_NAME works") {
  auto cat = tls_catalog();
  auto r = drive(cat, TlsMode::required, flags().add(option(NBD_OPT_STARTTLS)),
                 option(NBD_OPT_EXPORT_NAME, Bytes().str("disk")));
  CHECK(r.end == Action::Kind::start_transmission);
}
