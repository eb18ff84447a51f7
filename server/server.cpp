// The Server object: io threads, the blocking pool, and run_server(), the
// entry point server.hpp declares.
#include "server/internal.hpp"

#include <sched.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <stdexcept>
#include <thread>

#include "common/log.hpp"

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
  for (const auto& l : registry_.list()) {
    const auto& e = l.exp;
    ControlExport c;
    c.name = e->name();
    c.image = e->image();
    c.format = e->device().format();
    c.size = e->info().size;
    c.read_only = e->info().read_only;
    c.allocation_depth = e->info().allocation_depth;
    c.connections = l.connections;
    c.device = e->device_ptr();
    out.push_back(std::move(c));
  }
  return out;
}

Result<void> Server::add_export(const protocol::control::ExportAdd& req) {
  if (!opts_.open_export) return make_error(ENOTSUP, "this server cannot add exports");
  if (shutting_down_) return make_error(EBUSY, "the server is shutting down");
  // protocol::control::parse_request bounded the name and the path and
  // refused NUL bytes; its JSON parser takes only valid UTF-8, as export
  // names must be (NBD proto.md "Option types").
  if (req.image.empty()) return make_error(EINVAL, "no image given");
  // Checked before the image is opened: opening it takes the image's lock
  // and may replay bitmap recovery, which a refused name should not do.
  if (registry_.find(req.name)) return make_error(EEXIST, "export '{}' already exists", req.name);
  ExportRequest r;
  r.name = req.name;
  // A relative path means the server's working directory, where a path in
  // serve's own arguments would be opened too; the absolute form is what
  // status shows.
  if (req.image.front() == '/') {
    r.image = req.image;
  } else {
    std::error_code ec;
    auto cwd = std::filesystem::current_path(ec);
    if (ec) return make_error(ec.value(), "cannot resolve '{}': {}", req.image, ec.message());
    r.image = (cwd / req.image).string();
  }
  r.format = req.format;
  r.read_only = req.read_only;
  r.bitmaps = req.bitmaps;
  r.allocation_depth = req.allocation_depth;
  auto opened = opts_.open_export(r);
  if (!opened) {
    // Another process (or another export of this server) holds the image's
    // lock: the image is busy, not broken.
    if (opened.error().code == EAGAIN) return make_error(EBUSY, "{}", opened.error().message);
    // A directory is a wrong argument, like a FIFO or a socket (EINVAL).
    if (opened.error().code == EISDIR) return make_error(EINVAL, "{}", opened.error().message);
    return std::move(opened).error();
  }
  auto spec = std::move(*opened);
  std::shared_ptr<image::BlockDevice> device = spec.device;
  auto added = registry_.add(std::move(spec));
  if (!added) {
    (void)device->close();  // release the image (and its lock) at once
    return std::move(added).error();
  }
  log::info("export '{}' added: {}", req.name, r.image);
  return ok();
}

Result<void> Server::remove_export(const std::string& name, bool force) {
  // While shutting down the shutdown sequence owns the connections; the
  // exports are all closed by it.
  if (shutting_down_) return make_error(EBUSY, "the server is shutting down");
  RemoveTimes times;
  times.grace = std::chrono::duration_cast<std::chrono::milliseconds>(kShutdownGrace);
  times.drain_limit = std::chrono::duration_cast<std::chrono::milliseconds>(kAbortedDrainLimit);
  QNBD_TRY(registry_.remove(name, force, times));
  log::info("export '{}' removed{}", name, force ? " (forced)" : "");
  return ok();
}

Result<void> Server::add_view_export(ExportSpec spec) {
  if (shutting_down_) return make_error(EBUSY, "the server is shutting down");
  QNBD_TRY(registry_.add(std::move(spec)));
  return ok();
}

