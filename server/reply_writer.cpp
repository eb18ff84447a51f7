// The reply side of a session: reply_ok / reply_error encode a slot's
// reply, queue_reply hands a finished slot to the writer coroutine, which
// sends each ready reply (all its chunks) in one gathered write, so chunks
// of different requests never interleave (NBD proto.md section
// "Structured reply chunk message").
#include "server/internal.hpp"

#include "common/log.hpp"
#include "protocol/constants.hpp"

namespace qnbd::server {

awaitable<void> Session::writer() {
  auto self = shared_from_this();
  // Replies finished while a write was in progress go out together in one
  // gathered write (fewer syscalls under load); each reply's chunks stay
  // contiguous, so chunks of different requests never interleave.
  std::vector<Slot*> batch;
  std::vector<asio::const_buffer> iov;
  batch.reserve(kMaxBatch);
  for (;;) {
    if (ready_.empty()) {
      // Only the reader knows that no more requests can come.
      if (reader_done_ && inflight_ == 0) break;
      co_await wake_writer_.async_wait(use_tuple);
      continue;
    }
    batch.clear();
    iov.clear();
    while (!ready_.empty() && batch.size() < kMaxBatch) {
      Slot* s = ready_.front();
      ready_.pop_front();
      batch.push_back(s);
      for (const auto& p : s->pieces)
        iov.emplace_back(p.from_data ? static_cast<const void*>(s->data.data.get() + p.offset)
                                     : static_cast<const void*>(s->meta.data() + p.offset),
                         p.length);
    }
    if (!write_failed_) {
      auto [ec, n] = co_await asio::async_write(socket_, iov, use_tuple);
      if (ec) {
        log::debug("conn {}: write failed: {}", id_, ec.message());
        write_failed_ = true;
        read_cancel_.emit(asio::cancellation_type::terminal);
      }
    }
    for (Slot* s : batch) {
      inflight_--;
      inflight_bytes_ -= s->charged_bytes;
      put_slot(s);
    }
    wake_reader_.cancel();
  }
  writer_done_ = true;
  wake_reader_.cancel();
}

void Session::queue_reply(Slot* s) {
  ready_.push_back(s);
  wake_writer_.cancel();
}


void Session::reply_ok(Slot& s) {
  auto from = s.meta.size();
  s.meta.resize(from + kMaxChunkPrefix);
  std::size_t n;
  if (neg_.mode == ReplyMode::extended)
    n = encode_none(std::span(s.meta).subspan(from), neg_.mode, s.req.cookie, s.req.offset);
  else
    n = encode_simple_reply(std::span(s.meta).subspan(from), 0, s.req.cookie);
  s.meta.resize(from + n);
  s.add_meta(from);
}

void Session::reply_error(Slot& s, std::uint32_t nbd_error, std::string_view message) {
  s.pieces.clear();
  s.meta.clear();
  if (neg_.mode == ReplyMode::simple) {
    s.meta.resize(kSimpleReplySize);
    encode_simple_reply(s.meta, nbd_error, s.req.cookie);
  } else {
    append_error_chunk(s.meta, neg_.mode, NBD_REPLY_FLAG_DONE, s.req.cookie, s.req.offset, nbd_error, message);
  }
  s.add_meta(0);
}


}  // namespace qnbd::server
