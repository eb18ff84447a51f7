// Control socket (see control.hpp): command execution and the Unix socket.
#include "server/control.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <mutex>
#include <set>
#include <thread>

#include <boost/asio.hpp>
#include <boost/asio/experimental/as_tuple.hpp>

#include "common/log.hpp"
#include "image/checkpoint.hpp"
#include "image/view/cbw.hpp"
#include "server/accept_backoff.hpp"
#include "server/run_context.hpp"
#include "server/unix_endpoint.hpp"

namespace qnbd::server {

namespace asio = boost::asio;
namespace pc = qnbd::protocol::control;
using nlohmann::json;

namespace {

constexpr auto kReplyTimeout = std::chrono::seconds(10);
constexpr std::size_t kMaxClients = 64;

pc::Refusal refusal(const json& id, const Error& e) {
  return pc::Refusal{id, pc::error_code_for_errno(e.code), e.message};
}

json status_json(ControlTarget& t) {
  json exports = json::array();
  for (const ControlExport& e : t.control_exports()) {
    json bitmaps = json::array();
    if (auto st = e.device->bitmap_states()) {
      for (const image::BitmapState& b : *st) {
        bitmaps.push_back(json{{"name", b.name},
                               {"granularity", b.granularity},
                               {"enabled", b.enabled},
                               {"in_use", b.in_use},
                               {"dirty_bytes", b.dirty_bytes}});
      }
    }
    json views = json::array();
    if (auto* cbw = dynamic_cast<image::CbwDevice*>(e.device.get())) {
      for (const auto& v : cbw->views()) {
        const image::ViewState st = v->state();
        json j{{"name", e.name + "@" + st.checkpoint}, {"checkpoint", st.checkpoint},      {"state", st.state},
               {"scratch_bytes", st.scratch_bytes},    {"scratch_max", st.scratch_max},    {"granule", st.granule},
               {"saved_granules", st.saved_granules},  {"zero_granules", st.zero_granules}};
        if (!st.error.empty()) j["error"] = st.error;
        views.push_back(std::move(j));
      }
    }
    exports.push_back(json{{"name", e.name},
                           {"image", e.image},
                           {"format", e.format},
                           {"size", e.size},
                           {"read_only", e.read_only},
                           {"connections", e.connections},
                           {"bitmaps", bitmaps},
                           {"views", views}});
  }
  return json{{"exports", exports}, {"jobs", json::array()}};
}

// The views of a checkpoint being taken: prepared (scratch opened) before
// the switch, attached at it, served as exports after it.
struct PendingView {
  std::string name;  // EXPORT@CHECKPOINT
  ControlExport parent;
  image::CbwDevice* cbw = nullptr;
  std::shared_ptr<image::PointInTimeView> view;
};

std::variant<json, pc::Refusal> checkpoint(ControlTarget& target, const pc::Request& req, const pc::Checkpoint& c) {
  const std::vector<ControlExport> all = target.control_exports();
  auto find = [&](const std::string& name) -> const ControlExport* {
    for (const ControlExport& e : all)
      if (e.name == name) return &e;
    return nullptr;
  };
  std::vector<image::BlockDevice*> devs;
  for (const std::string& e : c.exports) {
    const ControlExport* x = find(e);
    if (!x) return refusal(req.id, make_error(ENOENT, "no export named '{}'", e));
    devs.push_back(x->device.get());  // `all` keeps it alive while the checkpoint runs
  }
  std::vector<PendingView> views;
  for (const std::string& e : c.views) {
    PendingView p;
    p.name = e + "@" + c.name;
    p.parent = *find(e);
    p.cbw = dynamic_cast<image::CbwDevice*>(p.parent.device.get());
    if (!p.cbw)
      return refusal(req.id, make_error(ENOTSUP, "export '{}' cannot have views (not a writable qcow2 export)", e));
    if (find(p.name)) return refusal(req.id, make_error(EEXIST, "an export named '{}' exists", p.name));
    auto v = p.cbw->prepare_view(c.name);
    if (!v) return refusal(req.id, v.error());
    p.view = std::move(*v);
    views.push_back(std::move(p));
  }
  bool attached = false;
  auto detach_all = [&] {
    for (PendingView& p : views) p.cbw->detach(c.name);
  };
  // The views start at the switch itself: every gate is shut and drained
  // there, so each write is wholly before (in the view's content) or
  // wholly after (saved before it is written), the same on every export.
  auto r = image::checkpoint(devs, c.name, c.disable, c.granularity, [&] {
    for (PendingView& p : views) p.cbw->attach(p.view);
    attached = true;
  });
  if (!r) {
    if (attached) detach_all();
    return refusal(req.id, r.error());
  }
  json names = json::array();
  for (std::size_t i = 0; i < views.size(); ++i) {
    PendingView& p = views[i];
    ExportSpec spec;
    spec.info = describe_export(*p.view, p.name, fmt::format("'{}' at checkpoint '{}'", p.parent.name, c.name),
                                /*read_only=*/true, /*multi_conn=*/true, p.parent.allocation_depth);
    if (!c.disable.empty()) {
      // PREV, disabled at the switch: what changed between PREV and NEW.
      auto h = p.view->export_bitmap(c.disable);
      if (h) spec.bitmaps.push_back({c.disable, *h});
    }
    spec.info.bitmaps.clear();
    for (const auto& b : spec.bitmaps) spec.info.bitmaps.push_back(b.name);
    spec.device = p.view;
    spec.image = p.parent.image;
    spec.inline_io = false;  // a view read may wait for a copy in progress
    if (auto a = target.add_view_export(std::move(spec)); !a) {
      for (std::size_t k = 0; k < i; ++k) (void)target.remove_view_export(views[k].name);
      detach_all();
      return refusal(req.id, a.error());
    }
    names.push_back(p.name);
  }
  const double pause_us = std::chrono::duration<double, std::micro>(r->pause).count();
  log::info("checkpoint '{}' over {} export(s), {} view(s): writes paused {:.0f} us", c.name, devs.size(), views.size(),
            pause_us);
  return json{{"name", c.name}, {"pause_us", pause_us}, {"views", names}};
}

std::variant<json, pc::Refusal> view_end(ControlTarget& target, const pc::Request& req, const pc::ViewEnd& c) {
  struct Found {
    std::string name, checkpoint;
    image::CbwDevice* cbw;
    std::shared_ptr<image::BlockDevice> keep;
  };
  std::vector<Found> found;
  for (const ControlExport& e : target.control_exports()) {
    auto* cbw = dynamic_cast<image::CbwDevice*>(e.device.get());
    if (!cbw) continue;
    for (const auto& v : cbw->views()) {
      const std::string name = e.name + "@" + v->checkpoint();
      const bool wanted = c.checkpoint.empty() ? std::find(c.views.begin(), c.views.end(), name) != c.views.end()
                                               : v->checkpoint() == c.checkpoint;
      if (wanted) found.push_back({name, v->checkpoint(), cbw, e.device});
    }
  }
  for (const std::string& n : c.views) {
    if (std::none_of(found.begin(), found.end(), [&](const Found& f) { return f.name == n; }))
      return refusal(req.id, make_error(ENOENT, "no view named '{}'", n));
  }
  if (found.empty()) return refusal(req.id, make_error(ENOENT, "checkpoint '{}' has no view", c.checkpoint));
  json names = json::array();
  for (const Found& f : found) {
    // Ended first (its readers get EIO, its scratch is freed), then unlisted
    // and its connections closed.
    f.cbw->detach(f.checkpoint);
    (void)target.remove_view_export(f.name);
    log::info("view '{}' ended", f.name);
    names.push_back(f.name);
  }
  return json{{"views", names}};
}

}  // namespace

std::variant<json, pc::Refusal> execute_control(ControlTarget& target, const pc::Request& req) {
  auto device = [&](const std::string& name) -> Result<std::shared_ptr<image::BlockDevice>> {
    for (ControlExport& e : target.control_exports()) {
      if (e.name == name) return e.device;
    }
    return make_error(ENOENT, "no export named '{}'", name);
  };
  auto edit = [&](const std::string& exp, std::vector<image::LiveBitmapOp> ops) -> std::variant<json, pc::Refusal> {
    auto d = device(exp);
    if (!d) return refusal(req.id, d.error());
    auto r = image::apply_bitmap_edits({image::DeviceEdit{d->get(), std::move(ops)}});
    if (!r) return refusal(req.id, r.error());
    return json::object();
  };
  using K = image::LiveBitmapOp::Kind;
  auto op = [](K k, std::string name, std::string source = {}) {
    image::LiveBitmapOp o;
    o.kind = k;
    o.name = std::move(name);
    o.source = std::move(source);
    return o;
  };
  return std::visit(
      [&](const auto& c) -> std::variant<json, pc::Refusal> {
        using T = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<T, pc::Status>) {
          return status_json(target);
        } else if constexpr (std::is_same_v<T, pc::BitmapAdd>) {
          image::LiveBitmapOp o = op(K::add, c.name);
          o.granularity = c.granularity;
          o.disabled = c.disabled;
          return edit(c.export_name, {o});
        } else if constexpr (std::is_same_v<T, pc::BitmapSimple>) {
          static constexpr K kinds[] = {K::remove, K::clear, K::enable, K::disable};
          return edit(c.export_name, {op(kinds[static_cast<int>(c.kind)], c.name)});
        } else if constexpr (std::is_same_v<T, pc::BitmapMerge>) {
          std::vector<image::LiveBitmapOp> ops;
          for (const std::string& s : c.sources) ops.push_back(op(K::merge, c.target, s));
          return edit(c.export_name, std::move(ops));
        } else if constexpr (std::is_same_v<T, pc::ExportAdd>) {
          if (auto r = target.add_export(c); !r) return refusal(req.id, r.error());
          return json::object();
        } else if constexpr (std::is_same_v<T, pc::ExportRemove>) {
          if (auto r = target.remove_export(c.name, c.force); !r) return refusal(req.id, r.error());
          return json::object();
        } else if constexpr (std::is_same_v<T, pc::ViewEnd>) {
          return view_end(target, req, c);
        } else {
          static_assert(std::is_same_v<T, pc::Checkpoint>);
          return checkpoint(target, req, c);
        }
      },
      req.cmd);
}

