// Shared by the write-engine acceptance tests (test_write_random.cpp,
// test_crash.cpp): seeded random workloads driven through BlockDevice and
// mirrored into an in-memory reference, plus running qemu-img as the judge.
#pragma once

#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "image/block_device.hpp"
#include "image/io/mem_file.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/qcow2_image.hpp"

namespace qnbd::test {

// Run a shell command, returning its exit status and combined output.
inline std::pair<int, std::string> run_capture(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(("(" + cmd + ") 2>&1").c_str(), "r");
  if (!p) return {-1, "popen failed"};
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), out};
}

inline void write_whole(const std::string& path, const std::vector<std::byte>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// The guest view the workload expects, and the view before it started
// (what a discard may expose when the engine drops an allocation).
struct Model {
  std::vector<std::byte> data;
  std::vector<std::byte> base;
};

struct WorkloadStats {
  unsigned writes = 0, zeroes = 0, discards = 0, flushes = 0;
};

// One seeded operation on [lo, hi) of the device, mirrored into the model.
// Discarded contents are unspecified by NBD; they are read back and must
// be, byte by byte, the old data, zero, or the pre-workload view; the model
// then adopts what the device returns. `align` is the granularity aligned
// requests use; unaligned ones are arbitrary.
inline void random_op(image::BlockDevice& dev, Model& m, std::mt19937_64& rng, std::uint64_t lo, std::uint64_t hi,
                      std::uint64_t max_len, WorkloadStats& stats, bool allow_flush = true) {
  auto pick = [&](std::uint64_t n) { return n == 0 ? 0 : rng() % n; };
  unsigned kind = static_cast<unsigned>(pick(100));
  bool aligned = pick(2) == 0;
  std::uint64_t span = hi - lo;
  std::uint64_t len = 1 + pick(std::min(max_len, span));
  std::uint64_t off = lo + pick(span - len + 1);
  if (aligned) {
    off = lo + (off - lo) / 512 * 512;
    len = std::max<std::uint64_t>(512, len / 512 * 512);
    if (off + len > hi) len = (hi - off) / 512 * 512;
    if (len == 0) return;
    // Sometimes 64 KiB aligned: whole clusters of every cluster size up to
    // 64 KiB, so runs of fresh clusters take the batched allocation path.
    if (pick(4) == 0 && hi - lo >= 65536) {
      off = lo + (off - lo) / 65536 * 65536;
      len = std::max<std::uint64_t>(65536, len / 65536 * 65536);
      if (off + len > hi) len = (hi - off) / 65536 * 65536;
      if (len == 0) return;
    }
  }
  if (kind < 50) {
    std::vector<std::byte> buf(len);
    auto fill = static_cast<std::uint8_t>(1 + pick(255));
    // A position-dependent pattern so misplaced data is caught.
    for (std::uint64_t i = 0; i < len; ++i) buf[i] = std::byte(static_cast<std::uint8_t>(fill + (off + i) / 512));
    auto r = dev.write(buf, off, pick(8) == 0);
    REQUIRE_MESSAGE(r, "write ", off, "+", len, ": ", (r ? "" : r.error().message));
    std::memcpy(m.data.data() + off, buf.data(), len);
    ++stats.writes;
  } else if (kind < 72) {
    image::ZeroFlags f;
    f.may_unmap = pick(2) == 0;
    f.fua = pick(8) == 0;
    auto r = dev.write_zeroes(off, len, f);
    REQUIRE_MESSAGE(r, "write_zeroes ", off, "+", len, ": ", (r ? "" : r.error().message));
    std::memset(m.data.data() + off, 0, len);
    ++stats.zeroes;
  } else if (kind < 85 || !allow_flush) {
    auto r = dev.discard(off, len, {});
    REQUIRE_MESSAGE(r, "discard ", off, "+", len, ": ", (r ? "" : r.error().message));
    std::vector<std::byte> got(len);
    auto rr = dev.read(got, off);
    REQUIRE_MESSAGE(rr, "read after discard: ", (rr ? "" : rr.error().message));
    for (std::uint64_t i = 0; i < len; ++i) {
      std::byte g = got[i];
      if (g != m.data[off + i] && g != std::byte{0} && g != m.base[off + i]) {
        FAIL("discard ", off, "+", len, " left byte ", off + i, " = ", int(g), " (old ", int(m.data[off + i]),
             ", base ", int(m.base[off + i]), ")");
      }
    }
    std::memcpy(m.data.data() + off, got.data(), len);
    ++stats.discards;
  } else {
    auto r = dev.flush();
    REQUIRE_MESSAGE(r, "flush: ", (r ? "" : r.error().message));
    ++stats.flushes;
  }
}

// Read the whole device and compare with the model; reports the first
// differing offset.
inline void check_device_equals(image::BlockDevice& dev, const std::vector<std::byte>& want) {
  REQUIRE(dev.size() == want.size());
  std::vector<std::byte> got(want.size());
  constexpr std::uint64_t kChunk = 1 << 20;
  for (std::uint64_t off = 0; off < got.size(); off += kChunk) {
    std::uint64_t n = std::min<std::uint64_t>(kChunk, got.size() - off);
    auto r = dev.read(std::span(got).subspan(off, n), off);
    REQUIRE_MESSAGE(r, "read ", off, ": ", (r ? "" : r.error().message));
  }
  if (got != want) {
    std::size_t i = 0;
    while (got[i] == want[i]) ++i;
    FAIL("device differs from the reference at byte ", i, ": ", int(got[i]), " != ", int(want[i]));
  }
}

}  // namespace qnbd::test
