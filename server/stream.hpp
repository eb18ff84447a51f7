// Stream: what a session reads from and writes to. In clear it is the
// socket; after NBD_OPT_STARTTLS it is a TlsSession over the same socket,
// driven by waiting for socket readiness (the TLS calls never block).
//
// Threading: one reader and one writer coroutine at a time, both on the
// session's strand (Asio allows one read-wait and one write-wait at once).
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include <boost/asio.hpp>
#include <boost/asio/experimental/as_tuple.hpp>

#include "server/tls.hpp"

namespace qnbd::server {

class Stream {
 public:
  using Socket = boost::asio::generic::stream_protocol::socket;
  using ErrorCode = boost::system::error_code;
  explicit Stream(Socket& socket) : socket_(socket) {}

  bool tls() const { return tls_ != nullptr; }
  const TlsSession* tls_session() const { return tls_.get(); }
  // Decrypted bytes waiting inside TLS (socket readiness does not show them).
  std::size_t pending() const { return tls_ ? tls_->pending() : 0; }

  // TLS handshake as the server; false with `why` set if it failed (the
  // caller closes). The session's handshake deadline closes the socket,
  // which ends the wait here too.
  template <typename Slot>
  boost::asio::awaitable<bool> start_tls(std::shared_ptr<const TlsCredentials> creds, Slot slot, std::string& why) {
    auto t = TlsSession::create(std::move(creds), socket_.native_handle());
    if (!t) {
      why = t.error().message;
      co_return false;
    }
    ErrorCode ec;
    socket_.native_non_blocking(true, ec);
    tls_ = std::move(t).take();
    for (;;) {
      auto io = tls_->handshake();
      if (io.status == TlsSession::Status::done) co_return true;
      if (io.status == TlsSession::Status::error || io.status == TlsSession::Status::eof) {
        why = tls_->error().empty() ? "client left during the TLS handshake" : tls_->error();
        co_return false;
      }
      auto [wec] = co_await socket_.async_wait(
          io.status == TlsSession::Status::want_read ? Socket::wait_read : Socket::wait_write,
          boost::asio::bind_cancellation_slot(slot, boost::asio::as_tuple(boost::asio::use_awaitable)));
      if (wec) {
        why = "TLS handshake interrupted: " + wec.message();
        co_return false;
      }
    }
  }

  // Like socket.async_read_some: some bytes, or an error (eof at the end).
  template <typename Slot>
  boost::asio::awaitable<std::pair<ErrorCode, std::size_t>> read_some(boost::asio::mutable_buffer b, Slot slot) {
    namespace asio = boost::asio;
    if (!tls_) {
      auto [ec, n] =
          co_await socket_.async_read_some(b, asio::bind_cancellation_slot(slot, asio::as_tuple(asio::use_awaitable)));
      co_return std::pair{ec, n};
    }
    for (;;) {
      auto io = tls_->read(std::span(static_cast<std::byte*>(b.data()), b.size()));
      switch (io.status) {
        case TlsSession::Status::done: co_return std::pair{ErrorCode{}, io.n};
        case TlsSession::Status::eof: co_return std::pair{ErrorCode(asio::error::eof), std::size_t{0}};
        case TlsSession::Status::error: co_return std::pair{ErrorCode(asio::error::connection_aborted), std::size_t{0}};
        default: break;
      }
      auto [ec] = co_await socket_.async_wait(io.status == TlsSession::Status::want_read ? Socket::wait_read
                                                                                         : Socket::wait_write,
                                              asio::bind_cancellation_slot(slot, asio::as_tuple(asio::use_awaitable)));
      if (ec) co_return std::pair{ec, std::size_t{0}};
    }
  }

  // Read exactly b.size() bytes.
  template <typename Slot>
  boost::asio::awaitable<std::pair<ErrorCode, std::size_t>> read_exact(boost::asio::mutable_buffer b, Slot slot) {
    std::size_t got = 0;
    while (got < b.size()) {
      auto [ec, n] = co_await read_some(boost::asio::buffer(static_cast<char*>(b.data()) + got, b.size() - got), slot);
      got += n;
      if (ec) co_return std::pair{ec, got};
    }
    co_return std::pair{ErrorCode{}, got};
  }

  // Write all of a buffer sequence (like asio::async_write).
  template <typename Buffers>
  boost::asio::awaitable<std::pair<ErrorCode, std::size_t>> write(const Buffers& buffers) {
    namespace asio = boost::asio;
    if (!tls_) {
      auto [ec, n] = co_await asio::async_write(socket_, buffers, whole_sequence, asio::as_tuple(asio::use_awaitable));
      co_return std::pair{ec, n};
    }
    // Small pieces (reply headers, chunk metadata) are gathered so they go
    // out in one TLS record instead of one record and syscall each.
    std::size_t total = 0;
    out_.clear();
    for (auto it = asio::buffer_sequence_begin(buffers); it != asio::buffer_sequence_end(buffers); ++it) {
      asio::const_buffer piece(*it);
      auto p = static_cast<const std::byte*>(piece.data());
      total += piece.size();
      if (piece.size() < kGather) {
        out_.insert(out_.end(), p, p + piece.size());
        if (out_.size() < kGather) continue;
        if (auto ec = co_await flush(); ec) co_return std::pair{ec, std::size_t{0}};
        continue;
      }
      if (auto ec = co_await flush(); ec) co_return std::pair{ec, std::size_t{0}};
      if (auto ec = co_await send_all(std::span(p, piece.size())); ec) co_return std::pair{ec, std::size_t{0}};
    }
    if (auto ec = co_await flush(); ec) co_return std::pair{ec, std::size_t{0}};
    co_return std::pair{ErrorCode{}, total};
  }

  // Send close_notify when TLS is up (best effort, never waits).
  void bye() {
    if (tls_) tls_->bye();
  }

 private:
  static constexpr std::size_t kGather = 16u << 10;

  // asio::async_write's default condition (transfer_all) hands each
  // sendmsg at most 64 KiB (asio's default_max_transfer_size), so a 1 MiB
  // READ reply took 16 sendmsg calls and as many readiness waits. This one
  // offers the whole remaining sequence (up to asio's iovec count); the
  // kernel takes what the socket buffer holds.
  static constexpr auto whole_sequence = [](const ErrorCode& ec, std::size_t) -> std::size_t {
    return ec ? 0 : std::size_t{1} << 30;
  };

  boost::asio::awaitable<ErrorCode> flush() {
    auto ec = co_await send_all(std::span<const std::byte>(out_));
    out_.clear();
    co_return ec;
  }

  boost::asio::awaitable<ErrorCode> send_all(std::span<const std::byte> d) {
    namespace asio = boost::asio;
    while (!d.empty()) {
      auto io = tls_->write(d);
      if (io.status == TlsSession::Status::done) {
        d = d.subspan(io.n);
        continue;
      }
      if (io.status != TlsSession::Status::want_write && io.status != TlsSession::Status::want_read)
        co_return ErrorCode(asio::error::connection_aborted);
      auto [ec] = co_await socket_.async_wait(io.status == TlsSession::Status::want_write ? Socket::wait_write
                                                                                          : Socket::wait_read,
                                              asio::as_tuple(asio::use_awaitable));
      if (ec) co_return ec;
    }
    co_return ErrorCode{};
  }

  Socket& socket_;
  std::unique_ptr<TlsSession> tls_;
  std::vector<std::byte> out_;
};

}  // namespace qnbd::server
