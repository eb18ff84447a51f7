// json: pseudo-filenames and --image-opts (config/image_spec.hpp): the trees
// oVirt imageio hands qemu-nbd, and QEMU's refusals for what qnbd does not
// open. The same cases run against qemu-nbd in
// integration/test-serve-image-opts.sh.
#include <doctest/doctest.h>

#include <string>

#include "config/config.hpp"
#include "config/image_spec.hpp"

using namespace qnbd::config;

namespace {

ImageSpec json_ok(const std::string& text) {
  auto r = parse_image_json(text);
  REQUIRE_MESSAGE(r, text << ": " << (r ? "" : r.error().message));
  return *r;
}

ImageSpec opts_ok(const std::string& text) {
  auto r = parse_image_opts(text);
  REQUIRE_MESSAGE(r, text << ": " << (r ? "" : r.error().message));
  return *r;
}

std::string json_error(const std::string& text) {
  auto r = parse_image_json(text);
  REQUIRE_MESSAGE(!r, "accepted: " << text);
  CHECK(r.error().message.find('\n') == std::string::npos);
  return r.error().message;
}

std::string opts_error(const std::string& text) {
  auto r = parse_image_opts(text);
  REQUIRE_MESSAGE(!r, "accepted: " << text);
  CHECK(r.error().message.find('\n') == std::string::npos);
  return r.error().message;
}

}  // namespace

TEST_CASE("image spec: imageio's trees") {
  auto s = json_ok(R"(json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/v/disk.qcow2"}})");
  CHECK(s.filename == "/v/disk.qcow2");
  CHECK(s.format == "qcow2");
  CHECK_FALSE(s.offset);
  CHECK_FALSE(s.size);
  CHECK_FALSE(s.no_backing);

  s = json_ok(R"(json:{"driver": "qcow2", "file": {"driver": "file", "filename": "d"}, "backing": null})");
  CHECK(s.no_backing);
  CHECK(s.warnings.empty());

  // A range of a raw file, and a qcow2 image stored at an offset in one.
  s = json_ok(
      R"(json:{"driver": "raw", "file": {"driver": "file", "filename": "r"}, "offset": 1048576, "size": 4096})");
  CHECK(s.format == "raw");
  CHECK(s.offset == 1048576u);
  CHECK(s.size == 4096u);
  s = json_ok(
      R"(json:{"driver": "qcow2", "file": {"driver": "raw", "offset": 65536, "file": {"driver": "file", "filename": "e"}}})");
  CHECK(s.format == "qcow2");
  CHECK(s.filename == "e");
  CHECK(s.offset == 65536u);
  CHECK_FALSE(s.size);
}

TEST_CASE("image spec: spellings QEMU treats alike") {
  // Dotted keys and nested objects; no driver: probe; driver file: raw.
  CHECK(json_ok(R"(json:{"driver": "qcow2", "file.filename": "x"})").filename == "x");
  CHECK(json_ok(R"(json:{"file": {"driver": "file", "filename": "x"}})").format.empty());
  auto s = json_ok(R"(json:{"driver": "file", "filename": "x"})");
  CHECK(s.format == "raw");
  CHECK(s.filename == "x");
  CHECK(json_ok(R"(json:{"driver": "host_device", "filename": "/dev/sdz"})").filename == "/dev/sdz");
  // Sizes: numbers, strings, suffixes.
  CHECK(json_ok(R"(json:{"driver": "raw", "file.filename": "r", "offset": "1M"})").offset == (1u << 20));
  CHECK(json_ok(R"(json:{"driver": "raw", "file.filename": "r", "size": "2k"})").size == 2048u);
  CHECK(json_ok(R"(json:{"driver": "raw", "file.filename": "r", "offset": "512"})").offset == 512u);
  // "backing" on a raw node: QEMU ignores it.
  CHECK_FALSE(json_ok(R"(json:{"driver": "raw", "file.filename": "r", "backing": null})").no_backing);

  s = opts_ok("driver=qcow2,file.driver=raw,file.offset=1M,file.file.driver=file,file.file.filename=a,,b");
  CHECK(s.filename == "a,b");
  CHECK(s.offset == (1u << 20));
  s = opts_ok("driver=qcow2,file.filename=t.qcow2,backing=");
  CHECK(s.no_backing);
  REQUIRE(s.warnings.size() == 1);
  CHECK(s.warnings[0].find("deprecated") != std::string::npos);
}

