// Shutdown and signals: the first SIGINT/SIGTERM/SIGHUP (or the last client of a
// non-persistent server) closes the listeners, lets sessions answer what
// they received, cuts off clients that do not read within the grace, waits
// for the disk work, closes the exports and stops the io threads. A second
// signal exits at once.
#include "server/internal.hpp"

#include <unistd.h>

#include <csignal>
#include <thread>

#include "common/log.hpp"

namespace qnbd::server {

awaitable<bool> Server::wait_drained(std::chrono::steady_clock::duration limit) {
  // session_ended cancels drained_ (posted to strand_, where this runs) once
  // the set is empty; a wake-up from an earlier cancel just re-checks.
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    {
      std::lock_guard lk(sessions_mu_);
      if (sessions_.empty()) co_return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) co_return false;
    drained_.expires_at(deadline);
    co_await drained_.async_wait(use_tuple);
  }
}

void Server::begin_shutdown(const char* why) {
  if (shutting_down_.exchange(true)) return;
  log::info("shutting down: {}", why);
  // A shutdown sequence that failed would leave the server running with
  // its listeners closed: log it and stop, with exit status 1.
  asio::co_spawn(strand_, shutdown_sequence(), log_failure("shutdown", [this] {
                   exit_status_ = 1;
                   stop_io();
                 }));
}

awaitable<void> Server::shutdown_sequence() {
  boost::system::error_code ec;
  for (auto& a : acceptors_) a->close(ec);
  slot_freed_.cancel();
  for (const auto& s : live_sessions()) asio::post(s->get_executor(), [s] { s->stop(); });
  // In-flight requests finish (long ones at their next step) and clients
  // take their replies; one that does not read them within the grace is
  // cut off, so the images are always closed (bitmaps stored clean). This
  // coroutine waits on ctx_, so a second signal still acts meanwhile.
  if (!co_await wait_drained(kShutdownGrace)) {
    auto left = live_sessions();
    log::info("shutdown: closing {} connection(s) still open after {} s", left.size(), kShutdownGrace.count());
    for (const auto& s : left) asio::post(s->get_executor(), [s] { s->abort(); });
    if (!co_await wait_drained(kAbortedDrainLimit)) {
      // Requests still running on the devices: closing them now would pull
      // the images from under those threads, and the pool cannot be joined.
      // Leave them as a crash would (bitmaps stay in_use, by design).
      log::error("shutdown: disk requests did not finish within {} s; exiting without closing images",
                 std::chrono::duration_cast<std::chrono::seconds>(kShutdownGrace + kAbortedDrainLimit).count());
      for (const auto& p : unix_paths_) ::unlink(p.c_str());
      ::_exit(1);
    }
  }
  // No bitmap edit may run while the images are closed: stop the control
  // socket now (waits for a command in progress). Not before the
  // connections are gone: a forced export-remove in progress waits for its
  // connections, some of which may run on this thread. (export-add and
  // export-remove are refused once shutting down.)
  control_.reset();
  int status = 0;
  for (const auto& err : registry_.close_all()) {
    log::error("closing {}", err);
    status = 1;
  }
  for (const auto& p : unix_paths_) ::unlink(p.c_str());
  exit_status_ = status;
  stop_io();
}

void Server::stop_io() {
  for (auto& g : worker_guards_) g.reset();
  for (auto& w : workers_) w->stop();
  ctx_.stop();
}

void Server::handle_signal(int sig) {
  // First signal: graceful. A second one means "now": exit without waiting
  // (images are not closed cleanly; that is what the user asked for).
  if (signals_seen_++ > 0) {
    log::warn("second signal, exiting immediately");
    ::_exit(1);
  }
  begin_shutdown(sig == SIGINT ? "SIGINT" : sig == SIGHUP ? "SIGHUP" : "SIGTERM");
  signals_.async_wait([this](boost::system::error_code ec, int s) {
    if (!ec) handle_signal(s);
  });
}

}  // namespace qnbd::server
