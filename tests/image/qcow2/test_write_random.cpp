// Acceptance tests for the write engine: seeded random workloads through
// open_image(..., read_only = false) on every kind of image in the read
// matrix, made by qemu-img; afterwards the engine's own reads, `qemu-img
// check` (no errors, no leaks) and `qemu-img compare` against a raw
// reference file judge the result.
#include <doctest/doctest.h>

#include <stdexcept>
#include <thread>

#include "image/block_device.hpp"
#include "image_test_support.hpp"
#include "test_write_random_support.hpp"

using namespace qnbd;
using namespace qnbd::test;

namespace {

constexpr std::uint64_t kSize = 16 << 20;

struct Kind {
  const char* name;
  // Shell commands run in the temp dir (cd'd) that leave "img" (and any
  // backing or data files) there.
  std::string make;
  const char* format = "qcow2";
};

std::vector<Kind> matrix() {
  std::string sz = std::to_string(kSize);
  auto create = [&](const std::string& opts) { return "qemu-img create -q -f qcow2 -o " + opts + " img " + sz; };
  // Pre-existing data, so writes meet allocated clusters too.
  std::string fill =
      " && qemu-io -f qcow2 -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0x6b 5M 300k' -c 'write -q -z 9M 1M' img";
  return {
      {"v2-64k", create("compat=0.10") + fill},
      {"v3-512", create("cluster_size=512") + fill},
      {"v3-4k", create("cluster_size=4k") + fill},
      {"v3-64k", create("cluster_size=64k") + fill},
      {"v3-2M", create("cluster_size=2M") + fill},
      {"refcount1", create("refcount_bits=1") + fill},
      {"refcount64", create("refcount_bits=64,cluster_size=4k") + fill},
      {"lazy-refcounts", create("lazy_refcounts=on") + fill},
      {"extended-l2-64k", create("extended_l2=on,cluster_size=64k") + fill},
      {"extended-l2-16k", create("extended_l2=on,cluster_size=16k") + fill},
      {"backing-qcow2",
       "qemu-img create -q -f qcow2 base " + sz +
           " && qemu-io -f qcow2 -c 'write -q -P 0x33 0 6M' -c 'write -q -P 0x44 12M 2M' base"
           " && qemu-img create -q -f qcow2 -b base -F qcow2 img && qemu-io -f qcow2 -c 'write -q -P 0x77 1M 64k' img"},
      {"backing-raw-v2", "qemu-img create -q -f raw base " + sz +
                             " && qemu-io -f raw -c 'write -q -P 0x21 2M 5M' base"
                             " && qemu-img create -q -f qcow2 -o compat=0.10 -b base -F raw img"},
      {"backing-extended-l2", "qemu-img create -q -f qcow2 base " + sz +
                                  " && qemu-io -f qcow2 -c 'write -q -P 0x31 0 8M' base"
                                  " && qemu-img create -q -f qcow2 -o extended_l2=on -b base -F qcow2 img"},
      {"compressed-zlib", "qemu-img create -q -f qcow2 src " + sz +
                              " && qemu-io -f qcow2 -c 'write -q -P 0x42 0 4M' src"
                              " && qemu-img convert -c -O qcow2 src img"},
      {"compressed-zstd", "qemu-img create -q -f qcow2 src " + sz +
                              " && qemu-io -f qcow2 -c 'write -q -P 0x43 1M 4M' src"
                              " && qemu-img convert -c -O qcow2 -o compression_type=zstd src img"},
      {"data-file", create("data_file=$PWD/img.data") + fill},
      {"data-file-raw", create("data_file=$PWD/img.data,data_file_raw=on") + fill},
  };
}

// qemu-img check: no errors, no leaks (exit 0); compare with the reference.
void judge(const TempDir& dir, const std::string& format) {
  if (format == "qcow2") {  // raw has nothing to check
    // Named, not bound (here and below): clang 14 lets no lambda, such as
    // doctest's INFO, capture a structured binding.
    const auto check_rc_check_out = run_capture("qemu-img check -f " + format + " " + dir / "img");
    const auto& check_rc = check_rc_check_out.first;
    const auto& check_out = check_rc_check_out.second;
    INFO("qemu-img check output:\n", check_out);
    CHECK(check_rc == 0);
  }
  const auto cmp_rc_cmp_out =
      run_capture("qemu-img compare -f " + format + " -F raw " + dir / "img" + " " + dir / "ref");
  const auto& cmp_rc = cmp_rc_cmp_out.first;
  const auto& cmp_out = cmp_rc_cmp_out.second;
  INFO("qemu-img compare output:\n", cmp_out);
  CHECK(cmp_rc == 0);
}

// Start state of the reference: the guest view as qemu-img reads it.
Model initial_model(const TempDir& dir, const std::string& format) {
  const auto rc_out = run_capture("qemu-img convert -f " + format + " -O raw " + dir / "img" + " " + dir / "initial");
  const auto& rc = rc_out.first;
  const auto& out = rc_out.second;
  INFO(out);
  REQUIRE(rc == 0);
  Model m;
  m.data = read_whole(dir / "initial");
  m.base = m.data;
  REQUIRE(m.data.size() == kSize);
  return m;
}

// Makes the image of `kind` in `dir` and returns the reference model of it.
Model make_image(const TempDir& dir, const Kind& kind) {
  const auto rc_out = run_capture("cd " + dir.path.string() + " && " + kind.make);
  const auto& rc = rc_out.first;
  const auto& out = rc_out.second;
  INFO("making the image: ", out);
  REQUIRE(rc == 0);
  return initial_model(dir, kind.format);
}

std::unique_ptr<image::BlockDevice> open_writable(const TempDir& dir) {
  image::OpenOptions options;
  options.read_only = false;
  auto dev = image::open_image(dir / "img", options);
  REQUIRE_MESSAGE(dev, (dev ? "" : dev.error().message));
  return std::move(*dev);
}

// Ends a workload: the engine reads back the model and closes cleanly; with
// the device gone, qemu-img judges the file against the model.
void close_and_judge(std::unique_ptr<image::BlockDevice> dev, const Model& m, const TempDir& dir, const Kind& kind) {
  check_device_equals(*dev, m.data);
  auto c = dev->close();
  REQUIRE_MESSAGE(c, (c ? "" : c.error().message));
  dev.reset();
  write_whole(dir / "ref", m.data);
  judge(dir, kind.format);
}

WorkloadStats single_thread_run(const Kind& kind, std::uint64_t seed, unsigned ops) {
  TempDir dir;
  Model m = make_image(dir, kind);
  WorkloadStats stats;
  auto dev = open_writable(dir);
  REQUIRE(dev->capabilities().writable);
  std::mt19937_64 rng(seed);
  for (unsigned i = 0; i < ops; ++i) {
    // Mostly small requests, some up to 3 MiB to span clusters and L2 tables.
    std::uint64_t max_len = rng() % 8 == 0 ? (3 << 20) : 70000;
    random_op(*dev, m, rng, 0, kSize, max_len, stats);
  }
  close_and_judge(std::move(dev), m, dir, kind);
  // Reopened, the engine reads back what it wrote.
  auto again = image::open_image(dir / "img", image::OpenOptions{});
  REQUIRE_MESSAGE(again, (again ? "" : again.error().message));
  check_device_equals(**again, m.data);
  return stats;
}

// Four threads at once; thread t owns the 4 KiB chunks c with c % 4 == t,
// so every cluster of 8 KiB or more is shared between threads while each
// byte has one writer and the reference stays well-defined.
void multi_thread_run(const Kind& kind, std::uint64_t seed, unsigned ops_per_thread) {
  TempDir dir;
  Model m = make_image(dir, kind);
  {
    auto dev = open_writable(dir);
    constexpr unsigned kThreads = 4;
    constexpr std::uint64_t kChunk = 4096;
    std::vector<std::string> failures(kThreads);
    std::vector<std::thread> threads;
    std::vector<WorkloadStats> stats(kThreads);
    for (unsigned t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(seed * 31 + t);
        // doctest assertions are not thread-safe: each thread records its
        // first failure and the main thread reports it.
        try {
          for (unsigned i = 0; i < ops_per_thread; ++i) {
            // Concentrate on the first 4 MiB so chunks of all threads meet
            // in the same clusters and L2 tables.
            std::uint64_t chunk = (rng() % (4 << 20) / kChunk) / kThreads * kThreads + t;
            std::uint64_t lo = chunk * kChunk;
            std::vector<std::byte> buf;
            std::uint64_t off = lo + rng() % kChunk;
            std::uint64_t len = 1 + rng() % (lo + kChunk - off);
            unsigned kind = static_cast<unsigned>(rng() % 10);
            Result<void> r = ok();
            if (kind < 6) {
              buf.assign(len, std::byte(static_cast<std::uint8_t>(rng())));
              r = dev->write(buf, off, false);
              if (r) std::memcpy(m.data.data() + off, buf.data(), len);
            } else if (kind < 8) {
              image::ZeroFlags f;
              f.may_unmap = rng() % 2 == 0;
              r = dev->write_zeroes(off, len, f);
              if (r) std::memset(m.data.data() + off, 0, len);
            } else if (kind < 9) {
              r = dev->discard(off, len, {});
              if (r) {
                buf.resize(len);
                r = dev->read(buf, off);
                for (std::uint64_t k = 0; r && k < len; ++k) {
                  std::byte g = buf[k];
                  if (g != m.data[off + k] && g != std::byte{0} && g != m.base[off + k]) {
                    throw std::runtime_error("discard left unexpected data at " + std::to_string(off + k));
                  }
                }
                if (r) std::memcpy(m.data.data() + off, buf.data(), len);
              }
            } else {
              r = dev->flush();
            }
            if (!r) throw std::runtime_error(r.error().message);
            // Read back our own range while the others keep writing.
            buf.resize(len);
            auto rr = dev->read(buf, off);
            if (!rr) throw std::runtime_error(rr.error().message);
            if (std::memcmp(buf.data(), m.data.data() + off, len) != 0) {
              throw std::runtime_error("read-back mismatch at " + std::to_string(off) + "+" + std::to_string(len));
            }
          }
        } catch (const std::exception& e) {
          failures[t] = e.what();
        }
      });
    }
    for (auto& th : threads) th.join();
    for (unsigned t = 0; t < kThreads; ++t) CHECK_MESSAGE(failures[t].empty(), "thread ", t, ": ", failures[t]);
    close_and_judge(std::move(dev), m, dir, kind);
  }
}

}  // namespace