std::string handle_control_line(ControlTarget& target, std::string_view line) {
  auto parsed = pc::parse_request(line);
  if (auto* f = std::get_if<pc::Refusal>(&parsed)) return pc::encode_error(f->id, f->code, f->message);
  const pc::Request& req = std::get<pc::Request>(parsed);
  auto out = execute_control(target, req);
  if (auto* f = std::get_if<pc::Refusal>(&out)) return pc::encode_error(f->id, f->code, f->message);
  return pc::encode_result(req.id, std::get<json>(out));
}

// ---------------------------------------------------------------------------
// The socket

struct ControlServer::Impl {
  using Socket = asio::local::stream_protocol::socket;
  static constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

  Impl(std::string p, ControlTarget& t) : path(std::move(p)), target(t), acceptor(ctx) {}

  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, sock] = co_await acceptor.async_accept(use_tuple);
      if (ec) {
        if (ec == asio::error::operation_aborted || stopping) co_return;
        log::warn("control: accept: {}", ec.message());
        co_await back_off_after_accept(ec, ctx.get_executor());
        continue;
      }
      if (clients.size() >= kMaxClients) {
        log::warn("control: more than {} clients; connection refused", kMaxClients);
        continue;  // sock closes here
      }
      auto s = std::make_shared<Socket>(std::move(sock));
      clients.insert(s);
      asio::co_spawn(ctx, client(s), [this, s](std::exception_ptr e) {
        if (e) log::warn("control: a client's connection failed; closed");
        clients.erase(s);
      });
    }
  }

  asio::awaitable<void> client(std::shared_ptr<Socket> s) {
    pc::LineBuffer lines;
    std::vector<char> buf(64 * 1024);
    asio::steady_timer deadline(ctx);
    for (;;) {
      while (auto l = lines.next()) {
        std::string reply =
            l->too_long ? pc::encode_error(nullptr, pc::ErrorCode::parse_error, "request line is longer than 1 MiB")
                        : handle_control_line(target, l->text);
        // A client that does not take its reply in time is cut off.
        deadline.expires_after(kReplyTimeout);
        deadline.async_wait([s](boost::system::error_code ec) {
          if (!ec) {
            boost::system::error_code ignored;
            s->close(ignored);
          }
        });
        auto [ec, n] = co_await asio::async_write(*s, asio::buffer(reply), use_tuple);
        deadline.cancel();
        if (ec) co_return;
      }
      auto [ec, n] = co_await s->async_read_some(asio::buffer(buf), use_tuple);
      if (ec) co_return;
      lines.feed(std::string_view(buf.data(), n));
    }
  }

  std::string path;
  ControlTarget& target;
  asio::io_context ctx{1};
  asio::local::stream_protocol::acceptor acceptor;
  std::set<std::shared_ptr<Socket>> clients;  // on ctx's thread only
  bool stopping = false;
  std::thread thread;
};

