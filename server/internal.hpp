// Declarations shared by the rooms of server/ (not part of its interface:
// that is server.hpp). Start here.
//
// Rooms (one duty each):
//   server.cpp          Server: io threads (one io_context each), the
//                       blocking pool, run_server()
//   listener.cpp        TCP, Unix and systemd sockets, the accept loop, the
//                       connection cap, placing a connection on an io thread
//   session.cpp         one connection: handshake (Negotiator under a
//                       deadline), the reader, back-pressure
//   dispatch.cpp        protocol::decode, then Command -> BlockDevice:
//                       inline-or-pool, execute, the device I/O of READ and
//                       BLOCK_STATUS (what their replies say is protocol/'s
//                       ReadPlan and BlockStatusPlan)
//   reply_writer.cpp    reply encoding, the non-blocking sender
//                       (send_some) and the writer coroutine, the
//                       splice pipe of zero-copy READs
//   export_registry.cpp one Export per export (info, device, bitmaps and
//                       their handles), the registry, describe_export
//   shutdown.cpp        the shutdown sequence and the signals
//   buffer_pool.cpp     the process-wide pool of large buffers
//
// Who guards what:
//   - Session state (slots, counters, ready_ queue, timers, socket) lives on
//     the session's strand, on one io thread; no lock. Dispatch work sent to
//     the blocking pool touches only its Slot and the (thread-safe) device,
//     and resumes on the session strand before the slot is queued.
//   - Server::strand_ (on ctx_): acceptors, accept loops, slot_freed_ and
//     drained_ (timers used as signals, cancelled by session_ended), the
//     shutdown sequence, signals.
//   - ExportRegistry::mu_: the list of exports and the connections attached
//     to each (see export_registry.hpp); an Export is immutable and shared
//     by the connections on it. The control socket adds and removes
//     exports while serving.
//   - Server::sessions_mu_: the set of live sessions (accept loop, session
//     end, shutdown). Never held while calling into a session or a device.
//   - BufferPool::mu_: the free list; a leaf lock.
// No coroutine is spawned with asio::detached: log_failure logs what
// escapes and ends what it belonged to.
// Lock order: sessions_mu_, ExportRegistry::mu_ and BufferPool::mu_ are
// leaves: none is held while taking another lock or calling into image/
// (whose locks docs/architecture.md lists).
#pragma once

#include <sys/resource.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <boost/asio.hpp>
#include <boost/asio/experimental/as_tuple.hpp>

#include "common/log.hpp"
#include "common/result.hpp"
#include "protocol/negotiator.hpp"
#include "protocol/reply.hpp"
#include "protocol/request.hpp"
#include "protocol/transmission.hpp"
#include "server/buffer_pool.hpp"
#include "server/control.hpp"
#include "server/export_registry.hpp"
#include "server/poll_window.hpp"
#include "server/run_context.hpp"
#include "server/server.hpp"
#include "server/stream.hpp"
#include "server/tls.hpp"

