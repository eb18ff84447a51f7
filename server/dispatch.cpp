// Dispatch: a received request to the export's BlockDevice. Refusals and
// CACHE are answered without the device; the rest runs inline on the io
// thread or on the blocking pool (runs_inline); execute() does the call,
// do_read plans the structured-read chunks, do_block_status the extent
// lists of the selected metadata contexts.
#include "server/internal.hpp"

#include <sys/resource.h>

#include <array>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"
#include "protocol/constants.hpp"

namespace qnbd::server {

bool Session::answer_without_device(Slot& s) {
  s.meta.clear();
  s.pieces.clear();
  auto v = validate_request(s.req, vctx_);
  if (stopping_ && !v.error) v = {NBD_ESHUTDOWN, "server is shutting down"};
  if (v.error) {
    log::debug("conn {}: {} cookie {:#x} offset {} length {} refused: {}", id_, command_name(s.req.type),
               s.req.cookie, s.req.offset, s.req.length, v.message);
    reply_error(s, v.error, v.message);
    return true;
  }
  if (s.req.type == NBD_CMD_CACHE) {
    reply_ok(s);  // advisory only (§11.6)
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
    case NBD_CMD_READ:
    case NBD_CMD_WRITE: return r.length <= kInlineMaxLength;
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
  execute(s);
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
    inflight_--;
    inflight_bytes_ -= s->charged_bytes;
    put_slot(s);
    wake_reader_.cancel();
    wake_writer_.cancel();
  }));
}

awaitable<void> Session::handle(Slot* s) {
  auto self = shared_from_this();
  if (!answer_without_device(*s)) {
    auto work = [this, s] { execute(*s); };
    co_await run_blocking(server_.pool(), work);
  }
  queue_reply(s);
}


