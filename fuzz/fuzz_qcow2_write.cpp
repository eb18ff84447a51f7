// Fuzz entry: open a fuzzed qcow2 image writable over an in-memory file and
// run fuzzed writes, zeroes (with and without unmap / fast-only), trims,
// flushes and reads through the Qcow2Image API (allocation, COW from the
// backing file and snapshots, subclusters, compressed clusters being
// overwritten). Input layout: fuzz_image.hpp; each op is 9 bytes.
//
// Properties checked (each can fail):
// - a range past the end of the device is refused;
// - while the image is not marked corrupt, every byte written by a
//   successful write (or zeroed by a successful write_zeroes) reads back as
//   written, after any later ops, and again after close() and a fresh
//   read-only open of the resulting file;
// - issue 8 item 2, always on: no guest data lands in a metadata cluster.
//   Two oracles: the engine's own map (every guest data write the engine
//   issues, seen through set_guest_write_observer, must miss every cluster
//   metadata_map() holds at that moment) and one independent of the engine
//   (the host writes carrying guest data must miss every metadata cluster
//   the image's header, L1 table and refcount table named before the first
//   op: header cluster, L1 table, the L2 tables it points at, refcount
//   table and blocks, snapshot table).
//
// Work per input is capped (32 ops, 256 KiB each, 1 MiB written in all, a
// 2 MiB window of guest offsets) and the image lives in a SparseFile, so a
// run takes microseconds to milliseconds whatever the image declares.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <map>
#include <string.h>  // memmem
#include <vector>

#include "common/endian.hpp"
#include "fuzz_image.hpp"
#include "image/qcow2/check.hpp"

using namespace qnbd;
using namespace qnbd::image;
using qnbd::fuzz::Reader;