namespace qnbd::server {

namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
using Socket = asio::generic::stream_protocol::socket;
using Acceptor = asio::basic_socket_acceptor<asio::generic::stream_protocol>;
using Strand = asio::strand<asio::io_context::executor_type>;
using namespace qnbd::protocol;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

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

// One piece of a reply: bytes of the slot's `meta` or `data` at offset,
// or the next `length` bytes of the connection's splice pipe (a zero-copy
// READ's payload, Session::splice_in).
struct Piece {
  enum class Source : std::uint8_t { meta, data, pipe };
  Source source = Source::meta;
  std::size_t offset = 0;
  std::size_t length = 0;
};

// Per-request state, reused across requests of a connection.
struct Slot {
  Request req;  // as parsed: cookie and offset of the reply, even when refused
  Command cmd;  // as decoded (answer_without_device), what execute() runs
  Buffer data;
  std::vector<std::byte> meta;
  std::vector<Piece> pieces;
  std::vector<image::Extent> extents;
  std::vector<image::BitmapExtent> bitmap_extents;
  BlockStatusPlan status;  // reused: its extent lists keep their capacity
  std::uint64_t charged_bytes = 0;
  // Bytes this slot put into the splice pipe for a reply it then replaced
  // with an error (reply_error): the sender drops them from the pipe
  // before it sends this reply, keeping the pipe in step with ready_.
  std::size_t pipe_junk = 0;
  void add_meta(std::size_t from) { pieces.push_back({Piece::Source::meta, from, meta.size() - from}); }
  // Where a meta or data piece's bytes are (a pipe piece has none).
  const std::byte* piece_bytes(const Piece& p) const {
    return (p.source == Piece::Source::data ? data.data.get() : meta.data()) + p.offset;
  }
  std::size_t reply_bytes() const {
    std::size_t n = 0;
    for (const auto& p : pieces) n += p.length;
    return n;
  }
};

class Server;

// ---------------------------------------------------------------------------
class Session : public std::enable_shared_from_this<Session> {
 public:
  static constexpr std::size_t kMaxBatch = 16;
  // Largest READ and WRITE run inline (dispatch.cpp runs_inline). A READ
  // from the page cache is a copy (about 100 us per MiB here), cheaper than
  // the two thread switches of the pool: fio's 1 MiB sequential reads ran
  // 8-15 % faster inline. A big buffered WRITE can stall in dirty-page
  // throttling, where it would hold up every connection of the io thread.
  static constexpr std::uint32_t kInlineMaxRead = 2u << 20;
  static constexpr std::uint32_t kInlineMaxWrite = 256u << 10;
  static constexpr auto kSlowInline = std::chrono::microseconds(200);
  // Zero-copy READs: payload runs of at least kSpliceMinBytes are spliced
  // from the page cache (smaller ones cost less copied than the two splice
  // calls); the pipe is asked to hold kSplicePipeBytes, and below
  // kMinSplicePipeBytes it is not used at all.
  static constexpr std::size_t kSpliceMinBytes = 64u << 10;
  static constexpr std::size_t kSplicePipeBytes = 1u << 20;
  static constexpr std::size_t kMinSplicePipeBytes = 256u << 10;
  static constexpr std::uint32_t kPoolCredit = 256;
  Session(Server& server, Socket socket, std::uint64_t id, std::shared_ptr<const TlsCredentials> tls,
          std::string peer_address)
      : server_(server), socket_(std::move(socket)), id_(id), tls_creds_(std::move(tls)),
        peer_address_(std::move(peer_address)), wake_reader_(socket_.get_executor()),
        wake_writer_(socket_.get_executor()), deadline_(socket_.get_executor()) {
    wake_reader_.expires_at(asio::steady_timer::time_point::max());
    wake_writer_.expires_at(asio::steady_timer::time_point::max());
  }
  ~Session();

  awaitable<void> run();
  // Called on the session's executor: stop reading requests, let in-flight
  // ones finish (server shutdown).
  void stop();
  // Called on the session's executor when the client did not take its
  // replies within the shutdown grace: cancel the socket's operations and
  // drop unsent replies; the session still ends only once its in-flight
  // disk work is done (the images are closed after that).
  void abort();
  // Called on the session's executor after run() threw: close the socket
  // (the client sees the connection end, not a hang).
  void close();
  auto get_executor() { return socket_.get_executor(); }
  // The client's IP address ("" for Unix sockets): the per-address cap.
  const std::string& peer_address() const { return peer_address_; }
  std::uint64_t id() const { return id_; }
  // Called on the session's executor once run() is over (session_ended):
  // drops the export and detaches from it, so a removal waiting for this
  // connection can close the image.
  void release_export();

