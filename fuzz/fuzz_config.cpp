// Fuzz entry: the JSON configuration loader (config/config.hpp) on any text,
// and the same text as an image name: `json:` + text and --image-opts text
// (config/image_spec.hpp).
//
// Properties checked (each can fail): parse_config never throws; a refusal
// is EINVAL with a message; an accepted config honours every bound the
// loader documents (at least one export, unique names, limits in range).
// An image spec is refused with one line, or names a file and a format
// qnbd opens; rebasing its file names keeps it parseable.
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "config/image_spec.hpp"
#include "fuzz_input.hpp"

using namespace qnbd::config;

namespace {

void check_image_spec(const qnbd::Result<ImageSpec>& s) {
  if (!s) {
    QNBD_FUZZ_CHECK(!s.error().message.empty() && s.error().message.find('\n') == std::string::npos);
    return;
  }
  QNBD_FUZZ_CHECK(!s->filename.empty());
  QNBD_FUZZ_CHECK(s->format.empty() || s->format == "raw" || s->format == "qcow2");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::string json = "json:" + std::string(text);
  auto spec = parse_image_json(json);
  check_image_spec(spec);
  if (spec) check_image_spec(parse_image_json(rebase_image_json(json, "/base")));
  check_image_spec(parse_image_opts(text));
  auto r = parse_config(text);
  if (!r) {
    QNBD_FUZZ_CHECK(r.error().code == EINVAL && !r.error().message.empty());
    return 0;
  }
  QNBD_FUZZ_CHECK(!r->exports.empty());
  QNBD_FUZZ_CHECK(!r->listeners.empty());
  std::set<std::string> names;
  for (const auto& e : r->exports) {
    QNBD_FUZZ_CHECK(names.insert(e.name).second);
    QNBD_FUZZ_CHECK(e.name.size() <= max_name_bytes && !e.image.empty());
    for (const auto& b : e.bitmaps) QNBD_FUZZ_CHECK(!b.empty() && b.size() <= max_bitmap_name_bytes);
  }
  for (const auto& l : r->listeners) {
    if (l.type == "unix")
      QNBD_FUZZ_CHECK(!l.path.empty() && l.path.size() <= max_unix_path_bytes);
    else
      QNBD_FUZZ_CHECK(l.type == "tcp" && l.port >= 1);
  }
  QNBD_FUZZ_CHECK(r->limits.max_connections <= max_connections_limit);
  QNBD_FUZZ_CHECK(r->limits.handshake_timeout_seconds <= max_handshake_timeout_seconds);
  QNBD_FUZZ_CHECK(r->limits.max_inflight_bytes_per_connection >= min_inflight_bytes &&
                  r->limits.max_inflight_bytes_per_connection <= max_inflight_bytes);
  QNBD_FUZZ_CHECK(r->limits.threads <= max_threads);
  return 0;
}
