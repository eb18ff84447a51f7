// The reply side of a session: reply_ok / reply_error encode a slot's
// reply; the reader sends the replies of its inline requests itself when
// the socket takes them at once (send_ready_now), queue_reply hands a
// pooled slot to the writer coroutine, which sends what is left. On a plain
// connection both go through send_some (memory pieces by sendmsg, a
// zero-copy READ's payload by splice from the connection's pipe, which
// splice_in filled, or by read and send where that splice is refused);
// over TLS the writer sends through Stream. Each reply
// (all its chunks) goes out in order and whole before the next, so chunks
// of different requests never interleave (NBD proto.md section
// "Structured reply chunk message").
#include "server/internal.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <climits>
#include <cstring>
#include <tuple>
#include <utility>

#include "common/log.hpp"
#include "protocol/constants.hpp"

namespace qnbd::server {
namespace {

// What splice answers where the kernel, a file system or a sandbox's
// system-call filter does not do it for these descriptors (as opposed to a
// full pipe or socket, or an I/O error).
bool splice_refused(int err) { return err == EINVAL || err == EOPNOTSUPP || err == ENOSYS || err == EPERM; }

}  // namespace

awaitable<void> Session::writer() {
  auto self = shared_from_this();
  // TLS: replies finished while a write was in progress go out together in
  // one gathered write (fewer records and syscalls under load); each
  // reply's chunks stay contiguous, so chunks of different requests never
  // interleave.
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
    if (write_failed_) {
      // The connection is over: drop what was not sent.
      while (!ready_.empty()) {
        retire_slot(ready_.front());
        ready_.pop_front();
      }
      head_sent_ = 0;
    } else if (!stream_.tls()) {
      // The reader may have sent part of it already (send_ready_now).
      const auto st = send_some();
      boost::system::error_code ec;
      if (st == SendStatus::would_block) {
        writer_writing_ = true;
        std::tie(ec) = co_await socket_.async_wait(Socket::wait_write, use_tuple);
        writer_writing_ = false;
      }
      if (st == SendStatus::failed || ec) {
        log::debug("conn {}: write failed: {}", id_, ec ? ec.message() : std::string(std::strerror(errno)));
        write_failed_ = true;
        read_cancel_.emit(asio::cancellation_type::terminal);
      }
    } else {
      batch.clear();
      iov.clear();
      while (!ready_.empty() && batch.size() < kMaxBatch) {
        Slot* s = ready_.front();
        ready_.pop_front();
        batch.push_back(s);
        for (const auto& p : s->pieces) iov.emplace_back(s->piece_bytes(p), p.length);  // no pipe pieces over TLS
      }
      writer_writing_ = true;
      auto [ec, n] = co_await stream_.write(iov);
      writer_writing_ = false;
      if (ec) {
        log::debug("conn {}: write failed: {}", id_, ec.message());
        write_failed_ = true;
        read_cancel_.emit(asio::cancellation_type::terminal);
      }
      for (Slot* s : batch) retire_slot(s);
    }
    wake_reader_.cancel();
  }
  writer_done_ = true;
  wake_reader_.cancel();
}

// The reader, about to wait for the socket (or for in-flight room), sends
// the replies its inline requests finished, itself, without waiting: at
// queue depth 1 the writer's wake-up, a speculative read that finds nothing
// and a reactor pass stood between a request and its reply (QEMU's REQ_ONE
// block status is one request per round trip). Whatever the socket does
// not take at once is left to the writer, which also keeps TLS. Replies of
// one batch still go out in one gathered call: the reader comes here only
// when no complete request is left in its buffer.
void Session::send_ready_now() {
  if (ready_.empty()) return;
  if (writer_writing_ || write_failed_ || stream_.tls()) {
    wake_writer_.cancel();
    return;
  }
  // An error is left to the writer too: it meets it again and ends the
  // connection its usual way.
  if (send_some() != SendStatus::all_sent) wake_writer_.cancel();
}

