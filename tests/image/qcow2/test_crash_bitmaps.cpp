// Crash safety of enabled persistent bitmaps (docs/crash-safe-bitmaps.md):
// seeded guest workloads on a qcow2 image with 1 or 2 enabled bitmaps are
// cut by a simulated power loss that hits the image and its write-intent
// record together (mid-stream, inside arming or any engine step, or between
// requests with unsynced writes dropped, kept or torn per 512-byte sector).
// The next writable open must recover: every bitmap stored consistent
// (not in_use), `qemu-img check` without corruption, every granule whose
// guest content differs from the last consistent store dirty, and every
// dirty granule either dirty at that store or inside a recovery chunk that
// a request touched (the documented over-report bound).
//
// The checkpoint case adds live checkpoints to the workload, so the cut
// also lands inside the record handover of a live edit (the next record's
// creation, filling, marking, rename and folder syncs); each checkpoint's
// bitmap is then judged as a backup tool uses it. Cut with the handover
// taken out (no next record: the behaviour before it existed), that case
// fails at the first crash after a checkpoint: b0 left in_use.
//
// The mutation cases turn off the record's sync (or the marking, or the
// next record's filling) with the test hooks of IntentRecord and require
// the same check to find under-reported granules: the check can fail.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <random>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "image/checkpoint.hpp"
#include "image/io/crash_file.hpp"
#include "image/io/forwarding_file.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/bitmap.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/bitmap_store.hpp"
#include "image/qcow2/check.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/format.hpp"
#include "image/qcow2/header.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image/raw/raw_device.hpp"
#include "image_test_support.hpp"
#include "test_write_random_support.hpp"

using namespace qnbd;
using namespace qnbd::test;
namespace q = qnbd::image::qcow2;

namespace {

constexpr std::uint64_t kSize = 4 << 20;
constexpr std::uint64_t kChunk = 256 << 10;  // small, so the bound is tested

struct Config {
  const char* name;
  std::uint64_t cluster_size;
  std::vector<std::uint64_t> granularities;  // one enabled bitmap each
  bool backing;
};

std::vector<Config> configs() {
  return {
      {"c4k-g64k", 4096, {65536}, false},
      {"c64k-g2m", 65536, {2 << 20}, false},
      {"c64k-g64k+g2m", 65536, {65536, 2 << 20}, false},
      {"c4k-g64k+g2m-backing", 4096, {65536, 2 << 20}, true},
      {"c64k-g64k-backing", 65536, {65536}, true},
      {"c4k-g2m-backing", 4096, {2 << 20}, true},
  };
}

// Power loss over the image and its record files at once: every mutating
// call of any file counts, and so does every name operation (create,
// rename, unlink) and every folder sync that makes them durable. At the
// armed count everything is frozen with one crash image per file taken at
// that moment; name operations not yet synced survive as a prefix (the
// folder is a journal: ext4 and xfs keep its operations in order) chosen
// by the seed. Every later mutating call, sync or name operation fails
// with EIO.
struct Group {
  // The two names a record can have (bitmap_intent.hpp: IntentAccess) and
  // which record file each one holds.
  enum Slot { kRecord = 0, kNext = 1 };
  using Names = std::array<std::optional<std::size_t>, 2>;
  struct NameOp {
    enum class Kind { create, rename_next, unlink } kind;
    Slot slot = kRecord;
    std::size_t file = 0;
  };

  image::CrashFile img{"crash.qcow2"};
  std::vector<std::unique_ptr<image::CrashFile>> records;  // every record file made
  Names names;                                             // as the process sees them
  Names durable_names;                                     // as of the last folder sync
  std::vector<NameOp> pending;                             // since then, in order
  std::uint64_t calls = 0;
  std::optional<std::uint64_t> limit;
  std::uint64_t seed = 0;
  bool frozen = false;
  unsigned renames = 0;
  std::vector<std::byte> img_after;
  std::vector<std::vector<std::byte>> records_after;
  Names names_after;
  explicit Group(std::vector<std::byte> bytes) : img("crash.qcow2", std::move(bytes)) {}