TEST_CASE("image spec: refusals, one line each, in QEMU's words where it has them") {
  CHECK(json_error(R"(json:{"driver": "qcow2", "file": {"driver": "file", "filename": "t"})") ==
        "Could not parse the JSON options");
  CHECK(json_error("json:[1]") == "Invalid JSON object given");
  CHECK(json_error(R"(json:{"driver": "qcow2", "filename": "t"})") == "A block device must be specified for \"file\"");
  CHECK(json_error(R"(json:{"driver": "qcow2"})") == "A block device must be specified for \"file\"");
  CHECK(json_error(R"(json:{"driver": "qcow2", "file": "t"})") == "Cannot find device='t' nor node-name='t'");
  CHECK(json_error(R"(json:{"driver": "qcow2", "file.filename": "t", "backing": "base"})") ==
        "Cannot find device='base' nor node-name='base'");
  CHECK(json_error(R"(json:{"driver": "qcow2", "file.filename": "t", "bogus": 1})") ==
        "Block format 'qcow2' doesn't support the option 'bogus'");
  CHECK(json_error(R"(json:{"driver": "qcow2", "file": {"driver": "file", "filename": "t", "bogus": 1}})") ==
        "Block protocol 'file' doesn't support the option 'bogus'");
  CHECK(json_error(R"(json:{"driver": "qcow2", "file": {"driver": "file"}})") ==
        "The 'file' block driver requires a file name");
  CHECK(json_error(R"(json:{"driver": "vmdk", "file.filename": "t"})").find("unsupported format 'vmdk'") !=
        std::string::npos);
  CHECK(json_error(R"(json:{"driver": "raw", "file.filename": "r", "offset": -1})")
            .find("Parameter 'offset' expects a non-negative number below 2^64") == 0);
  CHECK(json_error(R"(json:{"driver": "raw", "file.filename": "r", "offset": 1.5})").find("'offset'") !=
        std::string::npos);
  CHECK(json_error(R"(json:{"driver": "raw", "file.filename": "r", "offset": "99999999999999999999"})")
            .find("'offset'") != std::string::npos);
  CHECK(json_error(R"(json:{"driver": "raw", "file.filename": "r", "offset": "16E"})").find("'offset'") !=
        std::string::npos);
  // offset and size belong to a raw node.
  CHECK(json_error(R"(json:{"driver": "qcow2", "file.filename": "t", "offset": 512})") ==
        "Block format 'qcow2' doesn't support the option 'offset'");
  // One range only; a range over a range is not opened.
  CHECK(json_error(R"(json:{"driver": "raw", "offset": 512, "file": {"driver": "raw", "offset": 512,
                            "file": {"driver": "file", "filename": "r"}}})")
            .find("not supported") != std::string::npos);
  CHECK(json_error(R"(json:{"driver": "qcow2", "file": {"driver": "nbd", "filename": "x"}})").find("'nbd'") !=
        std::string::npos);
  CHECK(json_error(R"(json:{"driver": "qcow2", "file.filename": "t", "file": {"filename": "u"}})")
            .find("Duplicate option 'file.filename'") == 0);
  CHECK(json_error(R"(json:{"driver": ["qcow2"], "file.filename": "t"})").find("scalar") != std::string::npos);
  CHECK(json_error(R"(json:{"driver": 1, "file.filename": "t"})").find("'driver'") != std::string::npos);
  // Nesting is bounded (a deep object is refused, not recursed into).
  std::string deep = "json:{\"file\":";
  for (int i = 0; i < 64; ++i) deep += "{\"a\":";
  deep += "1" + std::string(64, '}') + "}";
  CHECK(json_error(deep).find("nested") != std::string::npos);
  CHECK(json_error("json:" + std::string(70000, ' ') + "{}").find("64 KiB") != std::string::npos);

  // Keys and values are quoted on one line (the config fuzz target found
  // a key with a newline in it).
  CHECK(json_error(R"(json:{"driver": "qcow2", "file.filename": "t", "bo\ngus": 1})") ==
        "Block format 'qcow2' doesn't support the option 'bo\\ngus'");
  CHECK(opts_error("a\nb").find("'a\\nb' is not KEY=VALUE") == 0);
  CHECK(opts_error("top.qcow2").find("is not KEY=VALUE") != std::string::npos);
  CHECK(opts_error("driver=qcow2,file.filename=t,backing=null") == "Cannot find device='null' nor node-name='null'");
  CHECK(opts_error("driver=qcow2,file.filename=t,file.filename=u") == "Duplicate option 'file.filename'");
  CHECK(opts_error("driver=raw,file.filename=r,offset=1x").find("'offset'") != std::string::npos);
}

TEST_CASE("image spec: a config file's json: image is checked at load and its file names are rebased") {
  auto bad = parse_config(R"({"exports": [{"name": "", "image": "json:{\"driver\": \"qcow2\"}"}]})");
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message.find("/exports/0/image") != std::string::npos);
  CHECK(bad.error().message.find("A block device must be specified") != std::string::npos);
  const std::string rebased = rebase_image_json(
      R"(json:{"driver": "qcow2", "file": {"driver": "raw", "offset": 512, "file": {"filename": "d.raw"}}})", "/etc/q");
  auto s = parse_image_json(rebased);
  REQUIRE(s);
  CHECK(s->filename == "/etc/q/d.raw");
  CHECK(s->offset == 512u);
  auto abs = parse_image_json(rebase_image_json(R"(json:{"driver": "raw", "file.filename": "/x/d"})", "/etc/q"));
  REQUIRE(abs);
  CHECK(abs->filename == "/x/d");
}