namespace {

constexpr std::uint64_t kWindow = 2u << 20;  // guest bytes tracked (and written)
constexpr std::uint64_t kMaxOp = 256u << 10;
constexpr std::uint64_t kWriteBudget = 1u << 20;  // guest bytes written per input
constexpr std::uint32_t kMaxOps = 32;             // ops per input, numbered from 1
// Guest data is this marker every 16 bytes, then the op number and the
// guest position, so guest data is recognisable in any host write.
constexpr std::array<std::uint8_t, 8> kMarker{0xe7, 'Q', 'N', 'B', 'D', 'F', 'Z', 0x9c};

// Guest bytes of op `op` at guest offset `pos`: each 16-byte block is the
// marker, then (op << 32 | block index) little endian; written a block at
// a time (a per-byte loop was a sixth of a run under the fuzzer's
// instrumentation).
void fill_guest(std::span<std::byte> buf, std::uint32_t op, std::uint64_t pos) {
  std::size_t done = 0;
  while (done < buf.size()) {
    const std::uint64_t p = pos + done;
    std::array<std::byte, 16> block;
    std::memcpy(block.data(), kMarker.data(), 8);
    const std::uint64_t v = (std::uint64_t{op} << 32) | ((p / 16) & 0xffffffffu);
    for (unsigned i = 0; i < 8; ++i) block[8 + i] = static_cast<std::byte>(v >> (8 * i));
    const std::size_t in = p % 16, n = std::min<std::size_t>(16 - in, buf.size() - done);
    std::memcpy(buf.data() + done, block.data() + in, n);
    done += n;
  }
}

bool has_marker(std::span<const std::byte> b) {
  // memmem, not an instrumented loop: metadata writes of 2 MiB tables pass
  // here too.
  return memmem(b.data(), b.size(), kMarker.data(), kMarker.size()) != nullptr;
}

// The marker blocks (marker and the 8 bytes after it, fewer at the end of
// the input) that the fuzz input itself carries: libFuzzer learns the
// constant and plants it in image bytes.
using Planted = std::vector<std::vector<std::byte>>;
Planted planted_markers(const std::uint8_t* data, std::size_t size) {
  Planted out;
  const std::uint8_t* p = data;
  const std::uint8_t* end = data + size;
  while (const void* hit = memmem(p, static_cast<std::size_t>(end - p), kMarker.data(), kMarker.size())) {
    const auto* h = static_cast<const std::uint8_t*>(hit);
    const std::size_t n = std::min<std::size_t>(16, static_cast<std::size_t>(end - h));
    out.emplace_back(reinterpret_cast<const std::byte*>(h), reinterpret_cast<const std::byte*>(h) + n);
    p = h + 1;
  }
  return out;
}

// Whether writing `b` puts guest data where the file had none: a marker
// block that was not at that place in the file and is not one the input
// planted. Writing back a refcount block or L2 table that carried a planted
// marker is no guest write, nor is rewriting the header cluster, which
// moves the unknown header extensions (and a marker inside one) behind the
// known ones, as QEMU's qcow2_update_header does too
// (corpus/qcow2_write/oracle-planted-marker-in-moved-header-extension).
bool adds_marker(std::span<const std::byte> b, std::span<const std::byte> old, const Planted& planted) {
  const std::byte* p = b.data();
  const std::byte* end = b.data() + b.size();
  while (const void* hit = memmem(p, static_cast<std::size_t>(end - p), kMarker.data(), kMarker.size())) {
    const std::size_t i = static_cast<std::size_t>(static_cast<const std::byte*>(hit) - b.data());
    p = static_cast<const std::byte*>(hit) + 1;
    if (i + kMarker.size() <= old.size() && std::memcmp(old.data() + i, kMarker.data(), kMarker.size()) == 0) continue;
    // fill_guest's blocks carry the op number (1 to 32) in their last four
    // bytes; a planted marker whose payload came out otherwise (a record of
    // the input ended inside it) is no guest block.
    if (i + 16 <= b.size()) {
      std::uint32_t op = 0;
      for (unsigned k = 0; k < 4; ++k) op |= std::uint32_t(std::to_integer<std::uint8_t>(b[i + 12 + k])) << (8 * k);
      if (op == 0 || op > kMaxOps) continue;
    }
    const bool was_planted = std::any_of(planted.begin(), planted.end(), [&](const std::vector<std::byte>& m) {
      return i + m.size() <= b.size() && std::memcmp(b.data() + i, m.data(), m.size()) == 0;
    });
    if (!was_planted) return true;
  }
  return false;
}

struct HostWrite {
  std::uint64_t offset, length;
};

// The independent oracle of item 2: the metadata clusters the file names
// once open() is done (it may have rebuilt the refcounts of a dirty
// image), read straight from the file (qcow2.txt "Header", "Cluster
// mapping", "Refcounts", "Snapshots"), without trusting the refcounts or
// the engine. Bounded: at most 4096 L1 and refcount-table entries.
std::vector<std::pair<std::uint64_t, std::uint64_t>> layout_metadata(fuzz::SparseFile& f) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> meta;
  std::byte h[72]{};
  (void)f.pread(h, 0);
  const std::uint32_t cluster_bits = load_be32(h + 20);
  if (cluster_bits < 9 || cluster_bits > 21) return meta;  // open() refuses those
  const std::uint64_t cs = std::uint64_t{1} << cluster_bits;
  const std::uint32_t l1_size = load_be32(h + 36);
  const std::uint64_t l1_table_offset = load_be64(h + 40);
  const std::uint64_t refcount_table_offset = load_be64(h + 48);
  const std::uint32_t refcount_table_clusters = load_be32(h + 56);
  const std::uint32_t nb_snapshots = load_be32(h + 60);
  const std::uint64_t snapshots_offset = load_be64(h + 64);
  auto be64 = [&](std::uint64_t off) -> std::uint64_t {
    std::byte b[8]{};
    (void)f.pread(b, off);
    return load_be64(b);
  };
  meta.emplace_back(0, cs);
  meta.emplace_back(l1_table_offset, std::uint64_t{l1_size} * 8);
  meta.emplace_back(refcount_table_offset, std::uint64_t{refcount_table_clusters} * cs);
  if (nb_snapshots) meta.emplace_back(snapshots_offset, cs);
  constexpr std::uint64_t kOffsetMask = 0x00fffffffffffe00ull;
  for (std::uint32_t i = 0; i < l1_size && i < 4096; ++i)
    if (std::uint64_t l2 = be64(l1_table_offset + 8ull * i) & kOffsetMask) meta.emplace_back(l2, cs);
  for (std::uint64_t i = 0; i < std::uint64_t{refcount_table_clusters} * cs / 8 && i < 4096; ++i)
    if (std::uint64_t rb = be64(refcount_table_offset + 8 * i) & ~(cs - 1) & kOffsetMask) meta.emplace_back(rb, cs);
  return meta;
}