  static void apply(Names& n, const NameOp& op) {
    switch (op.kind) {
      case NameOp::Kind::create: n[op.slot] = op.file; break;
      case NameOp::Kind::rename_next:
        n[kRecord] = n[kNext];
        n[kNext].reset();
        break;
      case NameOp::Kind::unlink: n[op.slot].reset(); break;
    }
  }
  void freeze() {
    if (frozen) return;
    img_after = img.crash(seed ^ 0x9e3779b9);
    for (std::size_t i = 0; i < records.size(); ++i)
      records_after.push_back(records[i]->crash(seed ^ (0x7f4a7c15 + i)));
    names_after = durable_names;
    const std::size_t kept = pending.empty() ? 0 : static_cast<std::size_t>((seed >> 7) % (pending.size() + 1));
    for (std::size_t i = 0; i < kept; ++i) apply(names_after, pending[i]);
    frozen = true;
  }
  Result<void> mutation() {
    if (frozen) return make_error(EIO, "power lost");
    if (limit && calls++ == *limit) {
      freeze();
      return make_error(EIO, "power lost");
    }
    return ok();
  }
  Result<void> name_op(NameOp op) {
    QNBD_TRY(mutation());
    apply(names, op);
    pending.push_back(op);
    // The real IntentAccess syncs the folder after each name operation.
    QNBD_TRY(mutation());
    durable_names = names;
    pending.clear();
    return ok();
  }
};

class GroupFile final : public image::File {
 public:
  GroupFile(Group& g, image::CrashFile& f) : g_(g), f_(f) {}
  Result<std::size_t> pread(std::span<std::byte> b, std::uint64_t o) override { return f_.pread(b, o); }
  Result<void> pwrite(std::span<const std::byte> b, std::uint64_t o) override {
    QNBD_TRY(g_.mutation());
    return f_.pwrite(b, o);
  }
  Result<void> flush() override {
    // The power can fail while a sync runs, before it takes effect: the
    // writes since the last sync are then as unsynced as ever (a header
    // switch written whole, then synced, can land torn).
    QNBD_TRY(g_.mutation());
    return f_.flush();
  }
  Result<void> truncate(std::uint64_t s) override {
    QNBD_TRY(g_.mutation());
    return f_.truncate(s);
  }
  Result<std::uint64_t> size() override { return f_.size(); }
  Result<void> write_zeroes(std::uint64_t o, std::uint64_t l, bool u) override {
    QNBD_TRY(g_.mutation());
    return f_.write_zeroes(o, l, u);
  }
  Result<void> discard(std::uint64_t o, std::uint64_t l) override {
    QNBD_TRY(g_.mutation());
    return f_.discard(o, l);
  }
  const std::string& name() const override { return f_.name(); }