TEST_CASE("write random: raw image, single thread and 4 threads") {
  if (!have_qemu_img()) {
    MESSAGE("qemu-img not installed");
    return;
  }
  Kind raw{"raw",
           "qemu-img create -q -f raw img " + std::to_string(kSize) +
               " && qemu-io -f raw -c 'write -q -P 0x5a 0 1M' img",
           "raw"};
  for (std::uint64_t seed = 1; seed <= 3; ++seed) {
    CAPTURE(seed);
    single_thread_run(raw, seed, 150);
  }
  multi_thread_run(raw, 9, 300);
}

TEST_CASE("write random: every qcow2 kind of the read matrix") {
  REQUIRE(have_qemu_img());
  unsigned workloads = 0;
  WorkloadStats total;
  for (const Kind& kind : matrix()) {
    for (std::uint64_t seed = 1; seed <= 2; ++seed) {
      CAPTURE(kind.name);
      CAPTURE(seed);
      auto s = single_thread_run(kind, seed * 1000 + workloads, 120);
      total.writes += s.writes;
      total.zeroes += s.zeroes;
      total.discards += s.discards;
      total.flushes += s.flushes;
      ++workloads;
    }
  }
  MESSAGE("random workloads: ", workloads, " (", total.writes, " writes, ", total.zeroes, " write_zeroes, ",
          total.discards, " discards, ", total.flushes, " flushes)");
  CHECK(workloads == 2 * matrix().size());
}