void check_layout_untouched(const std::vector<std::pair<std::uint64_t, std::uint64_t>>& meta,
                            const std::vector<HostWrite>& writes) {
  for (const auto& w : writes)
    for (const auto& [off, len] : meta)
      if (len && w.offset < off + len && off < w.offset + w.length) {
        std::fprintf(stderr, "guest data at host %#llx+%#llx, metadata at %#llx+%#llx\n", (unsigned long long)w.offset,
                     (unsigned long long)w.length, (unsigned long long)off, (unsigned long long)len);
        qnbd::fuzz::fail("guest data written over a metadata cluster the image named at open");
      }
}

// What the guest must read back: bytes of `data` inside the `known`
// intervals (start -> end, disjoint, not adjacent-merged necessarily).
struct Shadow {
  std::vector<std::byte>& data;
  std::map<std::uint64_t, std::uint64_t> known;
  explicit Shadow(std::uint64_t n) : data(storage()) {
    // Reused between runs: only known bytes are ever compared.
    if (data.size() < n) data.resize(n);
  }
  static std::vector<std::byte>& storage() {
    static std::vector<std::byte> s;
    return s;
  }
  void forget(std::uint64_t off, std::uint64_t n) {
    const std::uint64_t end = off + n;
    auto it = known.lower_bound(off);
    if (it != known.begin()) {
      auto p = std::prev(it);
      if (p->second > off) {
        const std::uint64_t pend = p->second;
        p->second = off;
        if (pend > end) known.emplace(end, pend);
      }
    }
    it = known.lower_bound(off);
    while (it != known.end() && it->first < end) {
      const std::uint64_t iend = it->second;
      it = known.erase(it);
      if (iend > end) {
        known.emplace(end, iend);
        break;
      }
    }
  }
  void set(std::uint64_t off, std::span<const std::byte> b) {
    forget(off, b.size());
    std::copy(b.begin(), b.end(), data.begin() + static_cast<std::ptrdiff_t>(off));
    if (!b.empty()) known.emplace(off, off + b.size());
  }
  void zero(std::uint64_t off, std::uint64_t n) {
    forget(off, n);
    std::fill_n(data.begin() + static_cast<std::ptrdiff_t>(off), n, std::byte{0});
    if (n) known.emplace(off, off + n);
  }
};

// Whether the fuzzed image was already inconsistent before any op: a data
// cluster an L2 entry uses while its refcount says free (or shared) is free
// to the allocator, in QEMU's qcow2 driver as here, so a later allocation
// may land on another guest cluster's data (`qemu-img check` calls such an
// image corrupt: "ERROR cluster N refcount=0 reference=1"). Read-after-write
// is only a property of images whose refcounts are consistent; asked only
// after a mismatch, so the check's cost is paid rarely.
bool refcounts_inconsistent(const fuzz::SparseFile& image) {
  const qcow2::CheckMessageSink quiet = [](const std::string&) {};
  fuzz::SparseFile pristine(image, "<fuzz.qcow2>");
  auto r = qcow2::check_qcow2(pristine, qcow2::RepairMode::none, quiet);
  return !r || r->corruptions != 0 || r->check_errors != 0;
}