 private:
  Group& g_;
  image::CrashFile& f_;
};

struct Fixture {
  Config cfg;
  std::vector<std::byte> base;       // the image with its bitmaps stored consistent
  std::vector<std::byte> base_view;  // its guest view
  std::vector<std::byte> backing;    // raw backing file contents (if any)
  std::vector<image::DirtyBitmap> base_bits;
};

q::BackingOpener backing_opener(const Fixture& f) {
  return [&f](const std::string&, const std::string&) -> Result<std::unique_ptr<image::BlockDevice>> {
    image::OpenOptions o;
    auto r = image::RawDevice::open(std::make_unique<image::MemFile>("base.raw", f.backing), o);
    if (!r) return r.error();
    return std::unique_ptr<image::BlockDevice>(std::move(*r));
  };
}

Result<std::unique_ptr<q::Qcow2Image>> open_mem(const Fixture& f, std::unique_ptr<image::File> file, bool rw,
                                                q::IntentAccess intent = {}) {
  q::Qcow2Image::Parts parts;
  parts.file = std::move(file);
  parts.path = "img.qcow2";
  if (f.cfg.backing) parts.open_backing = backing_opener(f);
  parts.intent = std::move(intent);
  image::OpenOptions o;
  o.read_only = !rw;
  return q::Qcow2Image::open(std::move(parts), o);
}

std::vector<std::byte> guest_view(const Fixture& f, const std::vector<std::byte>& bytes) {
  auto img = open_mem(f, std::make_unique<image::MemFile>("v.qcow2", bytes), false);
  REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
  std::vector<std::byte> out(kSize);
  auto r = (*img)->read(out, 0);
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  return out;
}

// The bitmaps of `bytes`, in directory order.
std::vector<std::pair<image::BitmapInfo, image::DirtyBitmap>> stored_bitmaps(const std::vector<std::byte>& bytes) {
  image::MemFile mf("s.qcow2", bytes);
  auto h = q::parse_header(std::span(bytes).first(std::min<std::size_t>(bytes.size(), 2 << 20)), bytes.size());
  REQUIRE_MESSAGE(h, (h ? "" : h.error().message));
  auto dir = q::read_bitmap_directory(mf, *h, bytes.size());
  REQUIRE_MESSAGE(dir, (dir ? "" : dir.error().message));
  std::vector<std::pair<image::BitmapInfo, image::DirtyBitmap>> out;
  for (const auto& b : *dir) {
    auto bits = q::load_bitmap_data(mf, h->cluster_size(), h->size, b, bytes.size());
    REQUIRE_MESSAGE(bits, (bits ? "" : bits.error().message));
    out.emplace_back(b, std::move(*bits));
  }
  return out;
}

Fixture make_fixture(const Config& cfg, const TempDir& dir) {
  Fixture f;
  f.cfg = cfg;
  if (cfg.backing) {
    f.backing.resize(kSize);
    for (std::uint64_t i = 0; i < kSize; ++i) f.backing[i] = std::byte(static_cast<std::uint8_t>(0x40 + i / 4096));
    write_whole(dir / "base.raw", f.backing);
  }
  image::MemFile file("fresh.qcow2");
  q::CreateOptions o;
  o.size = kSize;
  o.cluster_size = cfg.cluster_size;
  if (cfg.backing) {
    o.backing_file = "base.raw";
    o.backing_format = "raw";
  }
  auto c = q::create_qcow2(file, o);
  REQUIRE_MESSAGE(c, (c ? "" : c.error().message));
  for (std::size_t i = 0; i < cfg.granularities.size(); ++i) {
    q::BitmapEdit e;
    e.bitmap = std::string("b").append(std::to_string(i));
    e.ops.push_back({q::BitmapOp::Kind::add, ""});
    e.granularity = cfg.granularities[i];
    auto r = q::edit_bitmaps(file, e);
    REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  }
  {
    // Some data and some dirty bits stored before the crashed session.
    auto img = open_mem(f, std::make_unique<image::ForwardingFile>(file), true);
    REQUIRE_MESSAGE(img, (img ? "" : img.error().message));
    std::vector<std::byte> buf(100000, std::byte{0x5a});
    REQUIRE((*img)->write(buf, 300000, false));
    REQUIRE((*img)->write(std::span(buf).first(5000), 3000000, false));
    REQUIRE((*img)->close());
  }
  f.base = file.contents();
  f.base_view = guest_view(f, f.base);
  for (auto& [info, bits] : stored_bitmaps(f.base)) {
    REQUIRE_FALSE(info.in_use);
    REQUIRE(bits.count_dirty() > 0);
    f.base_bits.push_back(std::move(bits));
  }
  return f;
}

struct Totals {
  unsigned points = 0, mid_stream = 0, between_requests = 0, during_open = 0, recovered = 0, no_record = 0;
  unsigned leaked = 0;
  unsigned checkpoints = 0;         // taken (called) in the crashed sessions
  unsigned renames = 0;             // next records promoted before the crash
  unsigned next_left = 0;           // points whose crash left a next record
  unsigned with_checkpoints = 0;    // points with a checkpoint's bitmap on disk
  unsigned closes = 0;              // points that called close() before the cut
  unsigned closed = 0;              // ... and whose close() completed first
  std::uint64_t under = 0;          // granules changed but clean: must stay 0
  std::uint64_t outside = 0;        // dirty granules outside the bound: must stay 0
  std::uint64_t over = 0;           // dirty granules untouched by any request (within the bound)
  std::uint64_t changed = 0;        // granules whose content changed
  unsigned read_only_pending = 0;   // points whose read-only open found a trusted record
  unsigned read_only_compared = 0;  // bitmaps it exported, compared with the recovery's
  unsigned read_only_hidden = 0;    // ... of which the header hid the bitmaps (AUTOCLEAR_BITMAPS clear)
};

// One seeded request; false once the device refuses (it lost power). Every
// request issued is recorded in `touched` before it is issued: it may have
// reached the disk even if it failed.
bool op(image::BlockDevice& dev, std::vector<std::pair<std::uint64_t, std::uint64_t>>& touched, std::mt19937_64& rng) {
  std::uint64_t len = 1 + rng() % (rng() % 6 == 0 ? 400000 : 40000);
  std::uint64_t off = rng() % (kSize - len + 1);
  if (rng() % 2) {
    off = off / 4096 * 4096;
    len = std::max<std::uint64_t>(4096, len / 4096 * 4096);
  }
  unsigned kind = static_cast<unsigned>(rng() % 100);
  if (kind < 12) return static_cast<bool>(dev.flush());
  touched.emplace_back(off, len);
  if (kind < 70) {
    std::vector<std::byte> buf(len);
    auto fill = static_cast<std::uint8_t>(rng() | 1);
    for (std::uint64_t i = 0; i < len; ++i) buf[i] = std::byte(static_cast<std::uint8_t>(fill + (off + i) / 512));
    return static_cast<bool>(dev.write(buf, off, rng() % 8 == 0));
  }
  if (kind < 88) {
    image::ZeroFlags f;
    f.may_unmap = rng() % 2 == 0;
    return static_cast<bool>(dev.write_zeroes(off, len, f));
  }
  return static_cast<bool>(dev.discard(off, len, {}));
}

// The record names of the crashed session, each a GroupFile (Group has the
// model of names and folder syncs).
q::IntentAccess crashed_access(Group& g) {
  q::IntentAccess a;
  a.name = "crash.qcow2.qnbd-intent";
  a.chunk_size = kChunk;
  auto open = [&g](Group::Slot slot, bool create) -> Result<std::unique_ptr<image::File>> {
    if (create) {
      // The engine creates a name only where there is none (it removes a
      // leftover next record first), so a new file models O_TRUNC exactly.
      if (g.names[slot]) return make_error(EEXIST, "the test's model expects a free name");
      const std::size_t file = g.records.size();
      g.records.push_back(std::make_unique<image::CrashFile>(slot == Group::kRecord ? "record" : "next record"));
      QNBD_TRY(g.name_op({Group::NameOp::Kind::create, slot, file}));
    }
    if (!g.names[slot]) return std::unique_ptr<image::File>();
    return std::unique_ptr<image::File>(new GroupFile(g, *g.records[*g.names[slot]]));
  };
  a.open = [open](bool create) { return open(Group::kRecord, create); };
  a.open_next = [open](bool create) { return open(Group::kNext, create); };
  a.promote_next = [&g]() -> Result<void> {
    if (!g.names[Group::kNext]) return make_error(ENOENT, "no next record to rename");
    QNBD_TRY(g.name_op({Group::NameOp::Kind::rename_next}));
    ++g.renames;
    return ok();
  };
  auto unlink = [&g](Group::Slot slot) {
    if (g.names[slot]) (void)g.name_op({Group::NameOp::Kind::unlink, slot});
  };
  a.remove = [unlink] {
    unlink(Group::kRecord);
    unlink(Group::kNext);
  };
  a.remove_next = [unlink] { unlink(Group::kNext); };
  return a;
}

// The record names as the crash left them, for the recovering open: each
// name holds an in-memory file (kept alive while the engine uses it).
struct SurvivingNames {
  std::vector<std::unique_ptr<image::MemFile>> files;
  std::array<std::optional<std::size_t>, 2> names;
  explicit SurvivingNames(const Group& g) {
    for (int slot = 0; slot < 2; ++slot) {
      if (!g.names_after[slot]) continue;
      names[slot] = files.size();
      files.push_back(std::make_unique<image::MemFile>("recovered record", g.records_after[*g.names_after[slot]]));
    }
  }
  q::IntentAccess access() {
    q::IntentAccess a;
    a.name = "recovered.qcow2.qnbd-intent";
    a.chunk_size = kChunk;
    auto open = [this](int slot, bool create) -> Result<std::unique_ptr<image::File>> {
      if (create) {
        names[slot] = files.size();
        files.push_back(std::make_unique<image::MemFile>("new record"));
      }
      if (!names[slot]) return std::unique_ptr<image::File>();
      return std::unique_ptr<image::File>(std::make_unique<image::ForwardingFile>(*files[*names[slot]]));
    };
    a.open = [open](bool create) { return open(Group::kRecord, create); };
    a.open_next = [open](bool create) { return open(Group::kNext, create); };
    a.promote_next = [this]() -> Result<void> {
      names[Group::kRecord] = names[Group::kNext];
      names[Group::kNext].reset();
      return ok();
    };
    a.remove = [this] { names = {}; };
    a.remove_next = [this] { names[Group::kNext].reset(); };
    return a;
  }
};

// A checkpoint taken in the crashed session: the guest view at its call
// (requests run one at a time, so nothing is in flight) and whether it
// returned success (its new directory is then durable).
struct Checkpoint {
  std::vector<std::byte> view;
  bool returned_ok = false;
};
constexpr std::uint64_t kCheckpointGranularity = 65536;

std::string checkpoint_name(std::size_t k) { return fmt::format("c{}", k); }

// The checkpoints' bitmaps after recovery, judged as a backup tool uses
// them: c0..cm on disk for some m that covers every checkpoint that
// returned; every one but the last disabled; and for each c_k, the union
// of c_k and the later ones is dirty wherever the guest view differs from
// the view at checkpoint k's call (what an incremental backup from c_k
// copies). Counts under-reported granules into t.under.
void judge_checkpoints(const std::vector<Checkpoint>& checkpoints, const std::vector<std::byte>& view,
                       const std::vector<std::pair<image::BitmapInfo, image::DirtyBitmap>>& bitmaps, Totals& t) {
  std::vector<const std::pair<image::BitmapInfo, image::DirtyBitmap>*> present;
  for (std::size_t k = 0; k < checkpoints.size(); ++k) {
    auto it =
        std::find_if(bitmaps.begin(), bitmaps.end(), [&](const auto& b) { return b.first.name == checkpoint_name(k); });
    if (it == bitmaps.end()) break;
    present.push_back(&*it);
  }
  for (std::size_t k = present.size(); k < checkpoints.size(); ++k) {
    CAPTURE(k);
    REQUIRE_FALSE(checkpoints[k].returned_ok);
    REQUIRE(std::none_of(bitmaps.begin(), bitmaps.end(),
                         [&](const auto& b) { return b.first.name == checkpoint_name(k); }));
  }
  if (!present.empty()) ++t.with_checkpoints;
  for (std::size_t k = 0; k < present.size(); ++k) {
    // Named, not bound (here and below): clang 14 lets no lambda, such as
    // doctest's INFO, capture a structured binding.
    const auto& info = present[k]->first;
    CAPTURE(info.name);
    REQUIRE_FALSE(info.in_use);
    REQUIRE(info.granularity == kCheckpointGranularity);
    REQUIRE(info.auto_enabled == (k + 1 == present.size()));
    for (std::uint64_t off = 0; off < kSize; off += kCheckpointGranularity) {
      const std::uint64_t n = std::min(kCheckpointGranularity, kSize - off);
      if (std::memcmp(view.data() + off, checkpoints[k].view.data() + off, n) == 0) continue;
      bool dirty = false;
      for (std::size_t j = k; j < present.size(); ++j) dirty |= present[j]->second.is_dirty(off);
      if (!dirty) ++t.under;
    }
  }
}

// cut_in_close: no cut during the requests; the session then closes and
// the power fails at that mutating call (or sync) of close(). cut_at: the
// power fails at that mutating call (or sync) from the open on.
void run_point(const Fixture& f, std::uint64_t seed, const TempDir& dir, Totals& t, bool check_bound = true,
               bool checkpoints = false, std::optional<unsigned> cut_in_close = std::nullopt,
               std::optional<unsigned> cut_at = std::nullopt) {
  std::mt19937_64 rng(seed);
  Group g(f.base);
  g.seed = seed;
  // A checkpoint makes some 20 mutating calls: a wider range reaches into
  // the later ones.
  if (rng() % 2 == 0 && !cut_in_close) g.limit = rng() % (checkpoints ? 120 : 60);
  if (cut_at) g.limit = *cut_at;
  const unsigned requests = 2 + static_cast<unsigned>(rng() % 30);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> touched;
  std::vector<Checkpoint> taken;

  {
    auto dev = open_mem(f, std::make_unique<GroupFile>(g, g.img), true, crashed_access(g));
    if (!dev) {
      REQUIRE_MESSAGE(g.frozen, "open failed without a crash: ", dev.error().message);
      ++t.during_open;
    } else {
      for (unsigned i = 0; i < requests; ++i) {
        if (checkpoints && rng() % 5 == 0) {
          Checkpoint c;
          c.view.resize(kSize);
          REQUIRE((*dev)->read(c.view, 0));
          const std::size_t k = taken.size();
          auto r = image::checkpoint({dev->get()}, checkpoint_name(k), k ? checkpoint_name(k - 1) : "",
                                     kCheckpointGranularity);
          c.returned_ok = static_cast<bool>(r);
          taken.push_back(std::move(c));
          ++t.checkpoints;
          if (!r) {
            REQUIRE_MESSAGE(g.frozen, "checkpoint failed without a crash: ", r.error().message);
            break;
          }
          continue;
        }
        if (!op(**dev, touched, rng)) break;
      }
      if (g.frozen) {
        ++t.mid_stream;
      } else {
        ++t.between_requests;
        // A third of the points shut down cleanly (a server's SIGTERM):
        // the power cut may then land inside close(), which stores the
        // bitmaps and retires the record. (Its own generator, so the
        // requests of a seed stay what they were.)
        std::mt19937_64 closing(seed ^ 0xc105e);
        if (cut_in_close) g.limit = g.calls + *cut_in_close;
        if (cut_in_close || closing() % 3 == 0) {
          ++t.closes;
          if ((*dev)->close() && !g.frozen) ++t.closed;
        }
      }
    }
    g.freeze();  // power is gone; the device is dropped (closed or not)
  }
  ++t.points;
  t.renames += g.renames;
  if (g.names_after[Group::kNext]) ++t.next_left;

  // The next writable open recovers.
  image::MemFile img("recovered.qcow2", g.img_after);
  SurvivingNames names(g);
  std::string state;
  // A read-only open first: it recovers in memory only ("pending"),
  // exports each tracked bitmap as the writable open below stores it, and
  // writes nothing. Per base bitmap, its dirty granules (empty if the open
  // found no trusted record).
  std::vector<std::vector<bool>> read_only_dirty(f.base_bits.size());
  bool read_only_pending = false;
  {
    const std::vector<std::byte> before = img.contents();
    // A crash inside arming leaves AUTOCLEAR_BITMAPS (bit 0 of the
    // autoclear word, header offset 88) clear: QEMU sees no bitmaps, and
    // the read-only open serves the directory the record vouches for.
    const bool hidden = before.size() >= 96 && (load_be64(before.data() + 88) & 1) == 0;
    auto dev = open_mem(f, std::make_unique<image::ForwardingFile>(img), false, names.access());
    REQUIRE_MESSAGE(dev, "read-only open after the crash: ", (dev ? "" : dev.error().message));
    if ((*dev)->intent_state() == "pending") {
      ++t.read_only_pending;
      read_only_pending = true;
      if (hidden) ++t.read_only_hidden;
      for (std::size_t b = 0; b < f.base_bits.size(); ++b) {
        auto handle = (*dev)->export_bitmap(fmt::format("b{}", b));
        if (!handle) continue;
        std::vector<bool>& out = read_only_dirty[b];
        const std::uint64_t gran = f.base_bits[b].granularity();
        std::array<image::BitmapExtent, 64> ext;
        for (std::uint64_t off = 0; off < kSize;) {
          auto n = (*dev)->bitmap_status(*handle, off, kSize - off, ext);
          REQUIRE_MESSAGE(n, (n ? "" : n.error().message));
          REQUIRE(*n > 0);
          for (std::size_t i = 0; i < *n; ++i) {
            for (std::uint64_t g0 = off; g0 < off + ext[i].length; g0 += gran) out.push_back(ext[i].dirty);
            off += ext[i].length;
          }
        }
      }
    }
    REQUIRE((*dev)->close());
    REQUIRE(img.contents() == before);
  }
  {
    auto dev = open_mem(f, std::make_unique<image::ForwardingFile>(img), true, names.access());
    REQUIRE_MESSAGE(dev, "reopen after the crash: ", (dev ? "" : dev.error().message));
    state = (*dev)->intent_state();
    INFO("record: ", state, " ", (*dev)->intent_detail());
    REQUIRE((state == "none" || state == "recovered"));
    REQUIRE((*dev)->close());
  }
  if (state == "recovered") {
    ++t.recovered;
  } else {
    ++t.no_record;
  }
  const std::vector<std::byte> after = img.contents();

  // No corruption (leaks allowed): the engine's own check (qemu-img's
  // rules) at every point, qemu-img check itself at every fourth (one
  // process per point would dominate the runtime).
  {
    image::MemFile mf("check.qcow2", after);
    std::string lines;
    auto r = q::check_qcow2(mf, q::RepairMode::none, [&](const std::string& l) { lines += l + "\n"; });
    REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
    INFO("check:\n", lines);
    REQUIRE(r->corruptions == 0);
    REQUIRE(r->check_errors == 0);
    if (r->leaks) ++t.leaked;
  }
  if (seed % 4 == 0) {
    std::string path = dir / "img.qcow2";
    write_whole(path, after);
    const auto rc_out = run_capture("qemu-img check -f qcow2 " + path);
    const auto& rc = rc_out.first;
    const auto& out = rc_out.second;
    INFO("qemu-img check:\n", out);
    REQUIRE((rc == 0 || rc == 3));
  }

  const std::vector<std::byte> view = guest_view(f, after);
  auto bitmaps = stored_bitmaps(after);
  REQUIRE(bitmaps.size() >= f.base_bits.size());
  for (std::size_t b = 0; b < f.base_bits.size(); ++b) {
    // The base bitmaps (b0, b1) come first and stay enabled throughout.
    const auto& info_bits = bitmaps[b];
    const auto& info = info_bits.first;
    const auto& bits = info_bits.second;
    CAPTURE(info.name);
    REQUIRE(info.name == fmt::format("b{}", b));
    REQUIRE_FALSE(info.in_use);
    const std::uint64_t gran = info.granularity;
    // A trusted record ("pending") vouches for every base bitmap: the
    // read-only open must have exported each, hidden header or not.
    if (read_only_pending) REQUIRE_MESSAGE(!read_only_dirty[b].empty(), "the read-only open did not export it");
    if (!read_only_dirty[b].empty()) {
      ++t.read_only_compared;
      REQUIRE(read_only_dirty[b].size() == (kSize + gran - 1) / gran);
      for (std::uint64_t off = 0; off < kSize; off += gran) {
        CAPTURE(off);
        REQUIRE(read_only_dirty[b][off / gran] == bits.is_dirty(off));
      }
    }
    for (std::uint64_t off = 0; off < kSize; off += gran) {
      const std::uint64_t n = std::min(gran, kSize - off);
      const bool changed = std::memcmp(view.data() + off, f.base_view.data() + off, n) != 0;
      const bool dirty = bits.is_dirty(off);
      t.changed += changed;
      if (changed && !dirty) ++t.under;
      if (!dirty || f.base_bits[b].is_dirty(off)) continue;
      // Dirty now, clean at the last store: some request must have touched
      // this granule, or at least its recovery chunk (the bound).
      bool request = false, chunk = false;
      for (auto [o, l] : touched) {
        if (o < off + n && off < o + l) request = true;
        const std::uint64_t cs = align_down(o, kChunk), ce = align_up(o + l, kChunk);
        if (cs < off + n && off < ce) chunk = true;
      }
      if (!request) ++t.over;
      if (check_bound && !chunk) ++t.outside;
    }
  }
  judge_checkpoints(taken, view, bitmaps, t);
}

std::string summary(const Totals& t) {
  std::string s =
      fmt::format("{} points ({} mid-stream, {} between requests, {} during open): {} recovered from the record, "
                  "{} needed none; {} with leaks; {} changed granules, {} under-reported, {} dirty without a "
                  "touching request (all inside a touched chunk: {} outside)",
                  t.points, t.mid_stream, t.between_requests, t.during_open, t.recovered, t.no_record, t.leaked,
                  t.changed, t.under, t.over, t.outside);
  s += fmt::format("; {} closed before the cut ({} inside close())", t.closed, t.closes - t.closed);
  s += fmt::format("; {} read-only opens found the record trusted ({} with the header hiding the bitmaps), {} "
                   "bitmaps they exported matched the recovery",
                   t.read_only_pending, t.read_only_hidden, t.read_only_compared);
  if (t.checkpoints) {
    s += fmt::format("; {} checkpoints called, {} next records promoted, {} crashes left a next record, {} points "
                     "with checkpoint bitmaps on disk",
                     t.checkpoints, t.renames, t.next_left, t.with_checkpoints);
  }
  return s;
}

Totals& operator+=(Totals& t, const Totals& o) {
  t.points += o.points;
  t.mid_stream += o.mid_stream;
  t.between_requests += o.between_requests;
  t.during_open += o.during_open;
  t.recovered += o.recovered;
  t.no_record += o.no_record;
  t.leaked += o.leaked;
  t.checkpoints += o.checkpoints;
  t.renames += o.renames;
  t.next_left += o.next_left;
  t.with_checkpoints += o.with_checkpoints;
  t.closes += o.closes;
  t.closed += o.closed;
  t.under += o.under;
  t.outside += o.outside;
  t.over += o.over;
  t.changed += o.changed;
  t.read_only_pending += o.read_only_pending;
  t.read_only_compared += o.read_only_compared;
  t.read_only_hidden += o.read_only_hidden;
  return t;
}

// Every configuration, `points` seeds each; each point must under-report
// nothing and stay inside the bound.
Totals run_all(std::uint64_t seed_base, unsigned points, bool checkpoints) {
  TempDir dir;
  Totals t;
  const auto all = configs();
  for (std::size_t c = 0; c < all.size(); ++c) {
    Fixture f = make_fixture(all[c], dir);
    for (unsigned p = 0; p < points; ++p) {
      const std::uint64_t seed = seed_base + 0x1000 * c + p;
      std::string name = all[c].name;
      CAPTURE(name);
      CAPTURE(seed);
      Totals one;
      run_point(f, seed, dir, one, true, checkpoints);
      REQUIRE_MESSAGE(one.under == 0, summary(one));
      REQUIRE_MESSAGE(one.outside == 0, summary(one));
      t += one;
    }
  }
  MESSAGE(summary(t));
  return t;
}

// One point per (cut, seed): the power fails at that mutating call or sync
// of close() (in_close) or from the open on; each seed tears the unsynced
// writes its own way. Each point must under-report nothing and stay
// inside the bound.
void sweep_cuts(const Fixture& f, const TempDir& dir, Totals& t, unsigned cuts, unsigned seeds, std::uint64_t seed_base,
                bool in_close) {
  const std::string name = f.cfg.name;
  for (unsigned cut = 0; cut < cuts; ++cut) {
    for (std::uint64_t s = 0; s < seeds; ++s) {
      const std::uint64_t seed = seed_base + cut * 64 + s;
      CAPTURE(name);
      CAPTURE(cut);
      CAPTURE(seed);
      Totals one;
      run_point(f, seed, dir, one, true, false, in_close ? std::optional(cut) : std::nullopt,
                in_close ? std::nullopt : std::optional(cut));
      REQUIRE_MESSAGE(one.under == 0, summary(one));
      REQUIRE_MESSAGE(one.outside == 0, summary(one));
      t += one;
    }
  }
}

}  // namespace