Result<void> Server::remove_view_export(const std::string& name) {
  // The view has ended (its readers get EIO): its connections are closed
  // as export-remove --force closes them, then its device is closed.
  if (shutting_down_) return ok();  // the shutdown sequence closes everything
  RemoveTimes times;
  times.grace = std::chrono::duration_cast<std::chrono::milliseconds>(kShutdownGrace);
  times.drain_limit = std::chrono::duration_cast<std::chrono::milliseconds>(kAbortedDrainLimit);
  return registry_.remove(name, /*force=*/true, times);
}

Result<void> Server::add_exports() {
  for (auto& e : opts_.exports) QNBD_TRY(registry_.add(std::move(e)));
  opts_.exports.clear();
  return ok();
}

void Server::start_pool_threads(unsigned n) {
  // Made with every signal blocked, as asio makes its own pool threads, so
  // they inherit a full mask and signals go to the io threads. (With them
  // unblocked, 4k random writes measured 10-15 % slower in three bench
  // runs; blocked, within the runs' spread of the old pool.)
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  try {
    for (unsigned i = 0; i < n; ++i) pool_threads_.emplace_back([this] { pool_.attach(); });
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
  } catch (const std::exception& e) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    // One line from the caller (main) and status 1; nothing is left running.
    pool_.stop();
    for (auto& t : pool_threads_) t.join();
    const auto made = pool_threads_.size();
    pool_threads_.clear();
    throw std::runtime_error(
        fmt::format("cannot start thread {} of the blocking pool's {}: {}", made + 1, n, e.what()));
  }
}

Server::~Server() {
  // After run() these are joined already. Without it (listen failed):
  // stop the pool so they return.
  pool_.stop();
  for (auto& t : pool_threads_) t.join();
}

int Server::run() {
  signals_.async_wait([this](boost::system::error_code ec, int sig) {
    if (ec) return;
    handle_signal(sig);
  });
  // An accept loop that failed would leave its listener deaf: log it and
  // shut down rather than serve on without it.
  for (std::size_t i = 0; i < acceptors_.size(); ++i)
    asio::co_spawn(strand_, accept_loop(*acceptors_[i], acceptor_tls_[i]),
                   log_failure("accept loop", [this] { begin_shutdown("accept loop failed"); }));
  if (opts_.on_listening) opts_.on_listening();
  log::info("{} io thread{}, polling up to {} ns for a lone connection's next request, small I/O {}", threads_,
            threads_ == 1 ? "" : "s", opts_.poll_max.count(), opts_.inline_io ? "inline" : "on the pool");
  std::vector<std::thread> threads;
  try {
    for (auto& w : workers_) threads.emplace_back([&w] { run_context(*w, "io threads"); });
  } catch (const std::exception& e) {
    // A thread that cannot be made (a pids limit): stop what started and
    // report it, rather than std::terminate from the joinable threads.
    // No client has been served: the exports close untouched.
    stop_io();
    for (auto& t : threads) t.join();
    log::error("cannot start io thread {} of {}: {}", threads.size() + 2, threads_, e.what());
    return 1;
  }
  run_context(ctx_, "main io thread");
  for (auto& t : threads) t.join();
  // What the blocking pool still holds runs to its end (wait: the pool's
  // own work count is dropped), then its threads return.
  pool_.wait();
  for (auto& t : pool_threads_) t.join();
  pool_threads_.clear();
  return exit_status_;
}

Result<int> run_server(ServerOptions options) {
  int status;
  {
    Server server(std::move(options));
    QNBD_TRY(server.add_exports());
    QNBD_TRY(server.listen());
    status = server.run();
    // The server has ended (images closed, status known) and run() joined
    // every thread it started. A SIGINT, SIGTERM or SIGHUP arriving now asks for
    // what is already happening: block them, so neither the signal_set's
    // removal (which restores the default action, death by signal) nor
    // the caller's last steps (pid file removal) turn a clean end into a
    // failed one. They stay pending and die with the process.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  }
  return status;
}

}  // namespace qnbd::server
