// The Server object: io threads, the blocking pool, and run_server(), the
// entry point server.hpp declares.
#include "server/internal.hpp"

#include <sched.h>
#include <unistd.h>

#include <csignal>
#include <thread>

namespace qnbd::server {

unsigned usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

std::string describe_exception(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown exception";
  }
}

std::vector<ControlExport> Server::control_exports() {
  std::vector<ControlExport> out;
  const auto all = registry_.all();
  for (const auto& e : all) {
    ControlExport c;
    c.name = e->name();
    c.image = e->image();
    c.format = e->device().format();
    c.size = e->info().size;
    c.read_only = e->info().read_only;
    c.allocation_depth = e->info().allocation_depth;
    c.device = e->device_ptr();
    out.push_back(std::move(c));
  }
  std::lock_guard lk(sessions_mu_);
  for (const auto& s : sessions_) {
    for (std::size_t i = 0; i < all.size(); ++i) {
      if (s->export_seen() == all[i].get()) ++out[i].connections;
    }
  }
  return out;
}

Result<void> Server::add_view_export(ExportSpec spec) {
  if (shutting_down()) return make_error(EBUSY, "the server is stopping");
  return registry_.add(std::move(spec));
}

Result<void> Server::remove_view_export(const std::string& name) {
  auto e = registry_.remove(name);
  if (!e) return make_error(ENOENT, "no export named '{}'", name);
  // Its readers get EIO from the ended view; close their connections too
  // (after the requests already running are answered, as at shutdown).
  std::lock_guard lk(sessions_mu_);
  for (const auto& s : sessions_) {
    if (s->export_seen() == e.get()) asio::post(s->get_executor(), [s] { s->abort(); });
  }
  return ok();
}

Result<void> Server::add_exports() {
  for (auto& e : opts_.exports) QNBD_TRY(registry_.add(std::move(e)));
  opts_.exports.clear();
  return ok();
}

int Server::run() {
  signals_.async_wait([this](boost::system::error_code ec, int sig) {
    if (ec) return;
    handle_signal(sig);
  });
  // An accept loop that failed would leave its listener deaf: log it and
  // shut down rather than serve on without it.
  for (std::size_t i = 0; i < acceptors_.size(); ++i)
    asio::co_spawn(strand_, accept_loop(*acceptors_[i], acceptor_tls_[i]), log_failure("accept loop", [this] { begin_shutdown("accept loop failed"); }));
  if (opts_.on_listening) opts_.on_listening();
  std::vector<std::thread> threads;
  for (auto& w : workers_) threads.emplace_back([&w] { w->run(); });
  ctx_.run();
  for (auto& t : threads) t.join();
  pool_.join();
  return exit_status_;
}


Result<int> run_server(ServerOptions options) {
  int status;
  {
    Server server(std::move(options));
    QNBD_TRY(server.add_exports());
    QNBD_TRY(server.listen());
    status = server.run();
  }
  // The signal_set is gone; a signal arriving while the caller finishes up
  // (pid file removal) still means "exit now", not death by signal.
  std::signal(SIGINT, [](int) { ::_exit(1); });
  std::signal(SIGTERM, [](int) { ::_exit(1); });
  return status;
}


}  // namespace qnbd::server
