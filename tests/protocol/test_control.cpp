// The control protocol (protocol/control.hpp): each command's arguments,
// every refusal's stable code, reply encoding, and the bounded line reader.
#include <doctest/doctest.h>

#include <string>

#include "protocol/control.hpp"

using namespace qnbd::protocol::control;
using nlohmann::json;

namespace {

Request ok_request(const std::string& line) {
  auto r = parse_request(line);
  if (auto* f = std::get_if<Refusal>(&r)) FAIL(line << " refused: " << f->message);
  return std::get<Request>(r);
}

Refusal refused(const std::string& line) {
  auto r = parse_request(line);
  REQUIRE_MESSAGE(std::holds_alternative<Refusal>(r), line << " was accepted");
  return std::get<Refusal>(r);
}

std::string code(const std::string& line) { return error_code_name(refused(line).code); }

}  // namespace

TEST_CASE("control: every command parses into its typed form") {
  Request r = ok_request(R"({"id": 7, "command": "status"})");
  CHECK(r.id == 7);
  CHECK(std::holds_alternative<Status>(r.cmd));

  r = ok_request(
      R"({"id":"a","command":"bitmap-add","arguments":{"export":"d","name":"b","granularity":65536,"disabled":true}})");
  CHECK(r.id == "a");
  auto add = std::get<BitmapAdd>(r.cmd);
  CHECK(add.export_name == "d");
  CHECK(add.name == "b");
  CHECK(add.granularity == 65536);
  CHECK(add.disabled);

  for (auto [name, kind] :
       {std::pair{"bitmap-remove", BitmapSimple::Kind::remove}, std::pair{"bitmap-clear", BitmapSimple::Kind::clear},
        std::pair{"bitmap-enable", BitmapSimple::Kind::enable},
        std::pair{"bitmap-disable", BitmapSimple::Kind::disable}}) {
    r = ok_request(std::string(R"({"command":")") + name + R"(","arguments":{"export":"d","name":"b"}})");
    CHECK(r.id.is_null());
    CHECK(std::get<BitmapSimple>(r.cmd).kind == kind);
  }

  r = ok_request(R"({"command":"bitmap-merge","arguments":{"export":"d","target":"t","sources":["a","b"]}})");
  CHECK(std::get<BitmapMerge>(r.cmd).sources == std::vector<std::string>{"a", "b"});

  r = ok_request(
      R"({"command":"export-add","arguments":{"name":"n","image":"/x.qcow2","format":"qcow2","read-only":true,"bitmaps":["b"],"allocation-depth":true}})");
  auto ea = std::get<ExportAdd>(r.cmd);
  CHECK(ea.image == "/x.qcow2");
  CHECK(ea.format == "qcow2");
  CHECK(ea.read_only);
  CHECK(ea.allocation_depth);
  CHECK(ea.bitmaps.size() == 1);

  r = ok_request(R"({"command":"export-remove","arguments":{"name":"n","force":true}})");
  CHECK(std::get<ExportRemove>(r.cmd).force);

  r = ok_request(R"({"id":1.5,"command":"checkpoint","arguments":{"name":"c2","disable":"c1","exports":["a","b"]}})");
  auto cp = std::get<Checkpoint>(r.cmd);
  CHECK(cp.name == "c2");
  CHECK(cp.disable == "c1");
  CHECK(cp.exports.size() == 2);
  CHECK(ok_request(R"({"command":"checkpoint","arguments":{"name":"c","exports":["a"]}})").cmd.index() == 6);
  // "" is the default export: a valid export name, never a valid bitmap name.
  CHECK(std::get<Checkpoint>(ok_request(R"({"command":"checkpoint","arguments":{"name":"c","exports":[""]}})").cmd)
            .exports[0]
            .empty());
  CHECK(std::get<BitmapSimple>(ok_request(R"({"command":"bitmap-clear","arguments":{"export":"","name":"b"}})").cmd)
            .export_name.empty());
}

TEST_CASE("control: malformed requests get stable error codes and keep their id") {
  CHECK(code("") == "parse-error");
  CHECK(code("{") == "parse-error");
  CHECK(code("[1,2]") == "parse-error");
  CHECK(code("\"status\"") == "parse-error");
  CHECK(code(std::string(100, '[') + std::string(100, ']')) == "parse-error");
  CHECK(code("{\"command\":\"status\"}\xff") == "parse-error");
  CHECK(code(R"({"id":{},"command":"status"})") == "invalid-argument");
  CHECK(code(R"({"id":1})") == "invalid-argument");
  CHECK(code(R"({"id":1,"command":5})") == "invalid-argument");
  CHECK(code(R"({"id":1,"command":"status","extra":1})") == "invalid-argument");
  CHECK(code(R"({"id":1,"command":"status","arguments":[]})") == "invalid-argument");
  CHECK(code(R"({"id":1,"command":"status","arguments":{"x":1}})") == "invalid-argument");

  Refusal f = refused(R"({"id":"q","command":"reboot"})");
  CHECK(error_code_name(f.code) == std::string("unknown-command"));
  CHECK(f.id == "q");
  CHECK(f.message == "unknown command \"reboot\"");

  f = refused(R"({"id":3,"command":"bitmap-add","arguments":{"export":"d"}})");
  CHECK(f.id == 3);
  CHECK(f.message == "missing argument 'name'");
  CHECK(code(R"({"command":"bitmap-add","arguments":{"export":"d","name":""}})") == "invalid-argument");
  CHECK(code(R"({"command":"bitmap-add","arguments":{"export":"d","name":"b","granularity":1000}})") ==
        "invalid-argument");
  CHECK(code(R"({"command":"bitmap-add","arguments":{"export":"d","name":"b","granularity":-512}})") ==
        "invalid-argument");
  CHECK(code(R"({"command":"bitmap-add","arguments":{"export":"d","name":"b","granularity":256}})") ==
        "invalid-argument");
  CHECK(code(R"({"command":"bitmap-add","arguments":{"export":"d","name":"b","disabled":"yes"}})") ==
        "invalid-argument");
  CHECK(code(R"({"command":"bitmap-add","arguments":{"export":"d","name":")" + std::string(1024, 'x') + "\"}}") ==
        "invalid-argument");
  CHECK(code(R"({"command":"bitmap-add","arguments":{"export":"d","name":"a\u0000b"}})") == "invalid-argument");
  CHECK(code(R"({"command":"bitmap-merge","arguments":{"export":"d","target":"t","sources":[]}})") ==
        "invalid-argument");
  CHECK(code(R"({"command":"bitmap-merge","arguments":{"export":"d","target":"t","sources":["a",1]}})") ==
        "invalid-argument");
  CHECK(code(R"({"command":"export-add","arguments":{"name":"n","image":"i","format":"vmdk"}})") == "invalid-argument");
  CHECK(code(R"({"command":"checkpoint","arguments":{"name":"c","exports":["a","a"]}})") == "invalid-argument");
  CHECK(code(R"({"command":"checkpoint","arguments":{"name":"c","disable":"c","exports":["a"]}})") ==
        "invalid-argument");
  CHECK(code(R"({"command":"checkpoint","arguments":{"name":"c"}})") == "invalid-argument");
}

