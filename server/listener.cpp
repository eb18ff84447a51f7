// Listeners: TCP, Unix and systemd-inherited sockets, the accept loop with
// its connection cap, and the placement of a new connection on an io
// thread.
#include "server/internal.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <selinux/selinux.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/log.hpp"
#include "server/accept_backoff.hpp"
#include "server/unix_endpoint.hpp"

namespace qnbd::server {

Result<void> Server::add_acceptor(const asio::generic::stream_protocol::endpoint& ep, bool v6only,
                                  std::shared_ptr<const TlsCredentials> tls) {
  auto acc = std::make_unique<Acceptor>(strand_);
  boost::system::error_code ec;
  acc->open(ep.protocol(), ec);
  if (!ec) {
    acc->set_option(asio::socket_base::reuse_address(true), ec);
    if (v6only) {
      int one = 1;
      ::setsockopt(acc->native_handle(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    }
    acc->bind(ep, ec);
  }
  if (!ec) acc->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return make_error(ec.value(), "{}", ec.message());
  acceptors_.push_back(std::move(acc));
  acceptor_tls_.push_back(std::move(tls));
  return ok();
}

Result<void> Server::listen() {
  for (const auto& l : opts_.listeners) {
    switch (l.kind) {
      case ListenerSpec::Kind::tcp: {
        asio::ip::tcp::resolver resolver(ctx_);
        boost::system::error_code ec;
        auto results =
            resolver.resolve(l.host, std::to_string(l.port),
                             asio::ip::tcp::resolver::passive | asio::ip::tcp::resolver::numeric_service, ec);
        if (ec) return make_error(EINVAL, "cannot resolve '{}': {}", l.host, ec.message());
        bool any = false;
        for (const auto& r : results) {
          auto ep = r.endpoint();
          auto res = add_acceptor(asio::generic::stream_protocol::endpoint(ep), ep.address().is_v6(), l.tls);
          if (!res)
            return make_error(res.error().code, "cannot listen on {}:{}: {}", l.host, l.port, res.error().message);
          any = true;
        }
        if (!any) return make_error(EINVAL, "no address for '{}'", l.host);
        break;
      }
      case ListenerSpec::Kind::unix_socket: {
        if (auto cleared = clear_stale_socket(l.path); !cleared)
          return make_error(cleared.error().code, "cannot listen on {}: {}", l.path, cleared.error().message);
        auto uep = unix_endpoint(l.path);
        if (!uep) return uep.error();
        // The context applies to the sockets this thread creates until it
        // is cleared: set it around this one socket only, as qemu-nbd does.
        if (l.selinux_label && ::setsockcreatecon_raw(l.selinux_label->c_str()) == -1) {
          const int err = errno;
          return make_error(err, "Cannot set SELinux socket create context to {}: {}", *l.selinux_label,
                            std::strerror(err));
        }
        auto res = add_acceptor(asio::generic::stream_protocol::endpoint(*uep), false, l.tls);
        if (l.selinux_label && ::setsockcreatecon_raw(nullptr) == -1) {
          const int err = errno;
          return make_error(err, "Cannot clear SELinux socket create context: {}", std::strerror(err));
        }
        if (!res) return make_error(res.error().code, "cannot listen on {}: {}", l.path, res.error().message);
        unix_paths_.push_back(l.path);
        break;
      }
      case ListenerSpec::Kind::inherited_fd: {
        sockaddr_storage ss{};
        socklen_t len = sizeof ss;
        if (::getsockname(l.fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0)
          return make_error(errno, "inherited fd {} is not a socket", l.fd);
        int proto = (ss.ss_family == AF_INET || ss.ss_family == AF_INET6) ? IPPROTO_TCP : 0;
        auto acc = std::make_unique<Acceptor>(strand_);
        boost::system::error_code ec;
        acc->assign(asio::generic::stream_protocol(ss.ss_family, proto), l.fd, ec);
        if (ec) return make_error(ec.value(), "cannot use inherited fd {}: {}", l.fd, ec.message());
        acceptors_.push_back(std::move(acc));
        acceptor_tls_.push_back(l.tls);
        break;
      }
    }
  }
  if (acceptors_.empty()) return make_error(EINVAL, "no listeners");
  if (!opts_.control_path.empty()) control_ = QNBD_TRY(ControlServer::start(opts_.control_path, *this));
  return ok();
}

// A Unix socket's send buffer is what a reply can put in flight before the
// client reads (the receiver has no buffer of its own; its data is charged
// to the sender). The default, net.core.wmem_default (208 KiB on Debian), is
// less than one 256 KiB READ reply, so every large reply went out in
// several sendmsg calls, each after a readiness wait while the client
// drained it: nbdcopy's sequential read of a qcow2 ran at about 2.3 GB/s,
// 3.5 GB/s with this. The kernel doubles the value asked for (bookkeeping)
// and caps it at net.core.wmem_max; best effort, a refusal only costs speed.
// TCP keeps the kernel's autotuning, which an explicit SO_SNDBUF disables.
static void widen_send_buffer(int fd) {
  constexpr int kUnixSendBuffer = 1 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kUnixSendBuffer, sizeof kUnixSendBuffer);
}

bool Server::admit_address(const std::string& addr, std::uint64_t id) {
  if (!opts_.max_connections_per_address || addr.empty()) return true;
  std::size_t n = 0;
  {
    std::lock_guard lk(sessions_mu_);
    for (const auto& s : sessions_) n += s->peer_address() == addr;
  }
  if (n < opts_.max_connections_per_address) return true;
  log::warn("conn {}: refused: {} already holds {} connections (max_connections_per_address)", id, addr, n);
  return false;
}

awaitable<void> Server::accept_loop(Acceptor& acc, std::shared_ptr<const TlsCredentials> tls) {
  for (;;) {
    // Connection cap: stop accepting while full; clients wait in the backlog
    // (what qemu-nbd does with --shared).
    while (opts_.max_connections && !shutting_down_ && session_count() >= opts_.max_connections)
      co_await slot_freed_.async_wait(use_tuple);
    if (shutting_down_) co_return;
    auto strand = asio::make_strand(next_io_context());
    auto [ec, sock] = co_await acc.async_accept(strand, use_tuple);
    if (ec) {
      if (ec == asio::error::operation_aborted || shutting_down_) co_return;
      log::warn("accept: {}", ec.message());
      co_await back_off_after_accept(ec, strand_);
      continue;
    }
    auto id = next_id_++;
    std::string peer;
    {
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      char host[INET6_ADDRSTRLEN] = "";
      if (::getpeername(sock.native_handle(), reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
        if (ss.ss_family == AF_INET)
          ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, host, sizeof host);
        else if (ss.ss_family == AF_INET6)
          ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr, host, sizeof host);
      }
      peer = host;
      if (ss.ss_family == AF_UNIX) widen_send_buffer(sock.native_handle());
    }
    // Per-address cap, counted over every session (negotiating ones too):
    // one address cannot take all of max_connections.
    if (!admit_address(peer, id)) {
      boost::system::error_code cec;
      sock.close(cec);
      continue;
    }
    auto session = std::make_shared<Session>(*this, std::move(sock), id, tls, std::move(peer));
    {
      std::lock_guard lk(sessions_mu_);
      sessions_.insert(session);
      had_client_ = true;
    }
    log::debug("conn {}: accepted", id);
    // Runs on the session's executor. An exception that escaped the
    // session is logged and its socket closed before the session is
    // forgotten.
    asio::co_spawn(session->get_executor(), session->run(), [this, session](std::exception_ptr e) {
      if (e) {
        log::error("conn {}: session failed: {}", session->id(), describe_exception(e));
        session->close();
      }
      session_ended(session);
    });
  }
}

void Server::session_ended(const std::shared_ptr<Session>& s) {
  s->release_export();
  bool last;
  {
    std::lock_guard lk(sessions_mu_);
    sessions_.erase(s);
    last = sessions_.empty();
  }
  if (opts_.max_connections) asio::post(strand_, [this] { slot_freed_.cancel(); });
  if (last && shutting_down_) asio::post(strand_, [this] { drained_.cancel(); });
  if (last && !opts_.persistent) asio::post(strand_, [this] { begin_shutdown("last client disconnected"); });
}

std::size_t Server::session_count() {
  std::lock_guard lk(sessions_mu_);
  return sessions_.size();
}

std::vector<std::shared_ptr<Session>> Server::live_sessions() {
  std::lock_guard lk(sessions_mu_);
  return {sessions_.begin(), sessions_.end()};
}

std::atomic<unsigned>& Server::transmitting_on(const asio::execution_context& c) {
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    if (static_cast<const asio::execution_context*>(workers_[i].get()) == &c) return *transmitting_[i + 1];
  }
  return *transmitting_[0];
}

asio::io_context& Server::next_io_context() {
  const std::size_t i = next_ctx_.fetch_add(1, std::memory_order_relaxed) % (workers_.size() + 1);
  return i == 0 ? ctx_ : *workers_[i - 1];
}

std::vector<ListenerSpec> systemd_listeners() {
  std::vector<ListenerSpec> out;
  const char* pid = std::getenv("LISTEN_PID");
  const char* fds = std::getenv("LISTEN_FDS");
  if (!pid || !fds) return out;
  if (std::strtol(pid, nullptr, 10) != static_cast<long>(::getpid())) return out;
  long n = std::strtol(fds, nullptr, 10);
  for (long i = 0; i < n && i < 64; ++i) {
    ListenerSpec l;
    l.kind = ListenerSpec::Kind::inherited_fd;
    l.fd = 3 + static_cast<int>(i);
    ::fcntl(l.fd, F_SETFD, FD_CLOEXEC);
    out.push_back(l);
  }
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  return out;
}

}  // namespace qnbd::server
