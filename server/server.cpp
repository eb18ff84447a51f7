// Asio implementation of the NBD server (see server.hpp).
//
// Per connection: the Negotiator drives the handshake under a deadline; then
// a reader coroutine reads header + payload into pooled buffers and spawns a
// handler per request (bounded count and bytes in flight); handlers queue
// finished replies for one writer coroutine, which sends each reply (all its
// chunks) with a single gathered write, so chunks never interleave (§15.3 #33).
#include "server/server.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <set>
#include <thread>

#include <boost/asio.hpp>
#include <boost/asio/experimental/as_tuple.hpp>

#include "common/checked.hpp"
#include "common/endian.hpp"
#include "common/log.hpp"
#include "protocol/constants.hpp"
#include "protocol/negotiator.hpp"
#include "protocol/reply.hpp"
#include "protocol/request.hpp"
#include "server/control.hpp"

namespace qnbd::server {

namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
using Socket = asio::generic::stream_protocol::socket;
using Acceptor = asio::basic_socket_acceptor<asio::generic::stream_protocol>;
using Strand = asio::strand<asio::io_context::executor_type>;
using namespace qnbd::protocol;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

namespace {

// ---------------------------------------------------------------------------
// Buffers: request payloads and read data come from a process-wide pool so a
// request does not map and zero a fresh buffer (qemu-nbd spends ~30 % of its
// CPU doing that, see STYLE.md "Speed").
struct Buffer {
  std::unique_ptr<std::byte[]> data;
  std::size_t capacity = 0;

  Buffer() = default;
  Buffer(std::unique_ptr<std::byte[]> d, std::size_t cap) : data(std::move(d)), capacity(cap) {}
  // A moved-from buffer must read as empty: callers test capacity before
  // reusing a slot's buffer, and a stale capacity over a null pointer sent
  // a READ into pread(NULL) after a big request had given its buffer back.
  Buffer(Buffer&& o) noexcept : data(std::move(o.data)), capacity(std::exchange(o.capacity, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    data = std::move(o.data);
    capacity = std::exchange(o.capacity, 0);
    return *this;
  }
};

class BufferPool {
 public:
  Buffer get(std::size_t n) {
    {
      std::lock_guard lk(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->capacity >= n) {
          Buffer b = std::move(*it);
          retained_ -= b.capacity;
          free_.erase(it);
          return b;
        }
      }
    }
    // Round up so buffers are reusable for similar sizes.
    std::size_t cap = std::max<std::size_t>(n, 64 * 1024);
    cap = std::size_t{1} << (64 - __builtin_clzll(cap - 1));
    return Buffer{std::make_unique_for_overwrite<std::byte[]>(cap), cap};
  }
  void put(Buffer b) {
    if (!b.data) return;
    std::lock_guard lk(mu_);
    if (retained_ + b.capacity > kMaxRetained || free_.size() >= 64) return;
    retained_ += b.capacity;
    free_.push_back(std::move(b));
  }

 private:
  static constexpr std::size_t kMaxRetained = 256u << 20;
  std::mutex mu_;
  std::vector<Buffer> free_;
  std::size_t retained_ = 0;
};

BufferPool& buffer_pool() {
  static BufferPool pool;
  return pool;
}

// Run f() on the blocking pool and resume on the caller's executor (strand).
template <typename F>
awaitable<void> run_blocking(asio::thread_pool& pool, F& f) {
  co_await asio::async_initiate<decltype(use_awaitable), void()>(
      [&pool, &f](auto handler) {
        asio::post(pool, [&f, h = std::move(handler)]() mutable {
          f();
          asio::post(std::move(h));  // to the handler's associated executor
        });
      },
      use_awaitable);
}

// One scatter/gather piece of a reply: bytes from `meta` or from `data`.
struct Piece {
  bool from_data = false;
  std::size_t offset = 0;
  std::size_t length = 0;
};

// Per-request state, reused across requests of a connection.
struct Slot {
  Request req;
  Buffer data;
  std::vector<std::byte> meta;
  std::vector<Piece> pieces;
  std::vector<image::Extent> extents;
  std::vector<image::BitmapExtent> bitmap_extents;
  std::vector<ExtentList> lists;
  std::uint64_t charged_bytes = 0;
  void add_meta(std::size_t from) { pieces.push_back({false, from, meta.size() - from}); }
};

class Server;

// ---------------------------------------------------------------------------
class Session : public std::enable_shared_from_this<Session> {
 public:
  static constexpr std::size_t kMaxBatch = 16;
  static constexpr std::uint32_t kInlineMaxLength = 256u << 10;
  static constexpr auto kSlowInline = std::chrono::microseconds(200);
  static constexpr std::uint32_t kPoolCredit = 256;
  Session(Server& server, Socket socket, std::uint64_t id)
      : server_(server), socket_(std::move(socket)), id_(id),
        wake_reader_(socket_.get_executor()), wake_writer_(socket_.get_executor()),
        deadline_(socket_.get_executor()) {
    wake_reader_.expires_at(asio::steady_timer::time_point::max());
    wake_writer_.expires_at(asio::steady_timer::time_point::max());
  }

