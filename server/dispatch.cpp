// Dispatch: a received request to the export's BlockDevice. protocol::decode
// decides whether it may run (refusals and CACHE are answered without the
// device); the rest runs inline on the io thread or on the blocking pool
// (runs_inline); execute() does the device calls. What the replies say is
// protocol/'s: ReadPlan chunks a READ, BlockStatusPlan builds the
// BLOCK_STATUS chunks, append_error_reply answers every failure.
#include "server/internal.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <array>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"
#include "common/zero.hpp"
#include "protocol/constants.hpp"

namespace qnbd::server {

static_assert(kMaxContexts == protocol::kMaxContexts);

bool Session::answer_without_device(Slot& s) {
  s.meta.clear();
  s.pieces.clear();
  auto payload = std::span<const std::byte>(s.data.data.get(), s.req.payload_length);
  auto cmd = decode(s.req, payload, vctx_, wire_contexts_);
  if (cmd && stopping_) cmd = Error{ESHUTDOWN, "server is shutting down"};
  if (!cmd) {
    log::debug("conn {}: {} cookie {:#x} offset {} length {} refused: {}", id_, command_name(s.req.type), s.req.cookie,
               s.req.offset, s.req.length, cmd.error().message);
    reply_error(s, cmd.error());
    return true;
  }
  s.cmd = *cmd;
  if (s.cmd.type == NBD_CMD_CACHE) {
    reply_ok(s);  // advisory only (NBD proto.md "NBD_CMD_CACHE")
    return true;
  }
  return false;
}

// Page-cache reads and writes take microseconds: handing them to the pool
// and back costs two thread switches and a coroutine frame, more than the
// work itself, so they run on the connection's io thread (other connections
// keep the other io threads). Calls that wait for the disk (FLUSH, FUA,
// O_DIRECT images) and big transfers go to the pool so one connection's
// reader is not parked behind them. An inline call that turns out slow
// (page-cache miss, dirty-page throttling, a busy CPU) sends the next
// kPoolCredit requests of this connection to the pool, then inline is tried
// again: the connection adapts to whether its device is cache- or disk-bound.
bool Session::runs_inline(const Request& r) {
  if (!server_.options().inline_io || !export_->inline_io()) return false;
  if (pool_credit_ > 0) {
    --pool_credit_;
    return false;
  }
  if (r.flags & NBD_CMD_FLAG_FUA) return false;
  switch (r.type) {
    case NBD_CMD_READ: return r.length <= kInlineMaxRead;
    case NBD_CMD_WRITE: return r.length <= kInlineMaxWrite;
    case NBD_CMD_BLOCK_STATUS: return true;
    default: return false;
  }
}

void Session::execute_inline(Slot& s) {
  // Slow because the thread blocked (page-cache miss, dirty throttling, a
  // lock) shows as a voluntary context switch; slow because the CPU was
  // busy (preempted) does not, and the pool would not help then.
  rusage before{};
  ::getrusage(RUSAGE_THREAD, &before);
  const auto t0 = std::chrono::steady_clock::now();
  execute(s, true);
  if (std::chrono::steady_clock::now() - t0 > kSlowInline) {
    rusage after{};
    ::getrusage(RUSAGE_THREAD, &after);
    if (after.ru_nvcsw != before.ru_nvcsw) pool_credit_ = kPoolCredit;
  }
}

void Session::spawn_handle(Slot* s) {
  // handle() failing (it cannot, short of bad_alloc) would leave the slot
  // in flight forever and the reader waiting for it: log it, account the
  // slot as done and end the connection.
  auto self = shared_from_this();
  asio::co_spawn(socket_.get_executor(), handle(s), log_failure(fmt::format("conn {}: request", id_), [this, self, s] {
                   abort();
                   retire_slot(s);
                   wake_reader_.cancel();
                   wake_writer_.cancel();
                 }));
}

awaitable<void> Session::handle(Slot* s) {
  auto self = shared_from_this();
  if (!answer_without_device(*s)) {
    auto work = [this, s] { execute(*s, false); };
    co_await run_blocking(server_.pool(), work);
  }
  queue_reply(s);
}

// Runs on the blocking pool; touches only the slot and the (thread-safe) device.
void Session::execute(Slot& s, bool on_io_thread) {
  auto& dev = export_->device();
  const auto& r = s.cmd;
  const bool fua = r.fua();
  Result<void> res;
  switch (r.type) {
    case NBD_CMD_READ: return do_read(s, on_io_thread);
    case NBD_CMD_BLOCK_STATUS: return do_block_status(s);
    case NBD_CMD_WRITE: {
      const std::span<const std::byte> payload(s.data.data.get(), r.length);
      if (export_->detect_zeroes() != DetectZeroes::off && r.length && is_zero(payload)) {
        // As qemu's block layer does for detect-zeroes (bdrv_aligned_pwritev):
        // the same request as a write of zeroes, unmapping only with
        // detect-zeroes=unmap on an export whose discard is unmap.
        image::ZeroFlags zf;
        zf.may_unmap = export_->detect_zeroes() == DetectZeroes::unmap && export_->discard_unmap();
        zf.fua = fua;
        res = dev.write_zeroes(r.offset, r.length, zf);
      } else {
        res = dev.write(payload, r.offset, fua);
      }
      break;
    }
    case NBD_CMD_FLUSH: res = dev.flush(); break;
    case NBD_CMD_TRIM:
      // --discard=ignore (qemu-nbd's default): TRIM is a successful no-op.
      if (export_->discard_unmap() && r.length) {
        image::DiscardFlags df;
        df.skip_empty_spans = r.length > UINT32_MAX;  // as for WRITE_ZEROES below
        if (!in_steps(
                s,
                [&](std::uint64_t off, std::uint64_t len, bool last) {
                  df.fua = fua && last;
                  return dev.discard(off, len, df);
                },
                res))
          return;
      } else if (fua) {
        res = dev.flush();
      }
      break;
    case NBD_CMD_WRITE_ZEROES: {
      // Without NO_HOLE the device may release allocation (QEMU's
      // BDRV_REQ_MAY_UNMAP), whatever --discard says, as at qemu-nbd: a
      // raw image punches a hole; a qcow2 image drops the cluster from its
      // metadata, and gives its space back to the file system only with
      // --discard=unmap (pass-discard-request).
      image::ZeroFlags zf;
      zf.may_unmap = !r.no_hole();
      zf.fast_only = r.fast_zero();
      // Only an extended header carries a longer request; qemu-nbd 7.2
      // cannot receive one, so there is no allocation-depth map to match.
      zf.skip_empty_spans = r.length > UINT32_MAX;
      if (r.length && !in_steps(
                          s,
                          [&](std::uint64_t off, std::uint64_t len, bool last) {
                            zf.fua = fua && last;
                            return dev.write_zeroes(off, len, zf);
                          },
                          res))
        return;
      break;
    }
    default: break;
  }
  if (!res) {
    if (!(r.fast_zero() && res.error().code == ENOTSUP))
      log::warn("conn {}: {} offset {} length {}: {}", id_, command_name(r.type), r.offset, r.length,
                res.error().message);
    return reply_error(s, res.error());
  }
  reply_ok(s);
}

// A WRITE_ZEROES or TRIM may cover a whole export (64-bit lengths with
// extended headers: 1 PiB in one request), which can take hours: run it in
// steps at multiples of kLongRequestStep and stop between steps when the
// server shuts down, answering NBD_ESHUTDOWN (NBD proto.md section "Error
// values": the server is shutting down) for the part not done. Returns
// false when it answered the request itself.
template <typename Step>
bool Session::in_steps(Slot& s, Step&& step, Result<void>& res) {
  const auto& r = s.cmd;
  const std::uint64_t end = r.offset + r.length;
  for (std::uint64_t pos = r.offset; pos < end;) {
    if (server_.shutting_down() || export_->retiring()) {
      log::info("conn {}: {} offset {} length {} cut short at {}: {}", id_, command_name(r.type), r.offset, r.length,
                pos, export_->retiring() ? "export is being removed" : "server is shutting down");
      reply_error(s, Error{ESHUTDOWN, "server is shutting down"});
      return false;
    }
    const std::uint64_t next = std::min(end, (pos / Server::kLongRequestStep + 1) * Server::kLongRequestStep);
    res = step(pos, next - pos, next == end);
    if (!res) return true;
    pos = next;
  }
  return true;
}

// A READ's data parts are either read into the slot's buffer or, inline on
// a plain connection where the device lends its host file (host_run), put
// into the connection's splice pipe as page-cache pages: the payload then
// reaches the socket without being copied by this process (fio's 1 MiB
// sequential reads: two copies per byte before, one by the kernel for the
// client after). A pooled READ (a page-cache miss, a big request) never
// touches the pipe, which belongs to the io thread.
void Session::do_read(Slot& s, bool on_io_thread) {
  auto& dev = export_->device();
  const auto& r = s.cmd;
  if (s.data.capacity < r.length) {
    buffer_pool().put(std::move(s.data));
    s.data = buffer_pool().get(r.length);
  }
  std::byte* buf = s.data.data.get();
  ReadPlan plan;
  plan.reset(r, neg_.mode);
  if (plan.sparse()) {
    s.extents.resize(ReadPlan::kMaxExtents);
    // A device that cannot tell is read in full (the plan sends data).
    if (auto bs = dev.block_status(r.offset, r.length, s.extents); bs)
      for (std::size_t i = 0; i < *bs && plan.add(s.extents[i].length, s.extents[i].zero); ++i) {
      }
  }
  plan.finish();
  const bool splice = on_io_thread && zero_copy_;
  // The payload of [at, at + len) of the request, as pieces after its chunk header.
  auto payload = [&](std::size_t at, std::size_t len) -> Result<void> {
    while (len > 0) {
      std::size_t n = len;
      if (splice && len >= kSpliceMinBytes) {
        const image::HostRun run = QNBD_TRY(dev.host_run(r.offset + at, len));
        n = static_cast<std::size_t>(std::clamp<std::uint64_t>(run.length, 1, len));
        if (run.fd >= 0) {
          if (const std::size_t moved = splice_in(run.fd, run.host_offset, n); moved > 0) {
            // Consecutive pipe pieces leave in one splice.
            if (!s.pieces.empty() && s.pieces.back().source == Piece::Source::pipe)
              s.pieces.back().length += moved;
            else
              s.pieces.push_back({Piece::Source::pipe, 0, moved});
            at += moved;
            len -= moved;
            continue;
          }
        }
      }
      QNBD_TRY(dev.read(std::span(buf + at, n), r.offset + at));
      s.pieces.push_back({Piece::Source::data, at, n});
      at += n;
      len -= n;
    }
    return ok();
  };
  const auto parts = plan.parts();
  for (std::size_t i = 0; i < plan.chunk_count(); ++i) {
    auto from = s.meta.size();
    s.meta.resize(from + kMaxChunkPrefix);
    s.meta.resize(from + plan.encode_chunk(i, std::span(s.meta).subspan(from)));
    s.add_meta(from);
    if (i >= parts.size() || parts[i].hole) continue;
    if (auto res = payload(parts[i].offset, parts[i].length); !res) {
      log::warn("conn {}: READ offset {} length {}: {}", id_, r.offset + parts[i].offset, parts[i].length,
                res.error().message);
      return reply_error(s, res.error());
    }
  }
}

void Session::do_block_status(Slot& s) {
  auto& dev = export_->device();
  const auto& r = s.cmd;
  auto& plan = s.status;
  plan.reset(r, neg_.mode, wire_contexts_);
  // REQ_ONE keeps one extent per context: asking the engine for up to 1024
  // (each an L2 lookup on qcow2) cost ~100 us per request on a fragmented
  // image, and QEMU's client sends REQ_ONE always. Ask for two (the engine
  // merges equal neighbours, and the second usually ends the first list);
  // the loop asks again while a context's extent is still growing.
  const std::size_t batch = r.req_one() ? 2 : 1024;
  s.extents.resize(batch);
  while (plan.allocation_open()) {
    const auto pos = plan.allocation_pos();
    auto bs = dev.block_status(r.offset + pos, r.length - pos, s.extents);
    if (!bs) {
      log::warn("conn {}: BLOCK_STATUS offset {}: {}", id_, r.offset + pos, bs.error().message);
      if (pos == 0) return reply_error(s, bs.error());
      break;
    }
    for (std::size_t i = 0; i < *bs; ++i) {
      const auto& e = s.extents[i];
      if (!plan.add_allocation(e.length, e.allocated, e.zero, e.depth)) break;
    }
    if (plan.allocation_pos() == pos) break;  // the device made no progress
  }
  // qemu:dirty-bitmap:NAME contexts: runs at the bitmap's granularity.
  for (std::size_t k = 0; k < contexts_.size(); ++k) {
    if (!plan.bitmap_open(k)) continue;
    s.bitmap_extents.resize(batch);
    while (plan.bitmap_open(k)) {
      const auto pos = plan.bitmap_pos(k);
      auto bs = dev.bitmap_status(contexts_[k].bitmap_handle, r.offset + pos, r.length - pos, s.bitmap_extents);
      if (!bs) {
        log::warn("conn {}: BLOCK_STATUS {} offset {}: {}", id_, contexts_[k].name, r.offset + pos, bs.error().message);
        if (pos == 0) return reply_error(s, bs.error());
        break;
      }
      for (std::size_t i = 0; i < *bs; ++i)
        if (!plan.add_bitmap(k, s.bitmap_extents[i].length, s.bitmap_extents[i].dirty)) break;
      if (plan.bitmap_pos(k) == pos) break;  // the device made no progress
    }
  }
  auto from = s.meta.size();
  if (auto done = plan.append_chunks(s.meta); !done) return reply_error(s, done.error());
  s.add_meta(from);
}

}  // namespace qnbd::server