TEST_CASE("crash bitmaps: after power loss at any point the reopened image recovers complete bitmaps") {
  REQUIRE(have_qemu_img());
  const Totals t = run_all(0xb17000, 90, false);
  CHECK(t.points >= 500);
  CHECK(t.mid_stream > 0);
  CHECK(t.between_requests > 0);
  CHECK(t.recovered > t.points / 2);
  CHECK(t.read_only_compared > t.points / 2);
  CHECK(t.closed > 0);
  CHECK(t.closes > t.closed);  // some cuts landed inside close()
  CHECK(t.changed > 0);
}

// The store at close (docs/crash-safe-bitmaps.md, steps 8-10) cut at each of
// its writes and syncs in turn, each cut with 40 seeds of what the
// unsynced writes left (dropped, kept or torn per sector). Its header
// switch moves the bitmap directory (the extension's fields lie in the
// header's second sector, as QEMU lays the header out) and clears the
// record's autoclear bit (first sector): one write of both, torn, once
// left the record bit clear with the old directory's bitmaps in_use.
TEST_CASE("crash bitmaps: power loss at every step of the store at close leaves every bitmap usable") {
  REQUIRE(have_qemu_img());
  TempDir dir;
  Totals t;
  for (const Config& cfg : {configs()[0], configs()[2]}) {
    sweep_cuts(make_fixture(cfg, dir), dir, t, 28, 40, 0x5103e000, true);
  }
  MESSAGE(summary(t));
  CHECK(t.closes == t.points);
  CHECK(t.closed > 0);                // some cuts came after close() returned
  CHECK(t.closes - t.closed > 1000);  // most landed inside it
}

