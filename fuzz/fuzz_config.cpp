// Fuzz entry: the JSON configuration loader (config/config.hpp) on any text.
//
// Properties checked (each can fail): parse_config never throws; a refusal
// is EINVAL with a message; an accepted config honours every bound the
// loader documents (at least one export, unique names, limits in range).
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string_view>

#include "config/config.hpp"
#include "fuzz_input.hpp"

using namespace qnbd::config;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto r = parse_config(std::string_view(reinterpret_cast<const char*>(data), size));
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
