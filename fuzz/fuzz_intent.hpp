// The crash states the intent target (fuzz_intent.cpp) starts from, made by
// the real code: a qcow2 image with persistent bitmaps, opened writable with
// a write-intent record (docs/crash-safe-bitmaps.md), written to, and copied
// while still open (what a power loss leaves: the autoclear bit set, the
// tracked bitmaps in_use, the record marking the written chunks). The seeds
// in fuzz/corpus/intent come from the same templates: run either intent
// binary once with QNBD_FUZZ_INTENT_SEEDS=DIR.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "image/io/forwarding_file.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/qcow2_image.hpp"

namespace qnbd::fuzz {

struct IntentTemplate {
  std::vector<std::byte> image;   // the image as the crash left it
  std::vector<std::byte> record;  // IMAGE.qnbd-intent as the crash left it
};

struct IntentShape {
  std::uint64_t size;
  std::uint64_t cluster_size;
  std::uint64_t chunk_size;
  unsigned bitmaps;   // added enabled
  bool disable_last;  // the last one disabled (not tracked by the record)
  std::vector<std::pair<std::uint64_t, std::uint64_t>> writes;
};

// Empty image/record if the real code failed (the reason on stderr).
inline IntentTemplate make_intent_template(const IntentShape& s) {
  auto failed = [](const char* step, const Error& e) {
    std::fprintf(stderr, "intent template: %s: %s\n", step, e.message.c_str());
    return IntentTemplate{};
  };
  using namespace image;
  IntentTemplate t;
  MemFile file("t.qcow2");
  qcow2::CreateOptions o;
  o.size = s.size;
  o.cluster_size = s.cluster_size;
  if (auto c = qcow2::create_qcow2(file, o); !c) return failed("create", c.error());
  for (unsigned i = 0; i < s.bitmaps; ++i) {
    qcow2::BitmapEdit e;
    e.bitmap = std::string("b").append(std::to_string(i));  // not "b" + ...: GCC 105329 (-Wrestrict at -O3)
    e.ops.push_back({qcow2::BitmapOp::Kind::add, ""});
    if (s.disable_last && i + 1 == s.bitmaps) e.ops.push_back({qcow2::BitmapOp::Kind::disable, ""});
    if (auto r = qcow2::edit_bitmaps(file, e); !r) return failed("bitmap add", r.error());
  }
  MemFile rec("t.qcow2.qnbd-intent");
  qcow2::Qcow2Image::Parts parts;
  parts.file = std::make_unique<image::ForwardingFile>(file);
  parts.path = "t.qcow2";
  parts.intent.name = "t.qcow2.qnbd-intent";
  parts.intent.chunk_size = s.chunk_size;
  parts.intent.open = [&rec](bool) -> Result<std::unique_ptr<File>> {
    return std::unique_ptr<File>(std::make_unique<image::ForwardingFile>(rec));
  };
  OpenOptions oo;
  oo.format = ImageFormat::qcow2;
  oo.read_only = false;
  auto img = qcow2::Qcow2Image::open(std::move(parts), oo);
  if (!img) return failed("open", img.error());
  for (auto [off, len] : s.writes) {
    std::vector<std::byte> b(len, std::byte{0x5a});
    if (auto w = (*img)->write(b, off, false); !w) return failed("write", w.error());
  }
  // The power goes here: the device is still open.
  t.image = file.contents();
  t.record = rec.contents();
  (void)(*img)->close();
  return t;
}

inline const std::vector<IntentShape>& intent_shapes() {
  static const std::vector<IntentShape> shapes{
      {8u << 20, 65536, 65536, 1, false, {{0, 4096}, {3u << 20, 200000}}},
      {(4u << 20) + 512, 4096, 131072, 3, true, {{1u << 20, 512}, {(4u << 20) - 100, 612}}},
      {64u << 20, 65536, 1u << 20, 2, false, {{5u << 20, 256u << 10}, {40u << 20, 4096}}},
  };
  return shapes;
}

}  // namespace qnbd::fuzz
