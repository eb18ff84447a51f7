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
      auto [ec, n] = co_await stream_.write(iov);
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
  s.meta.resize(from + encode_ok_reply(std::span(s.meta).subspan(from), neg_.mode, s.req.cookie, s.req.offset));
  s.add_meta(from);
}

// Every failure, refused or from the device, leaves through here.
void Session::reply_error(Slot& s, const Error& e) {
  s.pieces.clear();
  s.meta.clear();
  append_error_reply(s.meta, neg_.mode, s.req, e);
  s.add_meta(0);
}

}  // namespace qnbd::server
