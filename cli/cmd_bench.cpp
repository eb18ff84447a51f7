// qnbd bench: the engine benchmark, in `qemu-img bench` spelling. It drives
// the BlockDevice directly (no NBD) so the numbers compare our image engine
// with qemu's block layer under the same request stream: COUNT requests of
// BUFFER_SIZE bytes at OFFSET, OFFSET+STEP, ... (wrapping like qemu-img
// bench), DEPTH of them in flight. qemu keeps DEPTH requests in flight from
// one coroutine loop; here DEPTH threads each take the next request, which
// is how the server's pool issues concurrent requests to the engine too.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"

namespace qnbd::cli {
namespace {

// qemu-img bench's -c and -d: qemu_strtoul in base 0 (decimal, 0x hex or
// 0 octal; no suffix), the whole text, nothing negative.
std::optional<std::uint64_t> parse_c_number(const std::string& text) {
  if (text.empty() || text.find('-') != std::string::npos) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const unsigned long long number = std::strtoull(text.c_str(), &end, 0);
  if (errno != 0 || end == text.c_str() || *end != '\0') return std::nullopt;
  return static_cast<std::uint64_t>(number);
}

struct BenchArgs {
  std::string format, cache = "writeback", filename;
  std::string count = "75000", depth = "64", offset = "0", buffer_size = "4096", step_size;
  int pattern = 0;
  bool write = false, quiet = false, native_aio = false;
  LockArgs lock;
};

int run_bench(const BenchArgs& a) {
  auto fail = [](const char* what) {
    std::fprintf(stderr, "qnbd: Invalid %s specified\n", what);
    return 1;
  };
  const auto count = parse_c_number(a.count);
  if (!count || *count > INT32_MAX) return fail("request count");
  // qemu-img takes any depth up to INT_MAX (and never finishes with 0);
  // qnbd runs a thread per request in flight, so it takes 1 to 1024.
  const auto depth = parse_c_number(a.depth);
  if (!depth || *depth == 0 || *depth > 1024) return fail("queue depth");
  const auto offset = cvtnum("offset", a.offset, 0, INT64_MAX);
  if (!offset) return 1;
  const auto bufsize = cvtnum("buffer size", a.buffer_size, 0, INT32_MAX);
  if (!bufsize) return 1;
  // As in qemu-img bench, the step defaults to the buffer size (and so does
  // a step of 0).
  std::uint64_t step = *bufsize;
  if (!a.step_size.empty()) {
    const auto given = cvtnum("step_size", a.step_size, 0, INT32_MAX);
    if (!given) return 1;
    if (*given) step = *given;
  }
  if (a.pattern < 0 || a.pattern > 0xff) return fail("pattern byte");

  image::OpenOptions options;
  if (!parse_image_format(a.format, options.format)) {
    std::fprintf(stderr, "qnbd: Unknown file format '%s'\n", a.format.c_str());
    return 1;
  }
  if (a.cache == "none" || a.cache == "off") {
    options.cache = image::CacheMode::none;
  } else if (a.cache == "writeback") {
    options.cache = image::CacheMode::writeback;
  } else if (a.cache == "writethrough") {
    options.cache = image::CacheMode::writethrough;
  } else if (a.cache == "directsync") {
    options.cache = image::CacheMode::directsync;
  } else if (a.cache == "unsafe") {
    options.cache = image::CacheMode::unsafe;
  } else {
    std::fprintf(stderr, "qnbd: Invalid cache option: %s\n", a.cache.c_str());
    return 1;
  }
  options.read_only = !a.write;
  options.lock = lock_options(a.lock, image::LockUse::tool);
  auto opened = image::open_image(a.filename, options);
  if (!opened) {
    print_image_error(a.filename, opened.error());
    return 1;
  }
  if (a.lock.force_share) warn_force_share(a.filename);
  auto& dev = **opened;
  const std::uint64_t image_size = dev.size();
  if (!a.quiet) {
    std::printf("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
                " in parallel (starting at offset %" PRIu64 ", step size %" PRIu64 ")\n",
                *count, a.write ? "write" : "read", *bufsize, *depth, *offset, step);
    std::fflush(stdout);
  }

  // Request i goes to the offset qemu-img bench gives its i-th request:
  // start, then += step modulo the image size. Like qemu, a request that
  // does not fit is not refused up front; it fails when it is issued.
  // Computed per request (up to 2^31 of them), not stored.
  const auto offset_of = [&](std::uint64_t i) -> std::uint64_t {
    if (i == 0) return *offset;
    if (image_size == 0) return 0;
    const unsigned __int128 o =
        static_cast<unsigned __int128>(*offset % image_size) + static_cast<unsigned __int128>(i) * (step % image_size);
    return static_cast<std::uint64_t>(o % image_size);
  };

  const std::size_t threads = static_cast<std::size_t>(std::min<std::uint64_t>(*depth, *count));
  std::atomic<std::uint64_t> issued{0};
  std::atomic<bool> failed{false};
  std::mutex error_lock;
  std::string first_error;
  auto worker = [&] {
    // Aligned for cache=none (O_DIRECT) like qemu's blk_blockalign.
    // (At least one page: a 0-byte buffer, which qemu-img takes, is still
    // a valid pointer.)
    const std::size_t alloc = std::max<std::size_t>(4096, static_cast<std::size_t>((*bufsize + 4095) / 4096 * 4096));
    std::unique_ptr<std::byte, decltype(&std::free)> buf(static_cast<std::byte*>(std::aligned_alloc(4096, alloc)),
                                                         &std::free);
    if (!buf) {
      failed = true;
      return;
    }
    std::memset(buf.get(), a.pattern, alloc);
    std::span<std::byte> span(buf.get(), static_cast<std::size_t>(*bufsize));
    for (;;) {
      const std::uint64_t i = issued.fetch_add(1, std::memory_order_relaxed);
      if (i >= *count || failed.load(std::memory_order_relaxed)) return;
      Result<void> r = ok();
      const std::uint64_t at = offset_of(i);
      if (at > image_size || *bufsize > image_size - at) {
        r = make_error(EIO, "Input/output error");
      } else {
        r = a.write ? dev.write(span, at, false) : dev.read(span, at);
      }
      if (!r) {
        std::lock_guard lock(error_lock);
        if (!failed.exchange(true)) first_error = r.error().message;
        return;
      }
    }
  };
  const auto start = std::chrono::steady_clock::now();
  {
    std::vector<std::jthread> pool;
    pool.reserve(threads);
    for (std::size_t t = 0; t < threads; ++t) pool.emplace_back(worker);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failed) {
    std::fprintf(stderr, "qnbd: Failed request: %s\n", first_error.empty() ? "out of memory" : first_error.c_str());
    (void)dev.close();
    return 1;
  }
  if (!a.quiet) std::printf("Run completed in %3.3f seconds.\n", seconds);
  // Closing (which flushes, as qemu-img does when it drops the image) is
  // outside the timed run in both tools.
  if (auto r = dev.close(); !r) {
    print_image_error(a.filename, r.error());
    return 1;
  }
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("bench", "Engine benchmark without NBD (qemu-img bench syntax)");
  auto args = std::make_shared<BenchArgs>();
  cmd->add_option("-f", args->format, "image format: qcow2 or raw (default: detect)");
  cmd->add_flag("-w", args->write, "write requests instead of reads");
  cmd->add_option("-c", args->count, "number of requests (default 75000)");
  cmd->add_option("-d", args->depth, "requests in flight (default 64)");
  cmd->add_option("-o", args->offset, "offset of the first request (default 0)");
  cmd->add_option("-s", args->buffer_size, "bytes per request (default 4096)");
  cmd->add_option("-S", args->step_size, "offset step between requests (default: buffer size)");
  cmd->add_option("-t", args->cache, "cache mode: none, writeback (default), writethrough, directsync, unsafe");
  cmd->add_option("--pattern", args->pattern, "byte written by write requests (default 0)");
  cmd->add_flag("-n", args->native_aio, "accepted for qemu-img compatibility; ignored");
  cmd->add_flag("-q", args->quiet, "quiet");
  cmd->add_option("FILENAME", args->filename, "image")->required();
  add_lock_options(cmd, args->lock, true);
  cmd->callback([args, &status] { status = run_bench(*args); });
}

}  // namespace qnbd::cli
