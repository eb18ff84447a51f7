// The export registry: one Export per export, the explicit bitmap cap, and
// the one lookup from a selected metadata context to a bitmap handle.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "image/block_device.hpp"
#include "protocol/meta_context.hpp"
#include "server/export_registry.hpp"

using namespace qnbd;

namespace {

// A real 1 MiB raw image (the registry never reads it) with `n` bitmaps
// named b0.. whose handles are 100 + index.
server::ExportSpec spec_with_bitmaps(const std::string& img, const std::string& name, std::size_t n) {
  image::OpenOptions oo;
  oo.format = image::ImageFormat::raw;
  oo.read_only = true;
  auto dev = image::open_image(img, oo);
  REQUIRE(dev.has_value());
  server::ExportSpec spec;
  spec.device = std::shared_ptr<image::BlockDevice>(std::move(*dev));
  spec.info = server::describe_export(*spec.device, name, "", true, false, false);
  for (std::size_t i = 0; i < n; ++i) spec.bitmaps.push_back({std::string("b").append(std::to_string(i)), 100 + i});
  return spec;
}

struct Image {
  std::string path;
  Image() {
    char tmpl[] = "/tmp/qnbd-registry-test.XXXXXX";
    int fd = ::mkstemp(tmpl);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, 1 << 20) == 0);
    ::close(fd);
    path = tmpl;
  }
  ~Image() { std::filesystem::remove(path); }
};

}  // namespace

TEST_CASE("export registry: more bitmaps than contexts fit is refused, not cut silently") {
  Image img;
  server::ExportRegistry reg;
  auto over = reg.add(spec_with_bitmaps(img.path, "over", server::kMaxBitmapsPerExport + 1));
  CHECK_FALSE(over.has_value());
  CHECK(reg.find("over") == nullptr);
  REQUIRE(reg.add(spec_with_bitmaps(img.path, "full", server::kMaxBitmapsPerExport)).has_value());
  auto e = reg.find("full");
  REQUIRE(e != nullptr);
  CHECK(e->info().bitmaps.size() == server::kMaxBitmapsPerExport);
  CHECK(reg.infos()->size() == 1);
  // Every context of the full export fits: base, depth and all bitmaps.
  auto all = protocol::match_meta_contexts(e->info(), {}, true);
  auto resolved = e->resolve_contexts(all);
  REQUIRE(resolved.has_value());
  CHECK(resolved->size() <= server::kMaxContexts);
}

TEST_CASE("export registry: a bitmap context resolves to its own handle; an unknown one is an error") {
  Image img;
  server::ExportRegistry reg;
  REQUIRE(reg.add(spec_with_bitmaps(img.path, "e", 3)).has_value());
  CHECK_FALSE(reg.add(spec_with_bitmaps(img.path, "e", 0)).has_value());  // name given twice
  auto e = reg.find("e");
  REQUIRE(e != nullptr);
  CHECK(e->info().bitmaps == std::vector<std::string>{"b0", "b1", "b2"});
  auto sel = protocol::match_meta_contexts(e->info(), {"qemu:dirty-bitmap:b2", "base:allocation"}, false);
  auto r = e->resolve_contexts(sel);
  REQUIRE(r.has_value());
  REQUIRE(r->size() == 2);
  CHECK((*r)[0].kind == protocol::ContextKind::base_allocation);
  CHECK((*r)[1].kind == protocol::ContextKind::dirty_bitmap);
  CHECK((*r)[1].bitmap_handle == 102);
  CHECK((*r)[1].name == "qemu:dirty-bitmap:b2");
  protocol::MetaContext bad{protocol::ContextKind::dirty_bitmap, 99, 7, "qemu:dirty-bitmap:b7"};
  CHECK_FALSE(e->resolve_contexts({bad}).has_value());
}

TEST_CASE("export registry: remove publishes a new list; a snapshot taken before keeps its exports") {
  Image img;
  server::ExportRegistry reg;
  REQUIRE(reg.add(spec_with_bitmaps(img.path, "a", 0)).has_value());
  REQUIRE(reg.add(spec_with_bitmaps(img.path, "a@c1", 0)).has_value());
  auto before = reg.infos();
  const protocol::StaticCatalog live({});
  server::SnapshotCatalog cat(before, live);
  auto gone = reg.remove("a@c1");
  REQUIRE(gone != nullptr);
  CHECK(gone->name() == "a@c1");
  CHECK(reg.remove("a@c1") == nullptr);
  CHECK(reg.find("a@c1") == nullptr);
  CHECK(reg.infos()->size() == 1);
  REQUIRE(cat.find("a@c1") != nullptr);  // the handshake that began before still sees it
  CHECK(cat.exports().size() == 2);
  REQUIRE(reg.add(spec_with_bitmaps(img.path, "a@c1", 0)).has_value());  // the name is free again
  CHECK(reg.infos()->size() == 2);
}