TEST_CASE("write random: 4 threads on shared clusters") {
  REQUIRE(have_qemu_img());
  for (const Kind& kind : matrix()) {
    std::string name = kind.name;
    if (name != "v3-64k" && name != "v3-4k" && name != "backing-qcow2" && name != "extended-l2-64k" &&
        name != "compressed-zlib" && name != "refcount1") {
      continue;
    }
    CAPTURE(kind.name);
    multi_thread_run(kind, 77, 250);
  }
}

// Runs now, whatever the engine can do: every image of the matrix is made
// by qemu-img, passes its check, and the engine reads it as qemu-img does,
// so the write tests above start from valid images when they run.
TEST_CASE("write random: the matrix images are valid and read alike") {
  if (!have_qemu_img()) {
    MESSAGE("qemu-img not installed");
    return;
  }
  for (const Kind& kind : matrix()) {
    std::string name = kind.name;
    CAPTURE(name);
    TempDir dir;
    const auto rc_out = run_capture("cd " + dir.path.string() + " && " + kind.make);
    const auto& rc = rc_out.first;
    const auto& out = rc_out.second;
    INFO("making the image: ", out);
    REQUIRE(rc == 0);
    const auto check_rc_check_out = run_capture("qemu-img check " + dir / "img");
    const auto& check_rc = check_rc_check_out.first;
    const auto& check_out = check_rc_check_out.second;
    INFO("qemu-img check: ", check_out);
    CHECK(check_rc == 0);
    Model m = initial_model(dir, kind.format);
    auto dev = image::open_image(dir / "img", image::OpenOptions{});
    REQUIRE_MESSAGE(dev, (dev ? "" : dev.error().message));
    check_device_equals(**dev, m.data);
  }
}