// Every known byte of [off, off + len) reads back as the shadow says.
void verify(BlockDevice& dev, const Shadow& s, std::uint64_t off, std::uint64_t len, const fuzz::SparseFile& image) {
  static std::vector<std::byte> b;
  const std::uint64_t end = off + len;
  auto it = s.known.upper_bound(off);
  if (it != s.known.begin()) --it;
  for (; it != s.known.end() && it->first < end; ++it) {
    const std::uint64_t a = std::max(it->first, off), z = std::min(it->second, end);
    if (a >= z) continue;
    b.resize(z - a);
    if (!dev.read(b, a)) continue;
    if (std::memcmp(b.data(), s.data.data() + a, b.size()) != 0 && !refcounts_inconsistent(image))
      qnbd::fuzz::fail("read after write returned other data");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::ImageInput in;
  fuzz::decode_image_input(data, size, in);
  // The same backing and data-file setup as fuzz_image.hpp, but keeping the
  // files so the result can be opened again.
  // Bit 7 of the first op byte (unused by the ops) picks --discard=unmap,
  // so freed clusters are also discarded in the image file; seeds (no ops)
  // get it.
  const bool discard_unmap = in.ops.empty() || (in.ops[0] & 0x80);
  auto open = [&in, discard_unmap](std::unique_ptr<File> file, std::unique_ptr<File> data_file, bool writable) {
    qcow2::Qcow2Image::Parts parts;
    parts.file = std::move(file);
    parts.path = "fuzz.qcow2";
    parts.data_file = std::move(data_file);
    parts.open_backing = fuzz::fuzz_backing_opener(in.image, 0);
    OpenOptions o;
    o.format = ImageFormat::qcow2;
    o.read_only = !writable;
    o.discard_unmap = discard_unmap;
    return qcow2::Qcow2Image::open(std::move(parts), o);
  };
  std::vector<HostWrite> guest_writes;
  const Planted planted = planted_markers(data, size);
  auto file_owned = std::make_unique<fuzz::SparseFile>(in.image, "<fuzz.qcow2>");
  fuzz::SparseFile* file = file_owned.get();
  file->on_write = [&guest_writes, &planted, file](std::span<const std::byte> b, std::uint64_t o) {
    if (!has_marker(b)) return;
    static std::vector<std::byte> old;
    old.assign(b.size(), std::byte{0});
    (void)file->pread(old, o);
    if (adds_marker(b, old, planted)) guest_writes.push_back({o, b.size()});
  };
  std::unique_ptr<fuzz::SparseFile> data_owned;
  if (fuzz::wants_data_file(in.image)) data_owned = std::make_unique<fuzz::SparseFile>(in.image, "<data file>");
  fuzz::SparseFile* data_file = data_owned.get();
  auto opened = open(std::move(file_owned), std::move(data_owned), true);
  if (!opened) return 0;
  auto& img = **opened;
  const auto layout = layout_metadata(*file);
  // The engine's oracle: called for every guest data write to the image
  // file after its overlap check passed; the cluster must hold no metadata.
  img.set_guest_write_observer([&img](std::uint64_t host, std::uint64_t bytes) {
    QNBD_FUZZ_CHECK(img.metadata_map() != nullptr);
    if (img.metadata_map()->find(host, bytes))
      qnbd::fuzz::fail("guest data write on a metadata cluster (metadata_map)");
  });
  // The engine discards only clusters it freed (pass-discard-request):
  // never one that holds metadata now, nor one the image named at open.
  file->on_discard = [&img, &guest_writes](std::uint64_t offset, std::uint64_t length) {
    QNBD_FUZZ_CHECK(img.metadata_map() != nullptr);
    if (img.metadata_map()->find(offset, length)) qnbd::fuzz::fail("discard of a metadata cluster (metadata_map)");
    guest_writes.push_back({offset, length});
  };
  const std::uint64_t dev = img.size();
  const std::uint64_t w = std::min(dev, kWindow);
  Shadow shadow(w);

  Reader ops(in.ops.empty() ? std::span<const std::uint8_t>() : in.ops);
  // Seeds carry no ops: a fixed mix so a replay exercises every path.
  static const std::uint8_t kDefault[] = {
      0x00, 0,    0,    0, 0, 0x10, 0,    0, 0,     // write 8 KiB at 0
      0x01, 0x03, 0x11, 0, 0, 0,    0x90, 0, 0, 0,  // write unaligned
      0x02, 0,    0x80, 0, 0, 0,    0x80, 0, 0, 0,  // zeroes 64 KiB at 64 KiB
      0x03, 0,    0x00, 1, 0, 0,    0x80, 0, 0, 0,  // trim at 128 KiB
      0x04, 0,    0,    0, 0, 0,    0,    0, 0, 0,  // flush
      0x05, 0,    0,    0, 0, 0,    0,    2, 0, 0,  // read back
  };
  if (in.ops.empty()) ops = Reader(kDefault);
  static std::vector<std::byte> buf;
  std::uint64_t write_budget = kWriteBudget;
  for (std::uint32_t n = 1; n <= kMaxOps && !ops.empty(); ++n) {
    const std::uint8_t op = ops.u8();
    auto g = fuzz::pick_range(ops, dev, w, kMaxOp);
    if ((op % 8 == 0 || op % 8 == 1) && g.inside) {
      g.length = std::min(g.length, write_budget);
      write_budget -= g.length;
    }
    const bool in_window = g.inside && g.offset + g.length <= w;
    guest_writes.clear();
    bool ok = false;
    switch (op % 8) {
      case 0:
      case 1: {
        buf.resize(g.length);
        fill_guest(buf, n, g.offset);
        auto r = img.write(buf, g.offset, op & 0x40);
        ok = bool(r);
        if (in_window) ok ? shadow.set(g.offset, buf) : shadow.forget(g.offset, g.length);
        break;
      }
      case 2:
      case 6: {
        ZeroFlags f;
        f.may_unmap = op & 0x10;
        f.fast_only = op & 0x20;
        f.fua = op & 0x40;
        f.skip_empty_spans = op & 0x08;
        auto r = img.write_zeroes(g.offset, g.length, f);
        ok = bool(r);
        if (in_window) ok ? shadow.zero(g.offset, g.length) : shadow.forget(g.offset, g.length);
        break;
      }
      case 3: {
        DiscardFlags f;
        f.fua = op & 0x40;
        f.skip_empty_spans = op & 0x08;
        auto r = img.discard(g.offset, g.length, f);
        ok = bool(r);
        if (in_window) shadow.forget(g.offset, g.length);
        break;
      }
      case 4:
        (void)img.flush();
        ok = true;
        break;
      case 5:
      case 7: {
        if (in_window && !img.header().corrupt()) verify(img, shadow, g.offset, g.length, in.image);
        std::array<Extent, 16> ext;
        (void)img.block_status(g.offset, g.length, ext);
        ok = true;
        break;
      }
    }
    if (!g.inside && op % 8 != 4 && op % 8 != 5 && op % 8 != 7) QNBD_FUZZ_CHECK(!ok);
    check_layout_untouched(layout, guest_writes);
  }
  if (img.header().corrupt()) return 0;
  verify(img, shadow, 0, w, in.image);
  guest_writes.clear();
  if (!img.close()) return 0;
  check_layout_untouched(layout, guest_writes);
  if (img.header().corrupt()) return 0;
  // The file as left on "disk" must read back the same with a fresh open.
  auto after = open(std::make_unique<fuzz::SparseFile>(*file, "<fuzz.qcow2>"),
                    data_file ? std::make_unique<fuzz::SparseFile>(*data_file, "<data file>") : nullptr, false);
  if (!after) return 0;
  if ((**after).header().corrupt()) return 0;
  verify(**after, shadow, 0, w, in.image);
  return 0;
}