 private:
  awaitable<bool> handshake();
  awaitable<void> transmission();
  awaitable<void> writer();
  awaitable<void> handle(Slot* slot);
  void spawn_handle(Slot* slot);        // handle() on the session's executor, failures logged
  bool answer_without_device(Slot& s);  // refusals and CACHE; true if answered
  bool runs_inline(const Request& r);
  void execute_inline(Slot& s);
  // Runs on the blocking pool, or inline on the io thread (runs_inline):
  // only then may a READ use the session's splice pipe.
  void execute(Slot& s, bool on_io_thread);
  template <typename Step>
  bool in_steps(Slot& s, Step&& step, Result<void>& res);
  void do_read(Slot& s, bool on_io_thread);
  // Zero-copy READs (plain connections, devices with host_run): up to
  // `length` bytes of fd at host_offset into the splice pipe; how many
  // went in (0: no room, end of file, or the pipe could not be made).
  std::size_t splice_in(int fd, std::uint64_t host_offset, std::size_t length);
  bool open_splice_pipe();
  void do_block_status(Slot& s);
  void reply_error(Slot& s, const Error& e);  // protocol::append_error_reply
  void reply_ok(Slot& s);
  void queue_reply(Slot* s);
  void send_ready_now();
  // Sends ready_ from the front without waiting (plain connections): memory
  // pieces gathered into one sendmsg, pipe pieces spliced to the socket.
  enum class SendStatus { all_sent, would_block, failed };
  SendStatus send_some();
  void sent(std::size_t n);  // n more bytes of ready_ left: retire whole replies
  Slot* get_slot();
  // A slot leaves flight: its charge is given back and it is reused.
  void retire_slot(Slot* s);

  Server& server_;
  Socket socket_;
  std::uint64_t id_;
  std::shared_ptr<const TlsCredentials> tls_creds_;  // set: TLS required
  std::string peer_address_;
  Stream stream_{socket_};  // the socket, or TLS over it after STARTTLS
  asio::steady_timer wake_reader_;
  asio::steady_timer wake_writer_;
  asio::steady_timer deadline_;
  asio::cancellation_signal read_cancel_;