Result<std::unique_ptr<ControlServer>> ControlServer::start(const std::string& path, ControlTarget& target) {
  auto endpoint = unix_endpoint(path);
  if (!endpoint) return make_error(endpoint.error().code, "control socket: {}", endpoint.error().message);
  auto impl = std::make_unique<Impl>(path, target);
  if (auto cleared = clear_stale_socket(path); !cleared)
    return make_error(cleared.error().code, "control socket {}: {}", path, cleared.error().message);
  boost::system::error_code ec;
  const auto& ep = *endpoint;
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) {
    // Owner only from the start: the umask covers the bind (no moment where
    // another user could connect); chmod makes it explicit.
    const mode_t old = ::umask(0177);
    impl->acceptor.bind(ep, ec);
    ::umask(old);
  }
  if (!ec && ::chmod(path.c_str(), 0600) != 0) ec.assign(errno, boost::system::system_category());
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return make_error(ec.value(), "control socket {}: {}", path, ec.message());
  Impl* p = impl.get();
  // The timer service (and its reactor), made now while descriptors are
  // free, so the backoff above and the clients' deadlines cannot fail for
  // the lack of one (Server's constructor does the same for its contexts).
  { asio::steady_timer warm(p->ctx); }
  asio::co_spawn(p->ctx, p->accept_loop(), [](std::exception_ptr e) {
    if (e) log::error("control: accept loop failed; the control socket is deaf");
  });
  p->thread = std::thread([p] { run_context(p->ctx, "control socket thread"); });
  return std::unique_ptr<ControlServer>(new ControlServer(std::move(impl)));
}

ControlServer::ControlServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ControlServer::~ControlServer() {
  Impl* p = impl_.get();
  asio::post(p->ctx, [p] {
    p->stopping = true;
    boost::system::error_code ec;
    p->acceptor.close(ec);
    for (const auto& s : p->clients) s->close(ec);
  });
  // A command still running (a checkpoint) finishes first; then the loop
  // has nothing left.
  p->thread.join();
  ::unlink(p->path.c_str());
}

}  // namespace qnbd::server
