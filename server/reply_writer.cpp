// The reply side of a session: reply_ok / reply_error encode a slot's
// reply; the reader sends the replies of its inline requests itself when
// the socket takes them at once (send_ready_now), queue_reply hands a
// pooled slot to the writer coroutine, which sends what is left. Each
// reply (all its chunks) goes out in order within one gathered write, so
// chunks of different requests never interleave (NBD proto.md section
// "Structured reply chunk message").
#include "server/internal.hpp"

#include <sys/socket.h>

#include <climits>
#include <utility>

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
      for (const auto& p : s->pieces) iov.emplace_back(s->piece_bytes(p), p.length);
    }
    // The reader sent the start of the first reply already (send_ready_now).
    for (std::size_t skip = std::exchange(head_sent_, 0), i = 0; skip > 0; ++i) {
      const std::size_t cut = std::min(skip, iov[i].size());
      iov[i] += cut;
      skip -= cut;
    }
    if (!write_failed_) {
      writer_writing_ = true;
      auto [ec, n] = co_await stream_.write(iov);
      writer_writing_ = false;
      if (ec) {
        log::debug("conn {}: write failed: {}", id_, ec.message());
        write_failed_ = true;
        read_cancel_.emit(asio::cancellation_type::terminal);
      }
    }
    for (Slot* s : batch) retire_slot(s);
    wake_reader_.cancel();
  }
  writer_done_ = true;
  wake_reader_.cancel();
}

// The reader, about to wait for the socket (or for in-flight room), sends
// the replies its inline requests finished, itself, in one sendmsg that
// never waits: at queue depth 1 the writer's wake-up, a speculative read
// that finds nothing and a reactor pass stood between a request and its
// reply (QEMU's REQ_ONE block status is one request per round trip).
// Whatever the socket does not take at once, or any error, is left to the
// writer, which also keeps TLS. Replies of one batch still go out in one
// gathered call: the reader comes here only when no complete request is
// left in its buffer.
void Session::send_ready_now() {
  if (ready_.empty()) return;
  if (writer_writing_ || write_failed_ || head_sent_ || stream_.tls()) {
    wake_writer_.cancel();
    return;
  }
  direct_iov_.clear();
  std::size_t slots = 0;
  for (Slot* s : ready_) {
    if (direct_iov_.size() + s->pieces.size() > IOV_MAX) break;
    for (const auto& p : s->pieces) direct_iov_.push_back({const_cast<std::byte*>(s->piece_bytes(p)), p.length});
    ++slots;
  }
  if (slots == 0) {
    wake_writer_.cancel();
    return;
  }
  msghdr msg{};
  msg.msg_iov = direct_iov_.data();
  msg.msg_iovlen = direct_iov_.size();
  const ssize_t rc = ::sendmsg(socket_.native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (rc < 0) {
    // EAGAIN: the writer waits for room; anything else: the writer meets
    // the same error and ends the connection its usual way.
    wake_writer_.cancel();
    return;
  }
  auto sent = static_cast<std::size_t>(rc);
  while (!ready_.empty()) {
    Slot* s = ready_.front();
    std::size_t len = 0;
    for (const auto& p : s->pieces) len += p.length;
    if (sent < len) break;
    sent -= len;
    ready_.pop_front();
    retire_slot(s);
  }
  head_sent_ = sent;
  if (!ready_.empty()) wake_writer_.cancel();
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