  // Set by the handshake: the export (shared with the registry and the
  // other connections on it) and the selected contexts with their bitmap
  // handles, resolved once (Export::resolve_contexts), at most kMaxContexts.
  std::shared_ptr<const Export> export_;
  std::vector<ServedContext> contexts_;
  std::vector<ContextSlot> wire_contexts_;  // contexts_ as decode() and the plans see them
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
  // Plain connections: the reader (send_ready_now) and the writer both
  // send with send_some, from the front of ready_; head_sent_ is how much
  // of ready_.front()'s reply has left. The reader does not try while the
  // writer waits for room (writer_writing_). TLS connections: the writer
  // alone, through stream_.
  bool writer_writing_ = false;
  std::size_t head_sent_ = 0;
  std::vector<iovec> direct_iov_;
  // Zero-copy READs (NBD payload spliced from the page cache): a pipe per
  // connection, made at the first READ that can use it. Inline READs put
  // their pages in (in the order their slots enter ready_, since only the
  // io thread does), the senders take them out in the same order.
  // pipe_queued_: bytes in the pipe. Closed with the session.
  bool zero_copy_ = false;
  int pipe_r_ = -1;
  int pipe_w_ = -1;
  std::size_t pipe_capacity_ = 0;
  std::size_t pipe_queued_ = 0;
  // A kernel or sandbox that refuses splice from the pipe to the socket
  // (EINVAL and kin): zero-copy stops for the connection and what the
  // pipe still holds leaves by read and send through spill_ (made then),
  // spill_pos_..spill_end_ being the next unsent bytes of the front
  // reply's pipe piece.
  bool splice_out_ = true;
  static constexpr std::size_t kSpillBytes = 64u << 10;
  std::unique_ptr<std::byte[]> spill_;
  std::size_t spill_pos_ = 0, spill_end_ = 0;
  SendStatus send_pipe_copied(int sock, std::size_t want);
  // Receive buffer: one recv can bring many pipelined request headers (and
  // small write payloads), instead of one syscall per 28/32-byte header.
  static constexpr std::size_t kRecvBufferSize = 64u << 10;
  std::unique_ptr<std::byte[]> rbuf_;
  std::size_t rpos_ = 0, rend_ = 0;
  std::size_t buffered() const { return rend_ - rpos_; }
  // Until at least `need` (<= kRecvBufferSize) bytes are buffered.
  awaitable<boost::system::error_code> fill(std::size_t need);
  // What the socket holds now, without waiting; true if `need` bytes are buffered.
  bool fill_now(std::size_t need);
  // Adaptive polling for the next request (session.cpp says why).
  using Clock = std::chrono::steady_clock;
  PollWindow poll_;
  // The count of connections in transmission on this connection's io
  // thread (Server::transmitting_on): it polls only while that is 1, since
  // spinning would hold back the others' requests.
  std::atomic<unsigned>* transmitting_ = nullptr;
  unsigned requests_since_empty_ = 0;  // requests since the receive buffer last ran dry
  void poll_for_request(std::size_t need);
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> free_slots_;
};

// Completion handler for co_spawn: an exception that escaped the coroutine
// is logged with `what` (never dropped, as asio::detached would), then
// on_error() runs on the coroutine's executor.
std::string describe_exception(std::exception_ptr e);
template <typename F>
auto log_failure(std::string what, F on_error) {
  return [what = std::move(what), on_error = std::move(on_error)](std::exception_ptr e) mutable {
    if (!e) return;
    log::error("{}: {}", what, describe_exception(e));
    on_error();
  };
}

// The blocking pool waits for the disk (O_DIRECT, FLUSH, FUA, page-cache
// misses): its threads mostly sleep, so it is sized for the device's
// queue depth rather than the CPU count.
constexpr unsigned kMinBlockingThreads = 16;

// CPUs this process may run on (taskset, cgroup cpusets): more io threads
// than that only adds context switches.
unsigned usable_cpus();

// ---------------------------------------------------------------------------
class Server : public ExportCatalog, public ControlTarget {
 public:
  explicit Server(ServerOptions opts)
      : opts_(std::move(opts)), threads_(opts_.threads ? opts_.threads : usable_cpus()), ctx_(1), pool_(0),
        strand_(asio::make_strand(ctx_)), signals_(ctx_, SIGINT, SIGTERM, SIGHUP), slot_freed_(strand_),
        drained_(strand_) {
    slot_freed_.expires_at(asio::steady_timer::time_point::max());
    // One io_context per io thread, each run by that thread alone: a
    // connection lives on one of them (round robin), so its reads, inline
    // I/O and replies never hop threads. One context run by many threads
    // woke a second thread for nearly every completion (a futex round trip
    // per request: qd1 latency 2-3x qemu-nbd's single thread).
    for (unsigned i = 1; i < threads_; ++i) {
      workers_.push_back(std::make_unique<asio::io_context>(1));
      worker_guards_.push_back(asio::make_work_guard(*workers_.back()));
    }
    // Asio makes a context's reactor (an eventfd) and its socket and timer
    // services the first time they are used. Made lazily at the first
    // connection a context got, they failed once the descriptor table was
    // full (EMFILE): the accept threw out of run() and the process aborted.
    // Made now, while descriptors are free (a failure here is a one-line
    // startup error).
    auto warm = [](asio::io_context& c) {
      asio::generic::stream_protocol::socket socket(c);
      asio::steady_timer timer(c);
    };
    warm(ctx_);
    for (auto& w : workers_) warm(*w);
    for (std::size_t i = 0; i <= workers_.size(); ++i)
      transmitting_.push_back(std::make_unique<std::atomic<unsigned>>(0));
    start_pool_threads(std::max(kMinBlockingThreads, threads_));
  }
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  std::shared_ptr<const ExportList> exports() const override { return registry_.infos(); }
  bool shutting_down() const override { return shutting_down_.load(); }
  // The control socket's view of the exports, export-add and export-remove
  // (server.cpp).
  std::vector<ControlExport> control_exports() override;
  Result<void> add_export(const protocol::control::ExportAdd& req) override;
  Result<void> remove_export(const std::string& name, bool force) override;
  // Point-in-time views as exports (control.cpp adds them at a checkpoint).
  Result<void> add_view_export(ExportSpec spec) override;
  Result<void> remove_view_export(const std::string& name) override;

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

  ExportRegistry& registry() { return registry_; }
  // More than one CPU online: a session may spin briefly for its client's
  // next request (Session::poll_for_request). The client may run on a CPU
  // this process is not allowed (taskset), so this counts them all.
  bool may_poll() const { return cpus_online_ > 1; }
  // Connections in transmission on io_context `c` (one of this server's).
  std::atomic<unsigned>& transmitting_on(const asio::execution_context& c);
  const ServerOptions& options() const { return opts_; }
  asio::thread_pool& pool() { return pool_; }