Session::SendStatus Session::send_some() {
  const int sock = socket_.native_handle();
  while (!ready_.empty()) {
    Slot* front = ready_.front();
    if (head_sent_ == 0 && front->pipe_junk > 0) {
      // Pages of a READ that failed after part of it was spliced: they sit
      // in the pipe right before this reply's own bytes would.
      std::array<char, 16384> scratch;
      const ssize_t n = ::read(pipe_r_, scratch.data(), std::min(scratch.size(), front->pipe_junk));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return SendStatus::failed;
      front->pipe_junk -= static_cast<std::size_t>(n);
      pipe_queued_ -= static_cast<std::size_t>(n);
      continue;
    }
    // The first unsent piece of the front reply.
    std::size_t k = 0, skip = head_sent_;
    while (k < front->pieces.size() && skip >= front->pieces[k].length) skip -= front->pieces[k++].length;
    if (k == front->pieces.size()) return SendStatus::failed;  // head_sent_ past its reply: cannot happen
    if (front->pieces[k].source == Piece::Source::pipe) {
      const std::size_t want = front->pieces[k].length - skip;
      if (!splice_out_) {
        if (const auto st = send_pipe_copied(sock, want); st != SendStatus::all_sent) return st;
        continue;
      }
      const ssize_t n = ::splice(pipe_r_, nullptr, sock, nullptr, want, SPLICE_F_NONBLOCK);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && splice_refused(errno)) {
        log::debug("conn {}: splice to the socket refused ({}): READs are copied", id_, std::strerror(errno));
        splice_out_ = false;
        zero_copy_ = false;
        continue;
      }
      if (n < 0) return errno == EAGAIN ? SendStatus::would_block : SendStatus::failed;
      if (n == 0) return SendStatus::failed;  // the pipe holds these bytes: cannot happen
      pipe_queued_ -= static_cast<std::size_t>(n);
      sent(static_cast<std::size_t>(n));
      continue;
    }
    // Memory pieces from there on, across replies, up to the next pipe
    // piece (or a reply whose junk must leave the pipe first).
    direct_iov_.clear();
    std::size_t total = 0;
    bool before_pipe = false, full = false;
    for (auto it = ready_.begin(); it != ready_.end() && !before_pipe && !full; ++it) {
      Slot* s = *it;
      const bool first = it == ready_.begin();
      if (!first && s->pipe_junk) break;
      for (std::size_t i = first ? k : 0, off = first ? skip : 0; i < s->pieces.size(); ++i, off = 0) {
        const Piece& p = s->pieces[i];
        if (p.source == Piece::Source::pipe) {
          before_pipe = true;
          break;
        }
        if (direct_iov_.size() == IOV_MAX) {
          full = true;
          break;
        }
        direct_iov_.push_back({const_cast<std::byte*>(s->piece_bytes(p)) + off, p.length - off});
        total += p.length - off;
      }
    }
    msghdr msg{};
    msg.msg_iov = direct_iov_.data();
    msg.msg_iovlen = direct_iov_.size();
    // MSG_MORE: the spliced payload follows at once (TCP sends one segment).
    const ssize_t rc = ::sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL | (before_pipe ? MSG_MORE : 0));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? SendStatus::would_block : SendStatus::failed;
    sent(static_cast<std::size_t>(rc));
    if (static_cast<std::size_t>(rc) < total) return SendStatus::would_block;
    if (total == 0 && ready_.front() == front && head_sent_ == 0 && !before_pipe)
      return SendStatus::failed;  // no progress possible: cannot happen
  }
  return SendStatus::all_sent;
}

