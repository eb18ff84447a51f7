// Session: one client connection from accept to close. The handshake
// (Negotiator under a deadline), the reader (receive buffer, request
// headers, payloads into pooled slots) and its back-pressure (requests and
// bytes in flight). What a request does is dispatch.cpp's; how its reply
// leaves is reply_writer.cpp's.
#include "server/internal.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "common/log.hpp"
#include "protocol/constants.hpp"

namespace qnbd::server {

awaitable<void> Session::run() {
  auto self = shared_from_this();
  {
    // TCP peers SHOULD set TCP_NODELAY (proto.md "Protocol phases").
    boost::system::error_code ec;
    auto ep = socket_.local_endpoint(ec);
    if (!ec && (ep.protocol().family() == AF_INET || ep.protocol().family() == AF_INET6)) {
      int one = 1;
      ::setsockopt(socket_.native_handle(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
  }
  bool go = co_await handshake();
  // Refused TLS handshakes log their own reason; this is the client that
  // never sent STARTTLS (every option got NBD_REP_ERR_TLS_REQD).
  if (!go && tls_creds_ && !stream_.tls())
    log::warn("conn {}: ended without TLS (a plaintext client on a TLS listener)", id_);
  if (go) co_await transmission();
  stream_.bye();
  boost::system::error_code ec;
  socket_.shutdown(Socket::shutdown_both, ec);
  socket_.close(ec);
  log::debug("conn {}: closed", id_);
}

Session::~Session() {
  if (pipe_r_ >= 0) ::close(pipe_r_);
  if (pipe_w_ >= 0) ::close(pipe_w_);
}

void Session::abort() {
  write_failed_ = true;  // the writer drops what is left; the reader stops
  boost::system::error_code ec;
  socket_.cancel(ec);
  socket_.shutdown(Socket::shutdown_both, ec);
  read_cancel_.emit(asio::cancellation_type::terminal);
  wake_reader_.cancel();
  wake_writer_.cancel();
}

void Session::close() {
  abort();
  boost::system::error_code ec;
  socket_.close(ec);
}

void Session::release_export() {
  if (!export_) return;
  const Export* e = export_.get();
  export_.reset();
  server_.registry().detach(e, id_);
}

void Session::stop() {
  // Wake the reader (handshake or transmission); it answers whatever the
  // client already sent (NBD_REP_ERR_SHUTDOWN / NBD_ESHUTDOWN) and then
  // closes, instead of resetting a connection with unread data.
  stopping_ = true;
  read_cancel_.emit(asio::cancellation_type::terminal);
}

awaitable<bool> Session::handshake() {
  Negotiator neg(server_, tls_creds_ ? TlsMode::required : TlsMode::none);
  auto timeout = server_.options().handshake_timeout_seconds;
  std::weak_ptr<Session> weak = shared_from_this();
  if (timeout) {
    deadline_.expires_after(std::chrono::seconds(timeout));
    deadline_.async_wait([weak](boost::system::error_code ec) {
      if (ec) return;
      if (auto s = weak.lock()) {
        log::warn("conn {}: handshake timed out", s->id_);
        boost::system::error_code ignored;
        s->socket_.close(ignored);
      }
    });
  }
  std::array<std::byte, 4096> buf;
  for (;;) {
    auto a = neg.next();
    switch (a.kind) {
      case Action::Kind::send: {
        auto [ec, n] = co_await stream_.write(asio::buffer(a.data.data(), a.data.size()));
        if (ec) {
          deadline_.cancel();
          co_return false;
        }
        break;
      }
      case Action::Kind::need_bytes: {
        if (stopping_) {
          boost::system::error_code aec;
          if ((socket_.available(aec) == 0 && !stream_.pending()) || aec) {
            deadline_.cancel();
            co_return false;
          }
        }
        auto want = std::min(a.bytes, buf.size());
        auto [ec, n] = co_await stream_.read_some(asio::buffer(buf.data(), want), read_cancel_.slot());
        if (ec == asio::error::operation_aborted && n == 0 && stopping_) continue;
        if (ec) {
          deadline_.cancel();
          co_return false;
        }
        neg.feed(std::span<const std::byte>(buf.data(), n));
        break;
      }
      case Action::Kind::start_tls: {
        // The deadline armed above keeps running: it bounds the TLS
        // handshake too (a client stalling in it is cut off).
        std::string why;
        if (!co_await stream_.start_tls(tls_creds_, read_cancel_.slot(), why)) {
          deadline_.cancel();
          log::warn("conn {}: TLS refused: {}", id_, why);
          co_return false;
        }
        log::info("conn {}: TLS up, peer {}, {}", id_, stream_.tls_session()->peer(),
                  stream_.tls_session()->description());
        neg.tls_started();
        break;
      }
      case Action::Kind::close:
        deadline_.cancel();
        if (!neg.close_reason().empty()) log::info("conn {}: handshake ended: {}", id_, neg.close_reason());
        co_return false;
      case Action::Kind::start_transmission:
        deadline_.cancel();
        neg_ = neg.result();
        // The one lookup of the export and of the selected contexts' bitmap
        // handles; nothing later can fail to find them.
        // Attach to exactly the export negotiated (name and instance): one
        // removed meanwhile is gone, and its connection closes. The hooks
        // let a forced export-remove end this connection as a shutdown
        // would (stop: answer what was received, then close; abort: the
        // client did not take its replies in time).
        {
          ConnectionHooks hooks;
          hooks.stop = [weak] {
            if (auto s = weak.lock()) asio::post(s->get_executor(), [s] { s->stop(); });
          };
          hooks.abort = [weak] {
            if (auto s = weak.lock()) asio::post(s->get_executor(), [s] { s->abort(); });
          };
          export_ = server_.registry().attach(*neg_.export_info, id_, std::move(hooks));
        }
        if (!export_) {
          log::info("conn {}: export '{}' was removed during the handshake", id_, neg_.export_info->name);
          co_return false;
        }
        if (auto c = export_->resolve_contexts(neg_.contexts); c) {
          contexts_ = std::move(*c);
          for (const auto& sc : contexts_) wire_contexts_.push_back({sc.kind, sc.id});
        } else {
          log::error("conn {}: export '{}': {}", id_, export_->name(), c.error().message);
          co_return false;
        }
        vctx_.export_size = neg_.export_info->size;
        vctx_.transmission_flags = neg_.transmission_flags;
        vctx_.mode = neg_.mode;
        vctx_.has_contexts = !neg_.contexts.empty();
        vctx_.block_size_committed = neg_.block_size_committed;
        vctx_.min_block = neg_.min_block;
        vctx_.max_payload = neg_.max_payload;
        log::debug("conn {}: export '{}' mode {} flags {:#x} contexts {}", id_, neg_.export_info->name,
                   static_cast<int>(neg_.mode), neg_.transmission_flags, contexts_.size());
        // Even when stopping: the client may already have sent requests,
        // which transmission() answers with NBD_ESHUTDOWN.
        co_return true;
    }
  }
}

Slot* Session::get_slot() {
  if (free_slots_.empty()) {
    slots_.push_back(std::make_unique<Slot>());
    return slots_.back().get();
  }
  auto* s = free_slots_.back();
  free_slots_.pop_back();
  return s;
}

void Session::retire_slot(Slot* s) {
  inflight_--;
  inflight_bytes_ -= s->charged_bytes;
  s->pipe_junk = 0;
  s->meta.clear();
  s->pieces.clear();
  // Keep small buffers with the slot; give big ones back to the shared pool.
  if (s->data.capacity > (1u << 20)) buffer_pool().put(std::move(s->data));
  free_slots_.push_back(s);
}

bool Session::fill_now(std::size_t need) {
  if (stream_.tls()) return false;  // GnuTLS owns the socket's reads
  if (rpos_ > 0 && rend_ - rpos_ < need) {
    std::memmove(rbuf_.get(), rbuf_.get() + rpos_, rend_ - rpos_);
    rend_ -= rpos_;
    rpos_ = 0;
  }
  const ssize_t n = ::recv(socket_.native_handle(), rbuf_.get() + rend_, kRecvBufferSize - rend_, MSG_DONTWAIT);
  if (n > 0) rend_ += static_cast<std::size_t>(n);
  return rend_ - rpos_ >= need;
}

// Adaptive polling, as QEMU's event loop does for qemu-nbd (util/aio-posix.c,
// the iothread's poll-max-ns): a client that sends one request at a time
// (QEMU's REQ_ONE block status, a guest's queue-depth-1 reads) sends the
// next one a few microseconds after its reply, and sleeping in epoll and
// being woken for it costs more than that on a VM (qemu-img map of a
// fragmented image, 131,072 requests: 5.6 s sleeping, 3.6-4.3 s polling,
// qemu-nbd 5.6-6.3 s). So a connection with nothing in flight first looks
// for its next request without sleeping, for the PollWindow, which grows
// while the waits after it stay short and shrinks to 0 after long ones: an
// idle or slow client costs at most a few tens of microseconds of spinning.
// Never over TLS (GnuTLS reads the socket), nor with a single CPU online
// (the client could not run meanwhile), nor while another connection is in
// transmission on the same io thread (its requests would wait behind the
// spinning). The ceiling is ServerOptions::poll_max (--poll-max-ns).
void Session::poll_for_request(std::size_t need) {
  if (poll_.window().count() == 0) return;
  if (auto* n = server_.options().polls_started) n->fetch_add(1, std::memory_order_relaxed);
  const auto until = Clock::now() + poll_.window();
  while (!fill_now(need) && Clock::now() < until) {
  }
}

awaitable<boost::system::error_code> Session::fill(std::size_t need) {
  if (rpos_ > 0 && rend_ - rpos_ < need) {
    std::memmove(rbuf_.get(), rbuf_.get() + rpos_, rend_ - rpos_);
    rend_ -= rpos_;
    rpos_ = 0;
  }
  while (rend_ - rpos_ < need) {
    auto [ec, n] =
        co_await stream_.read_some(asio::buffer(rbuf_.get() + rend_, kRecvBufferSize - rend_), read_cancel_.slot());
    rend_ += n;
    if (ec) co_return ec;
  }
  co_return boost::system::error_code{};
}

awaitable<void> Session::transmission() {
  auto self = shared_from_this();
  // A writer that failed would leave the reader waiting for it: log it,
  // end the connection and let the reader finish.
  asio::co_spawn(socket_.get_executor(), writer(), log_failure(fmt::format("conn {}: writer", id_), [this, self] {
                   abort();
                   writer_done_ = true;
                   wake_reader_.cancel();
                 }));
  const auto hsize = request_header_size(neg_.mode);
  rbuf_ = std::make_unique_for_overwrite<std::byte[]>(kRecvBufferSize);
  if (!stream_.tls()) {
    // send_some's sendmsg and splice must never wait: the socket itself is
    // made non-blocking (splice has no per-call flag for the socket side).
    boost::system::error_code nbec;
    socket_.native_non_blocking(true, nbec);
    zero_copy_ = !nbec;
  }
  const auto& opts = server_.options();
  poll_ = PollWindow(opts.poll_max);
  transmitting_ = &server_.transmitting_on(asio::query(socket_.get_executor(), asio::execution::context));
  transmitting_->fetch_add(1, std::memory_order_relaxed);
  struct LeaveThread {
    std::atomic<unsigned>* n;
    ~LeaveThread() { n->fetch_sub(1, std::memory_order_relaxed); }
  } leave_thread{transmitting_};
  for (;;) {
    if (write_failed_) break;
    if (stopping_) {
      // Server shutdown: answer what the client already sent (with
      // NBD_ESHUTDOWN, proto.md "Terminating the transmission phase") so
      // closing does not reset the connection under unread data, but do not
      // wait for more.
      boost::system::error_code aec;
      auto avail = socket_.available(aec) + stream_.pending();
      if (aec || buffered() + avail < hsize) break;
    }
    // Before the reader waits, the replies it finished go out
    // (send_ready_now), unless more requests are already in the socket: then
    // they join this batch first, and their replies leave together.
    if (buffered() < hsize && !ready_.empty() && !fill_now(hsize)) send_ready_now();
    // Polling serves a client that sends one request per round trip; one
    // that sent a batch keeps its batches (a wake-up per batch, not a
    // spinning recv per request as they trickle in: fio 4 KiB random
    // writes at queue depth 32 measured 0.85-0.96 of the build without
    // polling, on a noisy machine).
    if (buffered() < hsize) {
      const unsigned batch = std::exchange(requests_since_empty_, 0);
      if (batch <= 1 && ready_.empty() && inflight_ == 0 && transmitting_->load(std::memory_order_relaxed) == 1)
        poll_for_request(hsize);
    }
    const bool waits = buffered() < hsize;
    const auto wait_start = waits ? Clock::now() : Clock::time_point{};
    auto ec = co_await fill(hsize);
    if (waits && !stream_.tls() && server_.may_poll()) poll_.after_wait(Clock::now() - wait_start);
    if (ec == asio::error::operation_aborted && stopping_) continue;
    if (ec) break;
    Request req;
    ++requests_since_empty_;
    auto st = parse_request_header(std::span(rbuf_.get() + rpos_, hsize), neg_.mode, neg_.max_payload, req);
    rpos_ += hsize;
    if (st == ParseStatus::bad_magic) {
      log::warn("conn {}: bad request magic, closing", id_);
      break;
    }
    if (st == ParseStatus::payload_too_large) {
      log::warn("conn {}: {} payload of {} bytes above maximum, closing", id_, command_name(req.type),
                req.payload_length);
      break;
    }
    if (req.type == NBD_CMD_DISC) {
      log::debug("conn {}: disconnect requested", id_);
      break;
    }
    // Backpressure: cap requests and bytes in flight (a lone big request is
    // always admitted when nothing else is in flight).
    std::uint64_t cost =
        req.payload_length + (req.type == NBD_CMD_READ ? std::min<std::uint64_t>(req.length, kMaxPayload) : 0);
    auto full = [&] {
      return inflight_ > 0 &&
             (inflight_ >= opts.max_inflight_requests || inflight_bytes_ + cost > opts.max_inflight_bytes);
    };
    while (full() && !write_failed_) {
      send_ready_now();  // may free the room itself
      if (!full()) break;
      co_await wake_reader_.async_wait(use_tuple);
    }
    if (write_failed_) break;
    Slot* s = get_slot();
    s->req = req;
    s->charged_bytes = cost;
    inflight_++;
    inflight_bytes_ += cost;
    if (req.payload_length) {
      if (s->data.capacity < req.payload_length) {
        buffer_pool().put(std::move(s->data));
        s->data = buffer_pool().get(req.payload_length);
      }
      // Payload is always consumed before replying, even for requests that
      // will be rejected, so the stream stays in sync (as qemu's
      // nbd_co_receive_request). What the receive buffer already holds is
      // copied; the rest is read in place.
      const std::size_t have = std::min<std::size_t>(buffered(), req.payload_length);
      std::memcpy(s->data.data.get(), rbuf_.get() + rpos_, have);
      rpos_ += have;
      boost::system::error_code ec2;
      if (have < req.payload_length) {
        send_ready_now();
        auto [e, n2] = co_await stream_.read_exact(asio::buffer(s->data.data.get() + have, req.payload_length - have),
                                                   read_cancel_.slot());
        ec2 = e;
      }
      if (ec2) {
        retire_slot(s);
        break;
      }
    }
    if (runs_inline(s->req)) {
      if (!answer_without_device(*s)) execute_inline(*s);
      ready_.push_back(s);  // sent by send_ready_now before the reader waits
    } else {
      spawn_handle(s);
    }
  }
  // Finish in-flight requests, then let the writer drain and exit.
  send_ready_now();
  stopping_ = true;
  reader_done_ = true;
  while (inflight_ > 0 && !write_failed_) co_await wake_reader_.async_wait(use_tuple);
  wake_writer_.cancel();
  while (!writer_done_) co_await wake_reader_.async_wait(use_tuple);
}

}  // namespace qnbd::server
