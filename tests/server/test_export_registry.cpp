// The export registry: one Export per export, the explicit bitmap cap, and
// the one lookup from a selected metadata context to a bitmap handle.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

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

namespace {

std::vector<std::string> names(const protocol::ExportList& l) {
  std::vector<std::string> out;
  for (const auto& e : l) out.push_back(e.name);
  return out;
}

}  // namespace

TEST_CASE("export registry: the handshake's snapshot does not change under it; removal drops the device") {
  Image a, b, c;
  server::ExportRegistry reg;
  REQUIRE(reg.add(spec_with_bitmaps(a.path, "a", 0)).has_value());
  auto before = reg.infos();
  auto bspec = spec_with_bitmaps(b.path, "b", 1);
  std::weak_ptr<image::BlockDevice> bdev = bspec.device;
  REQUIRE(reg.add(std::move(bspec)).has_value());
  CHECK(names(*before) == std::vector<std::string>{"a"});  // a snapshot taken before stays as it was
  CHECK(names(*reg.infos()) == std::vector<std::string>{"a", "b"});
  auto during = reg.infos();
  REQUIRE(reg.remove("b", false).has_value());
  CHECK(names(*during) == std::vector<std::string>{"a", "b"});
  CHECK(names(*reg.infos()) == std::vector<std::string>{"a"});
  CHECK(reg.find("b") == nullptr);
  // remove() returned: the device was closed and is gone (its file closed,
  // its image lock released).
  CHECK(bdev.expired());
  auto missing = reg.remove("b", false);
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code == ENOENT);
  // Re-added under the same name: a new instance.
  const auto old_instance = (*during)[1].instance;
  REQUIRE(reg.add(spec_with_bitmaps(b.path, "b", 0)).has_value());
  CHECK(reg.find("b")->info().instance != old_instance);
  auto dup = reg.add(spec_with_bitmaps(c.path, "b", 0));
  REQUIRE_FALSE(dup.has_value());
  CHECK(dup.error().code == EEXIST);
}

TEST_CASE("export registry: a connection attaches only to the instance it negotiated") {
  Image a;
  server::ExportRegistry reg;
  REQUIRE(reg.add(spec_with_bitmaps(a.path, "e", 1)).has_value());
  const protocol::ExportInfo negotiated = reg.infos()->at(0);
  REQUIRE(reg.remove("e", false).has_value());
  // Removed during the handshake: nothing to attach to.
  CHECK(reg.attach(negotiated, 1, {}) == nullptr);
  REQUIRE(reg.add(spec_with_bitmaps(a.path, "e", 2)).has_value());
  // Same name, another export (other bitmaps): still refused.
  CHECK(reg.attach(negotiated, 1, {}) == nullptr);
  auto fresh = reg.attach(reg.infos()->at(0), 2, {});
  REQUIRE(fresh != nullptr);
  CHECK(fresh->info().bitmaps.size() == 2);
  CHECK(reg.list().at(0).connections == 1);
  const server::Export* raw = fresh.get();
  fresh.reset();
  reg.detach(raw, 2);
  CHECK(reg.list().at(0).connections == 0);
}

TEST_CASE("export registry: remove refuses while connections are attached; force stops them, then closes") {
  Image a;
  server::ExportRegistry reg;
  auto spec = spec_with_bitmaps(a.path, "a", 0);
  std::weak_ptr<image::BlockDevice> dev = spec.device;
  REQUIRE(reg.add(std::move(spec)).has_value());
  const protocol::ExportInfo info = reg.infos()->at(0);
  std::shared_ptr<const server::Export> conn1, conn2;
  std::vector<std::string> calls;
  std::vector<std::thread> enders;
  // conn 1 ends when stopped (on another thread, as a session's executor
  // would); conn 2 ignores stop and ends only when aborted.
  server::ConnectionHooks h1, h2;
  auto end = [&](std::shared_ptr<const server::Export>& c, std::uint64_t id) {
    enders.emplace_back([&reg, p = std::move(c), id]() mutable {
      const server::Export* raw = p.get();
      p.reset();
      reg.detach(raw, id);
    });
  };
  h1.stop = [&] {
    calls.push_back("stop1");
    end(conn1, 1);
  };
  h1.abort = [] {};  // called too if conn 1 has not ended within the grace: not checked
  h2.stop = [&] { calls.push_back("stop2"); };
  h2.abort = [&] {
    calls.push_back("abort2");
    end(conn2, 2);
  };
  conn1 = reg.attach(info, 1, h1);
  conn2 = reg.attach(info, 2, h2);
  REQUIRE(conn1 != nullptr);
  REQUIRE(conn2 != nullptr);

  auto busy = reg.remove("a", false);
  REQUIRE_FALSE(busy.has_value());
  CHECK(busy.error().code == EBUSY);
  CHECK(reg.find("a") != nullptr);  // refused: nothing changed
  CHECK(calls.empty());
  CHECK_FALSE(dev.expired());

  server::RemoveTimes t;
  t.grace = std::chrono::milliseconds(50);  // conn 2 never ends on stop: it is aborted after this
  REQUIRE(reg.remove("a", true, t).has_value());
  for (auto& th : enders) th.join();
  std::sort(calls.begin(), calls.end());
  CHECK(calls == std::vector<std::string>{"abort2", "stop1", "stop2"});
  CHECK(reg.find("a") == nullptr);
  CHECK(reg.infos()->empty());
  // Both connections had dropped the export before remove() returned, so
  // the device is gone with it.
  CHECK(dev.expired());
  CHECK(reg.close_all().empty());  // nothing left to close
}
