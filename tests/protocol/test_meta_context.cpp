#include <doctest/doctest.h>

#include "protocol/constants.hpp"
#include "protocol/meta_context.hpp"

using namespace qnbd::protocol;

namespace {

std::vector<std::string> names(const ExportInfo& e, std::vector<std::string_view> q, bool list) {
  std::vector<std::string> out;
  for (const auto& m : match_meta_contexts(e, q, list)) out.push_back(m.name);
  return out;
}

using V = std::vector<std::string>;

}  // namespace

TEST_CASE("meta-context queries follow proto.md \"Metadata querying\" and qemu nbd/server.c") {
  ExportInfo e;
  e.allocation_depth = true;
  e.bitmaps = {"b0", "b1"};
  const V all{"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"};

  struct Row {
    std::vector<std::string_view> q;
    V list, set;
  };
  const std::vector<Row> rows = {
      {{}, all, {}},
      {{"base:"}, {"base:allocation"}, {}},
      {{"base:allocation"}, {"base:allocation"}, {"base:allocation"}},
      {{"base:other"}, {}, {}},
      {{"qemu:"}, {"qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}, {}},
      {{"qemu:dirty-bitmap:"}, {"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}, {}},
      {{"qemu:dirty-bitmap:b1"}, {"qemu:dirty-bitmap:b1"}, {"qemu:dirty-bitmap:b1"}},
      {{"qemu:dirty-bitmap:b9"}, {}, {}},
      {{"qemu:allocation-depth"}, {"qemu:allocation-depth"}, {"qemu:allocation-depth"}},
      {{"qemu:anything-else"}, {}, {}},
      {{"unknownns:x"}, {}, {}},
      {{"nocolon"}, {}, {}},
      // duplicates collapse, order is fixed regardless of query order
      {{"qemu:dirty-bitmap:b1", "base:allocation", "base:allocation", "qemu:dirty-bitmap:b0"},
       {"base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"},
       {"base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}},
  };
  for (const auto& r : rows) {
    CAPTURE(r.q.size());
    if (!r.q.empty()) CAPTURE(r.q[0]);
    CHECK(names(e, r.q, true) == r.list);
    CHECK(names(e, r.q, false) == r.set);
  }
}

TEST_CASE("allocation-depth is offered only when enabled; ids are qemu's") {
  ExportInfo e;
  e.bitmaps = {"x"};
  CHECK(names(e, {"qemu:allocation-depth"}, false).empty());
  CHECK(names(e, {}, true) == V{"base:allocation", "qemu:dirty-bitmap:x"});
  auto m = match_meta_contexts(e, {"base:allocation", "qemu:dirty-bitmap:x"}, false);
  REQUIRE(m.size() == 2);
  CHECK(m[0].id == 0);
  CHECK(m[1].id == 2);
  CHECK(m[1].kind == ContextKind::dirty_bitmap);
}

TEST_CASE("queries longer than 4096 bytes are skipped") {
  ExportInfo e;
  std::string q = "base:allocation" + std::string(5000, 'x');
  CHECK(names(e, {q}, true).empty());
}