  awaitable<void> run();
  // Called on the session's executor: stop reading requests, let in-flight
  // ones finish (server shutdown).
  void stop();
  // Called on the session's executor when the client did not take its
  // replies within the shutdown grace: cancel the socket's operations and
  // drop unsent replies; the session still ends only once its in-flight
  // disk work is done (the images are closed after that).
  void abort();
  auto get_executor() { return socket_.get_executor(); }
  // The export chosen in the handshake (null before), readable from any
  // thread (the control socket counts connections per export).
  const ExportSpec* export_spec() const { return export_seen_.load(std::memory_order_acquire); }

 private:
  awaitable<bool> handshake();
  awaitable<void> transmission();
  awaitable<void> writer();
  awaitable<void> handle(Slot* slot);
  bool answer_without_device(Slot& s);  // refusals and CACHE; true if answered
  bool runs_inline(const Request& r);
  void execute_inline(Slot& s);
  void execute(Slot& s);  // runs on the blocking pool or inline (runs_inline)
  template <typename Step>
  bool in_steps(Slot& s, Step&& step, Result<void>& res);
  void do_read(Slot& s);
  void do_block_status(Slot& s);
  void reply_error(Slot& s, std::uint32_t nbd_error, std::string_view message);
  void reply_ok(Slot& s);
  void queue_reply(Slot* s);
  Slot* get_slot();
  void put_slot(Slot* s);

  Server& server_;
  Socket socket_;
  std::uint64_t id_;
  asio::steady_timer wake_reader_;
  asio::steady_timer wake_writer_;
  asio::steady_timer deadline_;
  asio::cancellation_signal read_cancel_;

  const ExportSpec* export_ = nullptr;
  std::atomic<const ExportSpec*> export_seen_{nullptr};
  Negotiated neg_;
  ValidationContext vctx_;
  bool stopping_ = false;
  bool reader_done_ = false;
  bool writer_done_ = false;
  bool write_failed_ = false;
  std::uint32_t inflight_ = 0;
  std::uint64_t inflight_bytes_ = 0;
  std::uint32_t pool_credit_ = 0;  // requests still to send to the pool (runs_inline)
  std::deque<Slot*> ready_;
  // Receive buffer: one recv can bring many pipelined request headers (and
  // small write payloads), instead of one syscall per 28/32-byte header.
  static constexpr std::size_t kRecvBufferSize = 64u << 10;
  std::unique_ptr<std::byte[]> rbuf_;
  std::size_t rpos_ = 0, rend_ = 0;
  std::size_t buffered() const { return rend_ - rpos_; }
  // Until at least `need` (<= kRecvBufferSize) bytes are buffered.
  awaitable<boost::system::error_code> fill(std::size_t need);
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> free_slots_;
};

// The blocking pool waits for the disk (O_DIRECT, FLUSH, FUA, page-cache
// misses): its threads mostly sleep, so it is sized for the device's
// queue depth rather than the CPU count.
constexpr unsigned kMinBlockingThreads = 16;

// CPUs this process may run on (taskset, cgroup cpusets): more io threads
// than that only adds context switches.
unsigned usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// ---------------------------------------------------------------------------
class Server : public ExportCatalog, public ControlTarget {
 public:
  explicit Server(ServerOptions opts)
      : opts_(std::move(opts)),
        threads_(opts_.threads ? opts_.threads : usable_cpus()),
        ctx_(1), pool_(std::max(kMinBlockingThreads, threads_)), strand_(asio::make_strand(ctx_)),
        signals_(ctx_, SIGINT, SIGTERM), slot_timer_(strand_), drained_(strand_) {
    for (const auto& e : opts_.exports) infos_.push_back(e.info);
    // One io_context per io thread, each run by that thread alone: a
    // connection lives on one of them (round robin), so its reads, inline
    // I/O and replies never hop threads. One context run by many threads
    // woke a second thread for nearly every completion (a futex round trip
    // per request: qd1 latency 2-3x qemu-nbd's single thread).
    for (unsigned i = 1; i < threads_; ++i) {
      workers_.push_back(std::make_unique<asio::io_context>(1));
      worker_guards_.push_back(asio::make_work_guard(*workers_.back()));
    }
  }

  const std::vector<ExportInfo>& exports() const override { return infos_; }
  bool shutting_down() const override { return shutting_down_.load(); }
  std::vector<ControlExport> control_exports() override;

  // Long requests run in steps of at most this many bytes, at multiples of
  // it (so cluster-aligned), checking shutting_down() between steps.
  static constexpr std::uint64_t kLongRequestStep = 1ull << 30;
  // After SIGTERM/SIGINT, clients get this long to take the replies to what
  // they sent; then their connections are closed (qemu-nbd closes them at
  // once), so a client that stops reading cannot keep the images open.
  static constexpr auto kShutdownGrace = std::chrono::seconds(2);
  // Closed connections end once their disk work does (a step at most); a
  // device that hangs this long is given up on.
  static constexpr auto kAbortedDrainLimit = std::chrono::seconds(60);

  const ExportSpec* spec_for(const ExportInfo* info) const {
    for (std::size_t i = 0; i < infos_.size(); ++i)
      if (&infos_[i] == info) return &opts_.exports[i];
    return nullptr;
  }
  const ServerOptions& options() const { return opts_; }
  asio::thread_pool& pool() { return pool_; }

  Result<void> listen();
  int run();
  void session_ended(const std::shared_ptr<Session>& s);