// Up to `want` bytes of the front reply's pipe piece, by read from the
// pipe and send (splice to the socket refused); all_sent: progress made,
// the caller goes on.
Session::SendStatus Session::send_pipe_copied(int sock, std::size_t want) {
  if (spill_pos_ == spill_end_) {
    if (!spill_) spill_ = std::make_unique_for_overwrite<std::byte[]>(kSpillBytes);
    ssize_t n;
    do n = ::read(pipe_r_, spill_.get(), std::min(want, kSpillBytes));
    while (n < 0 && errno == EINTR);
    if (n <= 0) return SendStatus::failed;  // the pipe holds these bytes: cannot happen
    pipe_queued_ -= static_cast<std::size_t>(n);
    spill_pos_ = 0;
    spill_end_ = static_cast<std::size_t>(n);
  }
  // spill_ holds no more than `want`: it was read for this piece, and
  // every byte sent since left both.
  ssize_t n;
  do n = ::send(sock, spill_.get() + spill_pos_, spill_end_ - spill_pos_, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? SendStatus::would_block : SendStatus::failed;
  spill_pos_ += static_cast<std::size_t>(n);
  sent(static_cast<std::size_t>(n));
  return SendStatus::all_sent;
}

void Session::sent(std::size_t n) {
  head_sent_ += n;
  while (!ready_.empty()) {
    Slot* s = ready_.front();
    const std::size_t len = s->reply_bytes();
    if (head_sent_ < len || (len == 0 && s->pipe_junk)) break;
    head_sent_ -= len;
    ready_.pop_front();
    retire_slot(s);
  }
}

bool Session::open_splice_pipe() {
  int fds[2];
  if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
    log::debug("conn {}: no splice pipe ({}): READs are copied", id_, std::strerror(errno));
    zero_copy_ = false;
    return false;
  }
  // Pipes hold 64 KiB by default; a 1 MiB READ should fit whole. Beyond
  // fs.pipe-max-size (1 MiB by default) an unprivileged process is refused,
  // and past fs.pipe-user-pages-soft its pipes stay small: then READs are
  // copied, as before.
  int cap = ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(kSplicePipeBytes));
  if (cap < 0) cap = ::fcntl(fds[1], F_GETPIPE_SZ);
  if (cap < static_cast<int>(kMinSplicePipeBytes)) {
    log::debug("conn {}: splice pipe holds {} bytes: READs are copied", id_, cap);
    ::close(fds[0]);
    ::close(fds[1]);
    zero_copy_ = false;
    return false;
  }
  pipe_r_ = fds[0];
  pipe_w_ = fds[1];
  pipe_capacity_ = static_cast<std::size_t>(cap);
  return true;
}

std::size_t Session::splice_in(int fd, std::uint64_t host_offset, std::size_t length) {
  // zero_copy_ may have gone off since the READ began (a refusal).
  if (!zero_copy_ || (pipe_w_ < 0 && !open_splice_pipe())) return 0;
  // A full pipe is emptied into the socket first when it can be (fio's
  // 1 MiB reads at queue depth 8 arrive together; each fills the pipe).
  if (pipe_queued_ + length > pipe_capacity_ && pipe_queued_ > 0 && !writer_writing_ && !write_failed_) send_some();
  const std::size_t want = std::min(length, pipe_capacity_ - std::min(pipe_capacity_, pipe_queued_));
  loff_t off = static_cast<loff_t>(host_offset);
  std::size_t moved = 0;
  while (moved < want) {
    const ssize_t n = ::splice(fd, &off, pipe_w_, nullptr, want - moved, SPLICE_F_NONBLOCK);
    if (n > 0) {
      moved += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    // A file system that cannot splice: stop trying on this connection.
    if (n < 0 && splice_refused(errno)) zero_copy_ = false;
    // 0: end of file (a raw file that shrank); EAGAIN: the pipe's page
    // slots are used up (a range that is not page-aligned needs one more);
    // an I/O error: the caller's read() meets and reports it.
    break;
  }
  pipe_queued_ += moved;
  return moved;
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
  // What a failed zero-copy READ already put in the pipe stays there until
  // the sender drops it (Slot::pipe_junk).
  for (const auto& p : s.pieces)
    if (p.source == Piece::Source::pipe) s.pipe_junk += p.length;
  s.pieces.clear();
  s.meta.clear();
  append_error_reply(s.meta, neg_.mode, s.req, e);
  s.add_meta(0);
}

}  // namespace qnbd::server