// Arming (docs/crash-safe-bitmaps.md, steps 1-4) cut at each of its writes
// and syncs, 24 tearings each, with 20 enabled bitmaps: the directory,
// marked in_use in place at step 3, spans two sectors, so a torn marking
// leaves some bitmaps in_use and some not. The old recovery matched the
// directory against the record's two checksums only and left those
// bitmaps in_use (lost).
TEST_CASE("crash bitmaps: power loss inside arming with a directory of two sectors leaves every bitmap usable") {
  REQUIRE(have_qemu_img());
  TempDir dir;
  Totals t;
  const Config cfg{"c64k-20x64k", 65536, std::vector<std::uint64_t>(20, 65536), false};
  sweep_cuts(make_fixture(cfg, dir), dir, t, 12, 24, 0xa53e000, false);
  MESSAGE(summary(t));
  CHECK(t.points == 12 * 24);
  CHECK(t.recovered > t.points / 3);
  CHECK(t.read_only_hidden > 0);
}

// Live checkpoints hand the record over to a next one armed for the new
// directory (docs/crash-safe-bitmaps.md, "Live edits"): power is cut at
// every step of that too, the rename and its folder sync included.
TEST_CASE("crash bitmaps: power loss across live checkpoints leaves every bitmap consistent and complete") {
  REQUIRE(have_qemu_img());
  const Totals t = run_all(0xc4e000, 90, true);
  CHECK(t.points >= 500);
  CHECK(t.mid_stream > t.points / 4);
  CHECK(t.checkpoints > t.points);
  CHECK(t.renames > t.points / 2);
  CHECK(t.next_left > 0);
  CHECK(t.with_checkpoints > t.points / 2);
  CHECK(t.recovered > t.points / 2);
  CHECK(t.read_only_compared > t.points / 2);
  CHECK(t.closed > 0);
  CHECK(t.closes > t.closed);  // some cuts landed inside close()
}

namespace {

// Runs points with a mutation switched on and returns how many granules
// the coverage check found under-reported.
std::uint64_t mutated_run(std::atomic<bool>& hook, bool checkpoints = false) {
  TempDir dir;
  Fixture f = make_fixture(configs()[0], dir);
  Totals t;
  hook = true;
  for (unsigned p = 0; p < 40; ++p) run_point(f, 0xdead00 + p, dir, t, false, checkpoints);
  hook = false;
  MESSAGE("mutated: ", summary(t));
  return t.under;
}

}  // namespace

TEST_CASE("crash bitmaps: the check fails when the next record does not start with the old record's chunks") {
  REQUIRE(have_qemu_img());
  CHECK(mutated_run(q::IntentRecord::test_skip_fill, true) > 0);
}

TEST_CASE("crash bitmaps: the check fails when the record is not synced before the write") {
  REQUIRE(have_qemu_img());
  CHECK(mutated_run(q::IntentRecord::test_drop_sync) > 0);
}

TEST_CASE("crash bitmaps: the check fails when writes are not recorded") {
  REQUIRE(have_qemu_img());
  CHECK(mutated_run(q::IntentRecord::test_skip_mark) > 0);
}