 private:
  Result<void> add_acceptor(const asio::generic::stream_protocol::endpoint& ep, bool v6only);
  awaitable<void> accept_loop(Acceptor& acc);
  void begin_shutdown(const char* why);
  awaitable<void> shutdown_sequence();
  // True once no session is left; false if `limit` passed first.
  awaitable<bool> wait_drained(std::chrono::steady_clock::duration limit);
  std::vector<std::shared_ptr<Session>> live_sessions();
  void handle_signal(int sig);
  asio::io_context& next_io_context();
  void stop_io();

  ServerOptions opts_;
  std::vector<ExportInfo> infos_;
  unsigned threads_;
  // Destroyed after ctx_: operations still queued in ctx_ at exit (an
  // accept cancelled by the shutdown) hold strands of these contexts.
  std::vector<std::unique_ptr<asio::io_context>> workers_;  // threads_ - 1 more io threads
  asio::io_context ctx_;  // listeners, signals, shutdown, and connections too
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> worker_guards_;
  std::atomic<std::size_t> next_ctx_{0};
  asio::thread_pool pool_;
  Strand strand_;  // listeners and shutdown
  asio::signal_set signals_;
  asio::steady_timer slot_timer_;
  asio::steady_timer drained_;  // on strand_; cancelled when the last session ends in shutdown
  std::vector<std::unique_ptr<Acceptor>> acceptors_;
  std::vector<std::string> unix_paths_;
  std::atomic<bool> shutting_down_{false};
  std::mutex sessions_mu_;
  std::set<std::shared_ptr<Session>> sessions_;
  std::atomic<std::uint64_t> next_id_{1};
  bool had_client_ = false;
  std::atomic<int> signals_seen_{0};
  int exit_status_ = 0;
  std::unique_ptr<ControlServer> control_;  // stopped before the exports are closed
};

// ---------------------------------------------------------------------------
// Session

awaitable<void> Session::run() {
  auto self = shared_from_this();
  {
    // TCP peers SHOULD set TCP_NODELAY (§1).
    boost::system::error_code ec;
    auto ep = socket_.local_endpoint(ec);
    if (!ec && (ep.protocol().family() == AF_INET || ep.protocol().family() == AF_INET6)) {
      int one = 1;
      ::setsockopt(socket_.native_handle(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
  }
  bool go = co_await handshake();
  if (go) co_await transmission();
  boost::system::error_code ec;
  socket_.shutdown(Socket::shutdown_both, ec);
  socket_.close(ec);
  log::debug("conn {}: closed", id_);
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

void Session::stop() {
  // Wake the reader (handshake or transmission); it answers whatever the
  // client already sent (NBD_REP_ERR_SHUTDOWN / NBD_ESHUTDOWN) and then
  // closes, instead of resetting a connection with unread data.
  stopping_ = true;
  read_cancel_.emit(asio::cancellation_type::terminal);
}

awaitable<bool> Session::handshake() {
  Negotiator neg(server_);
  auto timeout = server_.options().handshake_timeout_seconds;
  std::weak_ptr<Session> weak = shared_from_this();
  if (timeout) {
    deadline_.expires_after(std::chrono::seconds(timeout));
    deadline_.async_wait([weak](boost::system::error_code ec) {
      if (ec) return;
      if (auto s = weak.lock()) {
        log::info("conn {}: handshake timed out", s->id_);
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
        auto [ec, n] = co_await asio::async_write(socket_, asio::buffer(a.data.data(), a.data.size()), use_tuple);
        if (ec) {
          deadline_.cancel();
          co_return false;
        }
        break;
      }
      case Action::Kind::need_bytes: {
        if (stopping_) {
          boost::system::error_code aec;
          if (socket_.available(aec) == 0 || aec) {
            deadline_.cancel();
            co_return false;
          }
        }
        auto want = std::min(a.bytes, buf.size());
        auto [ec, n] = co_await socket_.async_read_some(
            asio::buffer(buf.data(), want), asio::bind_cancellation_slot(read_cancel_.slot(), use_tuple));
        if (ec == asio::error::operation_aborted && n == 0 && stopping_) continue;
        if (ec) {
          deadline_.cancel();
          co_return false;
        }
        neg.feed(std::span<const std::byte>(buf.data(), n));
        break;
      }
      case Action::Kind::close:
        deadline_.cancel();
        if (!neg.close_reason().empty()) log::info("conn {}: handshake ended: {}", id_, neg.close_reason());
        co_return false;
      case Action::Kind::start_transmission:
        deadline_.cancel();
        neg_ = neg.result();
        export_ = server_.spec_for(neg_.export_info);
        if (!export_) co_return false;
        export_seen_.store(export_, std::memory_order_release);
        vctx_.export_size = neg_.export_info->size;
        vctx_.transmission_flags = neg_.transmission_flags;
        vctx_.mode = neg_.mode;
        vctx_.has_contexts = !neg_.contexts.empty();
        vctx_.block_size_committed = neg_.block_size_committed;
        vctx_.min_block = neg_.min_block;
        vctx_.max_payload = neg_.max_payload;
        log::debug("conn {}: export '{}' mode {} flags {:#x} contexts {}", id_, neg_.export_info->name,
                   static_cast<int>(neg_.mode), neg_.transmission_flags, neg_.contexts.size());
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

void Session::put_slot(Slot* s) {
  s->meta.clear();
  s->pieces.clear();
  // Keep small buffers with the slot; give big ones back to the shared pool.
  if (s->data.capacity > (1u << 20)) buffer_pool().put(std::move(s->data));
  free_slots_.push_back(s);
}

awaitable<boost::system::error_code> Session::fill(std::size_t need) {
  if (rpos_ > 0 && rend_ - rpos_ < need) {
    std::memmove(rbuf_.get(), rbuf_.get() + rpos_, rend_ - rpos_);
    rend_ -= rpos_;
    rpos_ = 0;
  }
  while (rend_ - rpos_ < need) {
    auto [ec, n] = co_await socket_.async_read_some(asio::buffer(rbuf_.get() + rend_, kRecvBufferSize - rend_),
                                                    asio::bind_cancellation_slot(read_cancel_.slot(), use_tuple));
    rend_ += n;
    if (ec) co_return ec;
  }
  co_return boost::system::error_code{};
}

awaitable<void> Session::transmission() {
  auto self = shared_from_this();
  asio::co_spawn(socket_.get_executor(), writer(), asio::detached);
  const auto hsize = request_header_size(neg_.mode);
  rbuf_ = std::make_unique_for_overwrite<std::byte[]>(kRecvBufferSize);
  const auto& opts = server_.options();
  for (;;) {
    if (write_failed_) break;
    if (stopping_) {
      // Server shutdown: answer what the client already sent (with
      // NBD_ESHUTDOWN, §14) so closing does not reset the connection under
      // unread data, but do not wait for more.
      boost::system::error_code aec;
      auto avail = socket_.available(aec);
      if (aec || buffered() + avail < hsize) break;
    }
    auto ec = co_await fill(hsize);
    if (ec == asio::error::operation_aborted && stopping_) continue;
    if (ec) break;
    Request req;
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
    std::uint64_t cost = req.payload_length + (req.type == NBD_CMD_READ ? std::min<std::uint64_t>(req.length, kMaxPayload) : 0);
    while (inflight_ > 0 && (inflight_ >= opts.max_inflight_requests ||
                             inflight_bytes_ + cost > opts.max_inflight_bytes) && !write_failed_) {
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
      // will be rejected, so the stream stays in sync (§15.2 #18). What the
      // receive buffer already holds is copied; the rest is read in place.
      const std::size_t have = std::min<std::size_t>(buffered(), req.payload_length);
      std::memcpy(s->data.data.get(), rbuf_.get() + rpos_, have);
      rpos_ += have;
      boost::system::error_code ec2;
      if (have < req.payload_length) {
        auto [e, n2] = co_await asio::async_read(
            socket_, asio::buffer(s->data.data.get() + have, req.payload_length - have),
            asio::bind_cancellation_slot(read_cancel_.slot(), use_tuple));
        ec2 = e;
      }
      if (ec2) {
        inflight_--;
        inflight_bytes_ -= cost;
        put_slot(s);
        break;
      }
    }
    if (runs_inline(s->req)) {
      if (!answer_without_device(*s)) execute_inline(*s);
      queue_reply(s);
    } else {
      asio::co_spawn(socket_.get_executor(), handle(s), asio::detached);
    }
  }
  // Finish in-flight requests, then let the writer drain and exit.
  stopping_ = true;
  reader_done_ = true;
  while (inflight_ > 0 && !write_failed_) co_await wake_reader_.async_wait(use_tuple);
  wake_writer_.cancel();
  while (!writer_done_) co_await wake_reader_.async_wait(use_tuple);
}

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

bool Session::answer_without_device(Slot& s) {
  s.meta.clear();
  s.pieces.clear();
  auto v = validate_request(s.req, vctx_);
  if (stopping_ && !v.error) v = {NBD_ESHUTDOWN, "server is shutting down"};
  if (v.error) {
    log::debug("conn {}: {} cookie {:#x} offset {} length {} refused: {}", id_, command_name(s.req.type),
               s.req.cookie, s.req.offset, s.req.length, v.message);
    reply_error(s, v.error, v.message);
    return true;
  }
  if (s.req.type == NBD_CMD_CACHE) {
    reply_ok(s);  // advisory only (§11.6)
    return true;
  }
  return false;
}

// Page-cache reads and writes take microseconds: handing them to the pool
// and back costs two thread switches and a coroutine frame, more than the
// work itself, so they run on the connection's io thread (other connections
// keep the other io threads). Calls that wait for the disk (FLUSH, FUA,
// O_DIRECT images) and big transfers go to the pool so one connection's
// reader is not parked behind them. An inline call that turns out slow
// (page-cache miss, dirty-page throttling, a busy CPU) sends the next
// kPoolCredit requests of this connection to the pool, then inline is tried
// again: the connection adapts to whether its device is cache- or disk-bound.
bool Session::runs_inline(const Request& r) {
  if (!server_.options().inline_io || !export_->inline_io) return false;
  if (pool_credit_ > 0) {
    --pool_credit_;
    return false;
  }
  if (r.flags & NBD_CMD_FLAG_FUA) return false;
  switch (r.type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE: return r.length <= kInlineMaxLength;
    case NBD_CMD_BLOCK_STATUS: return true;
    default: return false;
  }
}

void Session::execute_inline(Slot& s) {
  // Slow because the thread blocked (page-cache miss, dirty throttling, a
  // lock) shows as a voluntary context switch; slow because the CPU was
  // busy (preempted) does not, and the pool would not help then.
  rusage before{};
  ::getrusage(RUSAGE_THREAD, &before);
  const auto t0 = std::chrono::steady_clock::now();
  execute(s);
  if (std::chrono::steady_clock::now() - t0 > kSlowInline) {
    rusage after{};
    ::getrusage(RUSAGE_THREAD, &after);
    if (after.ru_nvcsw != before.ru_nvcsw) pool_credit_ = kPoolCredit;
  }
}

awaitable<void> Session::handle(Slot* s) {
  auto self = shared_from_this();
  if (!answer_without_device(*s)) {
    auto work = [this, s] { execute(*s); };
    co_await run_blocking(server_.pool(), work);
  }
  queue_reply(s);
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

// Runs on the blocking pool; touches only the slot and the (thread-safe) device.
void Session::execute(Slot& s) {
  auto& dev = *export_->device;
  const auto& r = s.req;
  const bool fua = r.flags & NBD_CMD_FLAG_FUA;
  Result<void> res;
  switch (r.type) {
    case NBD_CMD_READ: return do_read(s);
    case NBD_CMD_BLOCK_STATUS: return do_block_status(s);
    case NBD_CMD_WRITE:
      res = dev.write(std::span<const std::byte>(s.data.data.get(), r.length), r.offset, fua);
      break;
    case NBD_CMD_FLUSH: res = dev.flush(); break;
    case NBD_CMD_TRIM:
      // --discard=ignore (qemu-nbd's default): TRIM is a successful no-op.
      if (export_->discard_unmap && r.length) {
        if (!in_steps(s, [&](std::uint64_t off, std::uint64_t len, bool last) {
              return dev.discard(off, len, fua && last);
            }, res))
          return;
      } else if (fua) {
        res = dev.flush();
      }
      break;
    case NBD_CMD_WRITE_ZEROES: {
      image::ZeroFlags zf;
      zf.may_unmap = !(r.flags & NBD_CMD_FLAG_NO_HOLE) && export_->discard_unmap;
      zf.fast_only = r.flags & NBD_CMD_FLAG_FAST_ZERO;
      if (r.length && !in_steps(s, [&](std::uint64_t off, std::uint64_t len, bool last) {
            zf.fua = fua && last;
            return dev.write_zeroes(off, len, zf);
          }, res))
        return;
      break;
    }
    default: break;
  }
  if (!res) {
    bool fast = r.flags & NBD_CMD_FLAG_FAST_ZERO;
    if (!(fast && res.error().code == ENOTSUP))
      log::warn("conn {}: {} offset {} length {}: {}", id_, command_name(r.type), r.offset, r.length,
                res.error().message);
    return reply_error(s, errno_to_nbd(res.error().code, fast), res.error().message);
  }
  reply_ok(s);
}

// A WRITE_ZEROES or TRIM may cover a whole export (64-bit lengths with
// extended headers: 1 PiB in one request), which can take hours: run it in
// steps at multiples of kLongRequestStep and stop between steps when the
// server shuts down, answering NBD_ESHUTDOWN (NBD proto.md section "Error
// values": the server is shutting down) for the part not done. Returns
// false when it answered the request itself.
template <typename Step>
bool Session::in_steps(Slot& s, Step&& step, Result<void>& res) {
  const auto& r = s.req;
  const std::uint64_t end = r.offset + r.length;
  for (std::uint64_t pos = r.offset; pos < end;) {
    if (server_.shutting_down()) {
      log::info("conn {}: {} offset {} length {} cut short at {}: server is shutting down", id_,
                command_name(r.type), r.offset, r.length, pos);
      reply_error(s, NBD_ESHUTDOWN, "server is shutting down");
      return false;
    }
    const std::uint64_t next = std::min(end, (pos / Server::kLongRequestStep + 1) * Server::kLongRequestStep);
    res = step(pos, next - pos, next == end);
    if (!res) return true;
    pos = next;
  }
  return true;
}

void Session::do_read(Slot& s) {
  auto& dev = *export_->device;
  const auto& r = s.req;
  const auto mode = neg_.mode;
  if (s.data.capacity < r.length) {
    buffer_pool().put(std::move(s.data));
    s.data = buffer_pool().get(r.length);
  }
  std::byte* buf = s.data.data.get();
  if (r.length == 0) {
    // Zero-length read: nothing to send but the completion (spec leaves it open).
    if (mode == ReplyMode::simple) return reply_ok(s);
    auto from = s.meta.size();
    s.meta.resize(from + kMaxChunkPrefix);
    s.meta.resize(from + encode_none(std::span(s.meta).subspan(from), mode, r.cookie, r.offset));
    return s.add_meta(from);
  }
  const bool sparse = mode != ReplyMode::simple && !(r.flags & NBD_CMD_FLAG_DF);
  if (!sparse) {
    auto res = dev.read(std::span(buf, r.length), r.offset);
    if (!res) {
      log::warn("conn {}: READ offset {} length {}: {}", id_, r.offset, r.length, res.error().message);
      return reply_error(s, errno_to_nbd(res.error().code), res.error().message);
    }
    auto from = s.meta.size();
    s.meta.resize(from + kMaxChunkPrefix);
    std::size_t n = mode == ReplyMode::simple
                        ? encode_simple_reply(std::span(s.meta).subspan(from), 0, r.cookie)
                        : encode_offset_data(std::span(s.meta).subspan(from), mode, NBD_REPLY_FLAG_DONE,
                                             r.cookie, r.offset, r.offset, r.length);
    s.meta.resize(from + n);
    s.add_meta(from);
    s.pieces.push_back({true, 0, r.length});
    return;
  }
  // Structured READ: zero ranges go out as OFFSET_HOLE chunks (§11.1), so
  // holes cost neither disk reads nor bandwidth.
  constexpr std::size_t kMaxReadExtents = 64;
  s.extents.resize(kMaxReadExtents);
  std::size_t n_ext = 0;
  if (auto bs = dev.block_status(r.offset, r.length, s.extents); bs) n_ext = *bs;
  struct Part { std::uint64_t off, len; bool hole; };
  std::array<Part, kMaxReadExtents + 1> parts;
  std::size_t n_parts = 0;
  std::uint64_t pos = 0;
  for (std::size_t i = 0; i < n_ext && pos < r.length; ++i) {
    auto len = std::min(s.extents[i].length, r.length - pos);
    if (len == 0) break;
    bool hole = s.extents[i].zero;
    if (n_parts && parts[n_parts - 1].hole == hole) parts[n_parts - 1].len += len;
    else parts[n_parts++] = {pos, len, hole};
    pos += len;
  }
  if (pos < r.length) {
    if (n_parts && !parts[n_parts - 1].hole) parts[n_parts - 1].len += r.length - pos;
    else parts[n_parts++] = {pos, r.length - pos, false};
  }
  for (std::size_t i = 0; i < n_parts; ++i) {
    if (parts[i].hole) continue;
    auto res = dev.read(std::span(buf + parts[i].off, parts[i].len), r.offset + parts[i].off);
    if (!res) {
      log::warn("conn {}: READ offset {} length {}: {}", id_, r.offset + parts[i].off, parts[i].len,
                res.error().message);
      return reply_error(s, errno_to_nbd(res.error().code), res.error().message);
    }
  }
  for (std::size_t i = 0; i < n_parts; ++i) {
    const std::uint16_t flags = i + 1 == n_parts ? NBD_REPLY_FLAG_DONE : 0;
    auto from = s.meta.size();
    s.meta.resize(from + kMaxChunkPrefix);
    std::size_t n;
    if (parts[i].hole) {
      n = encode_offset_hole(std::span(s.meta).subspan(from), mode, flags, r.cookie, r.offset,
                             r.offset + parts[i].off, static_cast<std::uint32_t>(parts[i].len));
      s.meta.resize(from + n);
      s.add_meta(from);
    } else {
      n = encode_offset_data(std::span(s.meta).subspan(from), mode, flags, r.cookie, r.offset,
                             r.offset + parts[i].off, parts[i].len);
      s.meta.resize(from + n);
      s.add_meta(from);
      s.pieces.push_back({true, parts[i].off, parts[i].len});
    }
  }
}

void Session::do_block_status(Slot& s) {
  auto& dev = *export_->device;
  const auto& r = s.req;
  const auto mode = neg_.mode;
  std::uint64_t length = r.length;
  // Which contexts to report: all selected, or the payload's filter (§11.8).
  std::array<bool, 64> want{};
  const auto& ctxs = neg_.contexts;
  const std::size_t nctx = std::min<std::size_t>(ctxs.size(), want.size());
  if (r.flags & NBD_CMD_FLAG_PAYLOAD_LEN) {
    const std::byte* p = s.data.data.get();
    const auto plen = r.payload_length;
    if (plen < 8 || (plen - 8) % 4 != 0 || (plen - 8) / 4 == 0 || (plen - 8) / 4 > nctx)
      return reply_error(s, NBD_EINVAL, "malformed block status payload");
    length = load_be64(p);
    for (std::uint64_t i = 0; i < (plen - 8) / 4; ++i) {
      auto id = load_be32(p + 8 + 4 * i);
      std::size_t k = 0;
      while (k < nctx && ctxs[k].id != id) ++k;
      if (k == nctx || want[k]) return reply_error(s, NBD_EINVAL, "unknown or duplicate context id");
      want[k] = true;
    }
    if (!range_within(r.offset, length, vctx_.export_size))
      return reply_error(s, NBD_EINVAL, "request beyond end of export");
  } else {
    for (std::size_t k = 0; k < nctx; ++k) want[k] = true;
  }
  if (length == 0) return reply_error(s, NBD_EINVAL, "zero-length block status");
  const bool req_one = r.flags & NBD_CMD_FLAG_REQ_ONE;
  s.lists.resize(nctx);
  for (std::size_t k = 0; k < nctx; ++k)
    s.lists[k].reset(req_one ? 1 : kMaxExtentsPerChunk, max_extent_length(mode));
  std::array<bool, 64> stopped{};
  bool any_active = false;
  for (std::size_t k = 0; k < nctx; ++k) {
    // Bitmaps have their own walk below.
    if (ctxs[k].kind == ContextKind::dirty_bitmap) stopped[k] = true;
    else if (want[k]) any_active = true;
  }
  // REQ_ONE keeps one extent per context: asking the engine for up to 1024
  // (each an L2 lookup on qcow2) cost ~100 us per request on a fragmented
  // image, and QEMU's client sends REQ_ONE always. Ask for two (the engine
  // merges equal neighbours, and the second usually ends the first list);
  // the loop asks again while a context's extent is still growing.
  const std::size_t batch = req_one ? 2 : 1024;
  s.extents.resize(batch);
  std::uint64_t pos = 0;
  while (pos < length && any_active) {
    auto bs = dev.block_status(r.offset + pos, length - pos, s.extents);
    if (!bs) {
      log::warn("conn {}: BLOCK_STATUS offset {}: {}", id_, r.offset + pos, bs.error().message);
      if (pos == 0) return reply_error(s, errno_to_nbd(bs.error().code), bs.error().message);
      break;
    }
    if (*bs == 0) break;
    for (std::size_t i = 0; i < *bs && any_active; ++i) {
      const auto& e = s.extents[i];
      auto len = std::min(e.length, length - pos);
      if (len == 0) break;
      any_active = false;
      for (std::size_t k = 0; k < nctx; ++k) {
        if (!want[k] || stopped[k]) continue;
        std::uint32_t flags = 0;
        switch (ctxs[k].kind) {
          case ContextKind::base_allocation:
            flags = (e.allocated ? 0 : NBD_STATE_HOLE) | (e.zero ? NBD_STATE_ZERO : 0);
            break;
          case ContextKind::allocation_depth: flags = e.depth; break;
          case ContextKind::dirty_bitmap: flags = 0; break;
        }
        // REQ_ONE keeps one extent, but as long as equal neighbours make it
        // (what qemu-nbd answers); add() refuses the first different one.
        if (!s.lists[k].add(len, flags)) stopped[k] = true;
        else any_active = true;
      }
      pos += len;
    }
  }
  // qemu:dirty-bitmap:NAME contexts: runs at the bitmap's granularity.
  for (std::size_t k = 0; k < nctx; ++k) {
    if (!want[k] || ctxs[k].kind != ContextKind::dirty_bitmap) continue;
    const auto handle = export_->bitmap_handles.at(ctxs[k].bitmap);
    s.bitmap_extents.resize(batch);
    std::uint64_t bpos = 0;
    bool active = true;
    while (bpos < length && active) {
      auto bs = dev.bitmap_status(handle, r.offset + bpos, length - bpos, s.bitmap_extents);
      if (!bs) {
        log::warn("conn {}: BLOCK_STATUS {} offset {}: {}", id_, ctxs[k].name, r.offset + bpos, bs.error().message);
        if (bpos == 0) return reply_error(s, errno_to_nbd(bs.error().code), bs.error().message);
        break;
      }
      if (*bs == 0) break;
      for (std::size_t i = 0; i < *bs; ++i) {
        auto len = std::min(s.bitmap_extents[i].length, length - bpos);
        if (len == 0) break;
        if (!s.lists[k].add(len, s.bitmap_extents[i].dirty ? NBD_STATE_DIRTY : 0)) {
          active = false;
          break;
        }
        bpos += len;
      }
    }
  }
  std::size_t last = nctx;
  for (std::size_t k = 0; k < nctx; ++k)
    if (want[k] && !s.lists[k].extents().empty()) last = k;
  if (last == nctx) return reply_error(s, NBD_EIO, "no block status available");
  for (std::size_t k = 0; k < nctx; ++k) {
    if (!want[k] || s.lists[k].extents().empty()) continue;
    auto from = s.meta.size();
    append_block_status_chunk(s.meta, mode, k == last ? NBD_REPLY_FLAG_DONE : 0, r.cookie, r.offset, ctxs[k].id,
                              s.lists[k].extents());
    s.add_meta(from);
  }
}

// ---------------------------------------------------------------------------
// Server

Result<void> Server::add_acceptor(const asio::generic::stream_protocol::endpoint& ep, bool v6only) {
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
  return ok();
}

Result<void> Server::listen() {
  for (const auto& l : opts_.listeners) {
    switch (l.kind) {
      case ListenerSpec::Kind::tcp: {
        asio::ip::tcp::resolver resolver(ctx_);
        boost::system::error_code ec;
        auto results = resolver.resolve(l.host, std::to_string(l.port),
                                        asio::ip::tcp::resolver::passive | asio::ip::tcp::resolver::numeric_service,
                                        ec);
        if (ec) return make_error(EINVAL, "cannot resolve '{}': {}", l.host, ec.message());
        bool any = false;
        for (const auto& r : results) {
          auto ep = r.endpoint();
          auto res = add_acceptor(asio::generic::stream_protocol::endpoint(ep), ep.address().is_v6());
          if (!res) return make_error(res.error().code, "cannot listen on {}:{}: {}", l.host, l.port, res.error().message);
          any = true;
        }
        if (!any) return make_error(EINVAL, "no address for '{}'", l.host);
        break;
      }
      case ListenerSpec::Kind::unix_socket: {
        struct stat st;
        // Replace a stale socket from an earlier run, never another file type.
        if (::lstat(l.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(l.path.c_str());
        asio::local::stream_protocol::endpoint uep(l.path);
        auto res = add_acceptor(asio::generic::stream_protocol::endpoint(uep), false);
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
        break;
      }
    }
  }
  if (acceptors_.empty()) return make_error(EINVAL, "no listeners");
  if (!opts_.control_path.empty()) control_ = QNBD_TRY(ControlServer::start(opts_.control_path, *this));
  return ok();
}

awaitable<void> Server::accept_loop(Acceptor& acc) {
  for (;;) {
    // Connection cap: stop accepting while full; clients wait in the backlog
    // (what qemu-nbd does with --shared).
    while (opts_.max_connections && !shutting_down_) {
      std::size_t n;
      {
        std::lock_guard lk(sessions_mu_);
        n = sessions_.size();
      }
      if (n < opts_.max_connections) break;
      slot_timer_.expires_after(std::chrono::milliseconds(20));
      co_await slot_timer_.async_wait(use_tuple);
    }
    if (shutting_down_) co_return;
    auto strand = asio::make_strand(next_io_context());
    auto [ec, sock] = co_await acc.async_accept(strand, use_tuple);
    if (ec) {
      if (ec == asio::error::operation_aborted || shutting_down_) co_return;
      log::warn("accept: {}", ec.message());
      if (ec == asio::error::no_descriptors || ec == asio::error::no_buffer_space) {
        slot_timer_.expires_after(std::chrono::milliseconds(100));
        co_await slot_timer_.async_wait(use_tuple);
      }
      continue;
    }
    auto id = next_id_++;
    auto session = std::make_shared<Session>(*this, std::move(sock), id);
    {
      std::lock_guard lk(sessions_mu_);
      sessions_.insert(session);
      had_client_ = true;
    }
    log::debug("conn {}: accepted", id);
    asio::co_spawn(session->get_executor(), session->run(), [this, session](std::exception_ptr e) {
      if (e) {
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& ex) {
          log::error("session error: {}", ex.what());
        }
      }
      session_ended(session);
    });
  }
}

void Server::session_ended(const std::shared_ptr<Session>& s) {
  bool last;
  {
    std::lock_guard lk(sessions_mu_);
    sessions_.erase(s);
    last = sessions_.empty();
  }
  if (last && shutting_down_) asio::post(strand_, [this] { drained_.cancel(); });
  if (last && !opts_.persistent)
    asio::post(strand_, [this] { begin_shutdown("last client disconnected"); });
}

std::vector<ControlExport> Server::control_exports() {
  std::vector<ControlExport> out;
  for (const ExportSpec& e : opts_.exports) {
    ControlExport c;
    c.name = e.info.name;
    c.image = e.image;
    c.format = e.device->format();
    c.size = e.info.size;
    c.read_only = e.info.read_only;
    c.device = e.device;
    out.push_back(std::move(c));
  }
  std::lock_guard lk(sessions_mu_);
  for (const auto& s : sessions_) {
    for (std::size_t i = 0; i < out.size(); ++i) {
      if (s->export_spec() == &opts_.exports[i]) ++out[i].connections;
    }
  }
  return out;
}

std::vector<std::shared_ptr<Session>> Server::live_sessions() {
  std::lock_guard lk(sessions_mu_);
  return {sessions_.begin(), sessions_.end()};
}

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
  asio::co_spawn(strand_, shutdown_sequence(), asio::detached);
}

awaitable<void> Server::shutdown_sequence() {
  boost::system::error_code ec;
  for (auto& a : acceptors_) a->close(ec);
  slot_timer_.cancel();
  // No bitmap edit may run while the images are closed: stop the control
  // socket first (waits for a command in progress).
  control_.reset();
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
  int status = 0;
  for (auto& e : opts_.exports) {
    auto res = e.device->close();
    if (!res) {
      log::error("closing export '{}': {}", e.info.name, res.error().message);
      status = 1;
    }
  }
  for (const auto& p : unix_paths_) ::unlink(p.c_str());
  exit_status_ = status;
  stop_io();
}

asio::io_context& Server::next_io_context() {
  const std::size_t i = next_ctx_.fetch_add(1, std::memory_order_relaxed) % (workers_.size() + 1);
  return i == 0 ? ctx_ : *workers_[i - 1];
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
  begin_shutdown(sig == SIGINT ? "SIGINT" : "SIGTERM");
  signals_.async_wait([this](boost::system::error_code ec, int s) {
    if (!ec) handle_signal(s);
  });
}

int Server::run() {
  signals_.async_wait([this](boost::system::error_code ec, int sig) {
    if (ec) return;
    handle_signal(sig);
  });
  for (auto& a : acceptors_) asio::co_spawn(strand_, accept_loop(*a), asio::detached);
  if (opts_.on_listening) opts_.on_listening();
  std::vector<std::thread> threads;
  for (auto& w : workers_) threads.emplace_back([&w] { w->run(); });
  ctx_.run();
  for (auto& t : threads) t.join();
  pool_.join();
  return exit_status_;
}

}  // namespace

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

protocol::ExportInfo describe_export(const image::BlockDevice& device, std::string name, std::string description,
                                     bool read_only, bool multi_conn, bool allocation_depth) {
  auto caps = device.capabilities();
  protocol::ExportInfo e;
  e.name = std::move(name);
  e.description = std::move(description);
  e.size = device.size();
  e.read_only = read_only || !caps.writable;
  e.can_flush = true;
  e.can_fua = true;
  e.can_cache = true;
  // Like qemu-nbd: a writable export offers TRIM (a no-op with
  // --discard=ignore), WRITE_ZEROES and FAST_ZERO.
  e.can_trim = true;
  e.can_write_zeroes = true;
  e.can_fast_zero = true;
  e.can_multi_conn = multi_conn && caps.can_multi_conn;
  e.min_block = std::max<std::uint32_t>(1, caps.min_block);
  // qemu-nbd advertises max(4096, minimum), not the cluster size.
  e.preferred_block = std::max<std::uint32_t>(4096, e.min_block);
  e.max_payload = protocol::kMaxPayload;
  e.allocation_depth = allocation_depth;
  return e;
}

Result<int> run_server(ServerOptions options) {
  int status;
  {
    Server server(std::move(options));
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