  // Moves options().exports into the registry; before listen().
  Result<void> add_exports();
  Result<void> listen();
  int run();
  void session_ended(const std::shared_ptr<Session>& s);

 private:
  Result<void> add_acceptor(const asio::generic::stream_protocol::endpoint& ep, bool v6only,
                            std::shared_ptr<const TlsCredentials> tls);
  awaitable<void> accept_loop(Acceptor& acc, std::shared_ptr<const TlsCredentials> tls);
  // False (and logged) when `addr` already holds max_connections_per_address.
  bool admit_address(const std::string& addr, std::uint64_t id);
  void begin_shutdown(const char* why);
  awaitable<void> shutdown_sequence();
  // True once no session is left; false if `limit` passed first.
  awaitable<bool> wait_drained(std::chrono::steady_clock::duration limit);
  std::vector<std::shared_ptr<Session>> live_sessions();
  std::size_t session_count();
  void handle_signal(int sig);
  asio::io_context& next_io_context();
  void stop_io();

  ServerOptions opts_;  // exports moved to registry_ by add_exports()
  long cpus_online_ = ::sysconf(_SC_NPROCESSORS_ONLN);
  ExportRegistry registry_;
  unsigned threads_;
  // Per io context, ctx_ first, then workers_ in order: connections in
  // transmission there (transmitting_on). Destroyed after the contexts: a
  // session's coroutine still queued at exit decrements its count as its
  // frame is destroyed with them.
  std::vector<std::unique_ptr<std::atomic<unsigned>>> transmitting_;
  // Destroyed after ctx_: operations still queued in ctx_ at exit (an
  // accept cancelled by the shutdown) hold strands of these contexts.
  std::vector<std::unique_ptr<asio::io_context>> workers_;  // threads_ - 1 more io threads
  asio::io_context ctx_;                                    // listeners, signals, shutdown, and connections too
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> worker_guards_;
  std::atomic<std::size_t> next_ctx_{0};
  // The blocking pool: no thread of its own; start_pool_threads attaches
  // them one by one. asio::thread_pool(N) hangs if it cannot create all N
  // threads (a pids limit, RLIMIT_NPROC): its constructor joins the threads
  // it made, which never stop. Attached threads can be stopped and joined
  // when the next cannot be made. (Not thread_pool(1) plus attached ones:
  // a pool made for one thread tells its scheduler so, which then does not
  // wake idle threads for queued work.)
  asio::thread_pool pool_;
  std::vector<std::thread> pool_threads_;
  void start_pool_threads(unsigned n);
  Strand strand_;  // listeners and shutdown
  asio::signal_set signals_;
  // On strand_, used as signals: session_ended cancels slot_freed_ (never
  // expires; a connection slot is free, when max_connections is set) and
  // drained_ (expires at the shutdown wait's deadline; the last session
  // ended). A waiter re-checks its condition on every wake-up, and checks
  // and waits within one strand handler, so no wake-up is lost.
  asio::steady_timer slot_freed_;
  asio::steady_timer drained_;
  std::vector<std::unique_ptr<Acceptor>> acceptors_;
  std::vector<std::shared_ptr<const TlsCredentials>> acceptor_tls_;  // parallel to acceptors_
  std::vector<std::string> unix_paths_;
  std::atomic<bool> shutting_down_{false};
  std::mutex sessions_mu_;
  std::set<std::shared_ptr<Session>> sessions_;
  std::atomic<std::uint64_t> next_id_{1};
  bool had_client_ = false;
  std::atomic<int> signals_seen_{0};
  int exit_status_ = 0;
  // The control socket (control.hpp), if asked for; stopped once the
  // connections are gone and before the exports are closed, so no bitmap
  // edit runs on a closed image and a forced export-remove in progress can
  // see its connections end.
  std::unique_ptr<ControlServer> control_;
};

}  // namespace qnbd::server