// Runs on the blocking pool; touches only the slot and the (thread-safe) device.
void Session::execute(Slot& s) {
  auto& dev = export_->device();
  const auto& r = s.req;
  const bool fua = r.flags & NBD_CMD_FLAG_FUA;
  Result<void> res;
  switch (r.type) {
    case NBD_CMD_READ: return do_read(s);
    case NBD_CMD_BLOCK_STATUS: return do_block_status(s);
    case NBD_CMD_WRITE:
      res = dev.write(std::span<const std::byte>(s.data.data.get(), r.length), r.offset, fua);
      break;
    case NBD_CMD_FLUSH: res = dev.flush(); break;
    case NBD_CMD_TRIM:
      // --discard=ignore (qemu-nbd's default): TRIM is a successful no-op.
      if (export_->discard_unmap() && r.length) {
        if (!in_steps(s, [&](std::uint64_t off, std::uint64_t len, bool last) {
              return dev.discard(off, len, fua && last);
            }, res))
          return;
      } else if (fua) {
        res = dev.flush();
      }
      break;
    case NBD_CMD_WRITE_ZEROES: {
      image::ZeroFlags zf;
      zf.may_unmap = !(r.flags & NBD_CMD_FLAG_NO_HOLE) && export_->discard_unmap();
      zf.fast_only = r.flags & NBD_CMD_FLAG_FAST_ZERO;
      if (r.length && !in_steps(s, [&](std::uint64_t off, std::uint64_t len, bool last) {
            zf.fua = fua && last;
            return dev.write_zeroes(off, len, zf);
          }, res))
        return;
      break;
    }
    default: break;
  }
  if (!res) {
    bool fast = r.flags & NBD_CMD_FLAG_FAST_ZERO;
    if (!(fast && res.error().code == ENOTSUP))
      log::warn("conn {}: {} offset {} length {}: {}", id_, command_name(r.type), r.offset, r.length,
                res.error().message);
    return reply_error(s, errno_to_nbd(res.error().code, fast), res.error().message);
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
  const auto& r = s.req;
  const std::uint64_t end = r.offset + r.length;
  for (std::uint64_t pos = r.offset; pos < end;) {
    if (server_.shutting_down()) {
      log::info("conn {}: {} offset {} length {} cut short at {}: server is shutting down", id_,
                command_name(r.type), r.offset, r.length, pos);
      reply_error(s, NBD_ESHUTDOWN, "server is shutting down");
      return false;
    }
    const std::uint64_t next = std::min(end, (pos / Server::kLongRequestStep + 1) * Server::kLongRequestStep);
    res = step(pos, next - pos, next == end);
    if (!res) return true;
    pos = next;
  }
  return true;
}

void Session::do_read(Slot& s) {
  auto& dev = export_->device();
  const auto& r = s.req;
  const auto mode = neg_.mode;
  if (s.data.capacity < r.length) {
    buffer_pool().put(std::move(s.data));
    s.data = buffer_pool().get(r.length);
  }
  std::byte* buf = s.data.data.get();
  if (r.length == 0) {
    // Zero-length read: nothing to send but the completion (spec leaves it open).
    if (mode == ReplyMode::simple) return reply_ok(s);
    auto from = s.meta.size();
    s.meta.resize(from + kMaxChunkPrefix);
    s.meta.resize(from + encode_none(std::span(s.meta).subspan(from), mode, r.cookie, r.offset));
    return s.add_meta(from);
  }
  const bool sparse = mode != ReplyMode::simple && !(r.flags & NBD_CMD_FLAG_DF);
  if (!sparse) {
    auto res = dev.read(std::span(buf, r.length), r.offset);
    if (!res) {
      log::warn("conn {}: READ offset {} length {}: {}", id_, r.offset, r.length, res.error().message);
      return reply_error(s, errno_to_nbd(res.error().code), res.error().message);
    }
    auto from = s.meta.size();
    s.meta.resize(from + kMaxChunkPrefix);
    std::size_t n = mode == ReplyMode::simple
                        ? encode_simple_reply(std::span(s.meta).subspan(from), 0, r.cookie)
                        : encode_offset_data(std::span(s.meta).subspan(from), mode, NBD_REPLY_FLAG_DONE,
                                             r.cookie, r.offset, r.offset, r.length);
    s.meta.resize(from + n);
    s.add_meta(from);
    s.pieces.push_back({true, 0, r.length});
    return;
  }
  // Structured READ: zero ranges go out as OFFSET_HOLE chunks (§11.1), so
  // holes cost neither disk reads nor bandwidth.
  constexpr std::size_t kMaxReadExtents = 64;
  s.extents.resize(kMaxReadExtents);
  std::size_t n_ext = 0;
  if (auto bs = dev.block_status(r.offset, r.length, s.extents); bs) n_ext = *bs;
  struct Part { std::uint64_t off, len; bool hole; };
  std::array<Part, kMaxReadExtents + 1> parts;
  std::size_t n_parts = 0;
  std::uint64_t pos = 0;
  for (std::size_t i = 0; i < n_ext && pos < r.length; ++i) {
    auto len = std::min(s.extents[i].length, r.length - pos);
    if (len == 0) break;
    bool hole = s.extents[i].zero;
    if (n_parts && parts[n_parts - 1].hole == hole) parts[n_parts - 1].len += len;
    else parts[n_parts++] = {pos, len, hole};
    pos += len;
  }
  if (pos < r.length) {
    if (n_parts && !parts[n_parts - 1].hole) parts[n_parts - 1].len += r.length - pos;
    else parts[n_parts++] = {pos, r.length - pos, false};
  }
  for (std::size_t i = 0; i < n_parts; ++i) {
    if (parts[i].hole) continue;
    auto res = dev.read(std::span(buf + parts[i].off, parts[i].len), r.offset + parts[i].off);
    if (!res) {
      log::warn("conn {}: READ offset {} length {}: {}", id_, r.offset + parts[i].off, parts[i].len,
                res.error().message);
      return reply_error(s, errno_to_nbd(res.error().code), res.error().message);
    }
  }
  for (std::size_t i = 0; i < n_parts; ++i) {
    const std::uint16_t flags = i + 1 == n_parts ? NBD_REPLY_FLAG_DONE : 0;
    auto from = s.meta.size();
    s.meta.resize(from + kMaxChunkPrefix);
    std::size_t n;
    if (parts[i].hole) {
      n = encode_offset_hole(std::span(s.meta).subspan(from), mode, flags, r.cookie, r.offset,
                             r.offset + parts[i].off, static_cast<std::uint32_t>(parts[i].len));
      s.meta.resize(from + n);
      s.add_meta(from);
    } else {
      n = encode_offset_data(std::span(s.meta).subspan(from), mode, flags, r.cookie, r.offset,
                             r.offset + parts[i].off, parts[i].len);
      s.meta.resize(from + n);
      s.add_meta(from);
      s.pieces.push_back({true, parts[i].off, parts[i].len});
    }
  }
}

void Session::do_block_status(Slot& s) {
  auto& dev = export_->device();
  const auto& r = s.req;
  const auto mode = neg_.mode;
  std::uint64_t length = r.length;
  // Which contexts to report: all selected, or the payload's filter (§11.8).
  // contexts_ holds at most kMaxContexts (Export::resolve_contexts).
  std::array<bool, kMaxContexts> want{};
  const auto& ctxs = contexts_;
  const std::size_t nctx = ctxs.size();
  if (r.flags & NBD_CMD_FLAG_PAYLOAD_LEN) {
    const std::byte* p = s.data.data.get();
    const auto plen = r.payload_length;
    if (plen < 8 || (plen - 8) % 4 != 0 || (plen - 8) / 4 == 0 || (plen - 8) / 4 > nctx)
      return reply_error(s, NBD_EINVAL, "malformed block status payload");
    length = load_be64(p);
    for (std::uint64_t i = 0; i < (plen - 8) / 4; ++i) {
      auto id = load_be32(p + 8 + 4 * i);
      std::size_t k = 0;
      while (k < nctx && ctxs[k].id != id) ++k;
      if (k == nctx || want[k]) return reply_error(s, NBD_EINVAL, "unknown or duplicate context id");
      want[k] = true;
    }
    if (!range_within(r.offset, length, vctx_.export_size))
      return reply_error(s, NBD_EINVAL, "request beyond end of export");
  } else {
    for (std::size_t k = 0; k < nctx; ++k) want[k] = true;
  }
  if (length == 0) return reply_error(s, NBD_EINVAL, "zero-length block status");
  const bool req_one = r.flags & NBD_CMD_FLAG_REQ_ONE;
  s.lists.resize(nctx);
  for (std::size_t k = 0; k < nctx; ++k)
    s.lists[k].reset(req_one ? 1 : kMaxExtentsPerChunk, max_extent_length(mode));
  std::array<bool, kMaxContexts> stopped{};
  bool any_active = false;
  for (std::size_t k = 0; k < nctx; ++k) {
    // Bitmaps have their own walk below.
    if (ctxs[k].kind == ContextKind::dirty_bitmap) stopped[k] = true;
    else if (want[k]) any_active = true;
  }
  // REQ_ONE keeps one extent per context: asking the engine for up to 1024
  // (each an L2 lookup on qcow2) cost ~100 us per request on a fragmented
  // image, and QEMU's client sends REQ_ONE always. Ask for two (the engine
  // merges equal neighbours, and the second usually ends the first list);
  // the loop asks again while a context's extent is still growing.
  const std::size_t batch = req_one ? 2 : 1024;
  s.extents.resize(batch);
  std::uint64_t pos = 0;
  while (pos < length && any_active) {
    auto bs = dev.block_status(r.offset + pos, length - pos, s.extents);
    if (!bs) {
      log::warn("conn {}: BLOCK_STATUS offset {}: {}", id_, r.offset + pos, bs.error().message);
      if (pos == 0) return reply_error(s, errno_to_nbd(bs.error().code), bs.error().message);
      break;
    }
    if (*bs == 0) break;
    for (std::size_t i = 0; i < *bs && any_active; ++i) {
      const auto& e = s.extents[i];
      auto len = std::min(e.length, length - pos);
      if (len == 0) break;
      any_active = false;
      for (std::size_t k = 0; k < nctx; ++k) {
        if (!want[k] || stopped[k]) continue;
        std::uint32_t flags = 0;
        switch (ctxs[k].kind) {
          case ContextKind::base_allocation:
            flags = (e.allocated ? 0 : NBD_STATE_HOLE) | (e.zero ? NBD_STATE_ZERO : 0);
            break;
          case ContextKind::allocation_depth: flags = e.depth; break;
          case ContextKind::dirty_bitmap: flags = 0; break;
        }
        // REQ_ONE keeps one extent, but as long as equal neighbours make it
        // (what qemu-nbd answers); add() refuses the first different one.
        if (!s.lists[k].add(len, flags)) stopped[k] = true;
        else any_active = true;
      }
      pos += len;
    }
  }
  // qemu:dirty-bitmap:NAME contexts: runs at the bitmap's granularity.
  for (std::size_t k = 0; k < nctx; ++k) {
    if (!want[k] || ctxs[k].kind != ContextKind::dirty_bitmap) continue;
    const auto handle = ctxs[k].bitmap_handle;
    s.bitmap_extents.resize(batch);
    std::uint64_t bpos = 0;
    bool active = true;
    while (bpos < length && active) {
      auto bs = dev.bitmap_status(handle, r.offset + bpos, length - bpos, s.bitmap_extents);
      if (!bs) {
        log::warn("conn {}: BLOCK_STATUS {} offset {}: {}", id_, ctxs[k].name, r.offset + bpos, bs.error().message);
        if (bpos == 0) return reply_error(s, errno_to_nbd(bs.error().code), bs.error().message);
        break;
      }
      if (*bs == 0) break;
      for (std::size_t i = 0; i < *bs; ++i) {
        auto len = std::min(s.bitmap_extents[i].length, length - bpos);
        if (len == 0) break;
        if (!s.lists[k].add(len, s.bitmap_extents[i].dirty ? NBD_STATE_DIRTY : 0)) {
          active = false;
          break;
        }
        bpos += len;
      }
    }
  }
  std::size_t last = nctx;
  for (std::size_t k = 0; k < nctx; ++k)
    if (want[k] && !s.lists[k].extents().empty()) last = k;
  if (last == nctx) return reply_error(s, NBD_EIO, "no block status available");
  for (std::size_t k = 0; k < nctx; ++k) {
    if (!want[k] || s.lists[k].extents().empty()) continue;
    auto from = s.meta.size();
    append_block_status_chunk(s.meta, mode, k == last ? NBD_REPLY_FLAG_DONE : 0, r.cookie, r.offset, ctxs[k].id,
                              s.lists[k].extents());
    s.add_meta(from);
  }
}

}  // namespace qnbd::server