TEST_CASE("control: checkpoint views and view-end") {
  auto c = std::get<Checkpoint>(
      ok_request(R"({"command":"checkpoint","arguments":{"name":"c","exports":["a","b"],"views":["b"]}})").cmd);
  CHECK(c.views == std::vector<std::string>{"b"});
  CHECK(std::get<Checkpoint>(ok_request(R"({"command":"checkpoint","arguments":{"name":"c","exports":["a"]}})").cmd)
            .views.empty());
  CHECK(code(R"({"command":"checkpoint","arguments":{"name":"c","exports":["a"],"views":["x"]}})") ==
        "invalid-argument");  // not among the exports
  CHECK(code(R"({"command":"checkpoint","arguments":{"name":"c","exports":["a"],"views":["a","a"]}})") ==
        "invalid-argument");
  auto e = std::get<ViewEnd>(ok_request(R"({"command":"view-end","arguments":{"views":["a@c","b@c"]}})").cmd);
  CHECK(e.views == std::vector<std::string>{"a@c", "b@c"});
  CHECK(std::get<ViewEnd>(ok_request(R"({"command":"view-end","arguments":{"checkpoint":"c"}})").cmd).checkpoint ==
        "c");
  CHECK(code(R"({"command":"view-end","arguments":{}})") == "invalid-argument");
  CHECK(code(R"({"command":"view-end"})") == "invalid-argument");
  CHECK(code(R"({"command":"view-end","arguments":{"views":["a@c"],"checkpoint":"c"}})") == "invalid-argument");
  CHECK(code(R"({"command":"view-end","arguments":{"views":"a@c"}})") == "invalid-argument");
  CHECK(code(R"({"command":"view-end","arguments":{"checkpoint":""}})") == "invalid-argument");
}

TEST_CASE("control: replies are one JSON line and survive bytes that are not UTF-8") {
  std::string r = encode_result(5, json{{"x", 1}});
  CHECK(r == "{\"id\":5,\"result\":{\"x\":1}}\n");
  std::string e = encode_error("a", ErrorCode::not_found, "no export 'z\xff'");
  CHECK(e.back() == '\n');
  CHECK(e.find('\n') == e.size() - 1);
  json j = json::parse(e);
  CHECK(j["error"]["code"] == "not-found");
  CHECK(j["id"] == "a");
  CHECK(error_code_name(error_code_for_errno(ENOENT)) == std::string("not-found"));
  CHECK(error_code_name(error_code_for_errno(EEXIST)) == std::string("exists"));
  CHECK(error_code_name(error_code_for_errno(EIO)) == std::string("io-error"));
  CHECK(error_code_name(error_code_for_errno(EROFS)) == std::string("not-supported"));
}

TEST_CASE("control: the line buffer splits lines and drops a line over the limit with bounded memory") {
  LineBuffer b(16);
  b.feed("{\"a\"");
  CHECK(!b.next());
  b.feed(":1}\n{}\nxx");
  auto l = b.next();
  REQUIRE(l);
  CHECK(l->text == "{\"a\":1}");
  l = b.next();
  REQUIRE(l);
  CHECK(l->text == "{}");
  CHECK(!b.next());
  // 40 bytes without a newline in pieces: held no more than the limit.
  for (int i = 0; i < 10; ++i) {
    b.feed("yyyy");
    CHECK(b.buffered() <= 16);
    CHECK(!b.next());
  }
  b.feed("\nok\n");
  l = b.next();
  REQUIRE(l);
  CHECK(l->too_long);
  CHECK(l->text.empty());
  l = b.next();
  REQUIRE(l);
  CHECK(!l->too_long);
  CHECK(l->text == "ok");
  // Exactly the limit is accepted.
  b.feed(std::string(16, 'z') + "\n");
  l = b.next();
  REQUIRE(l);
  CHECK(!l->too_long);
  CHECK(l->text.size() == 16);

  // The real limit: a 1 MiB + 1 line is refused, a 1 MiB one is not.
  LineBuffer big;
  big.feed(std::string(max_line_bytes + 1, ' ') + "\n" + std::string(max_line_bytes, ' ') + "\n");
  CHECK(big.next()->too_long);
  CHECK(!big.next()->too_long);
}
