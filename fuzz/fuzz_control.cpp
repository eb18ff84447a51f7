// Fuzz entry: the control socket's protocol (protocol/control.hpp) on any
// bytes, fed through the line buffer in two pieces as a socket would.
//
// Properties checked (each can fail): parse_request never throws; every
// refusal has a known code and a message; an accepted request's names
// honour the documented bounds; every reply encodes to exactly one line of
// valid JSON; the line buffer never holds more than its limit.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_input.hpp"
#include "protocol/control.hpp"

using namespace qnbd::protocol::control;

namespace {

void check_line(const std::string& s) {
  QNBD_FUZZ_CHECK(!s.empty() && s.back() == '\n' && s.find('\n') == s.size() - 1);
  QNBD_FUZZ_CHECK(!nlohmann::json::parse(s, nullptr, false).is_discarded());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  LineBuffer buf(4096);
  const std::size_t cut = size ? data[0] % (size + 1) : 0;
  buf.feed(in.substr(0, cut));
  QNBD_FUZZ_CHECK(buf.buffered() <= 4096);
  buf.feed(in.substr(cut));
  QNBD_FUZZ_CHECK(buf.buffered() <= 4096);
  auto one = [&](std::string_view line) {
    auto r = parse_request(line);
    if (auto* f = std::get_if<Refusal>(&r)) {
      QNBD_FUZZ_CHECK(!f->message.empty());
      QNBD_FUZZ_CHECK(f->id.is_null() || f->id.is_string() || f->id.is_number());
      check_line(encode_error(f->id, f->code, f->message));
      return;
    }
    const Request& q = std::get<Request>(r);
    if (auto* c = std::get_if<Checkpoint>(&q.cmd)) {
      QNBD_FUZZ_CHECK(!c->exports.empty() && c->exports.size() <= max_list_items);
      QNBD_FUZZ_CHECK(!c->name.empty() && c->name.size() <= max_bitmap_name_bytes && c->name != c->disable);
    }
    if (auto* a = std::get_if<BitmapAdd>(&q.cmd)) {
      QNBD_FUZZ_CHECK(!a->export_name.empty() && !a->name.empty());
      QNBD_FUZZ_CHECK(a->granularity == 0 || (a->granularity >= 512 && (a->granularity & (a->granularity - 1)) == 0));
    }
    check_line(encode_result(q.id, nlohmann::json{{"command", q.command}}));
  };
  while (auto l = buf.next()) {
    if (l->too_long) continue;
    one(l->text);
  }
  one(in);  // the whole input as one line, newlines and all
  return 0;
}
