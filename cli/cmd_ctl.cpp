// qnbd ctl: the client of a running server's control socket
// (docs/control.md). Sends one request line, prints the reply: human
// readable by default, the reply's JSON with --output=json.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/commands.hpp"

namespace qnbd::cli {
namespace {

using nlohmann::json;

struct CtlArgs {
  std::string socket;
  std::string output = "human";
  // The arguments of whichever subcommand ran.
  std::string exp, name, target, image, format, disable;
  std::vector<std::string> sources, exports, bitmaps, views;
  std::uint64_t granularity = 0;
  bool disabled = false, read_only = false, allocation_depth = false, force = false, view = false;
};

// One request, one reply line (or an error message).
bool roundtrip(const std::string& path, const std::string& request, std::string& reply, std::string& err) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) {
    err = "socket path too long";
    return false;
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    err = std::strerror(errno);
    return false;
  }
  std::unique_ptr<int, void (*)(int*)> guard(new int(fd), [](int* p) {
    ::close(*p);
    delete p;
  });
  timeval tv{120, 0};  // a checkpoint waits for writes in flight, not minutes
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    err = fmt::format("cannot connect to {}: {}", path, std::strerror(errno));
    return false;
  }
  for (std::size_t done = 0; done < request.size();) {
    const ssize_t n = ::send(fd, request.data() + done, request.size() - done, MSG_NOSIGNAL);
    if (n <= 0) {
      err = fmt::format("sending to {}: {}", path, std::strerror(errno));
      return false;
    }
    done += static_cast<std::size_t>(n);
  }
  char buf[65536];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n == 0 ? "the server closed the connection without a reply" : std::strerror(errno);
      return false;
    }
    reply.append(buf, static_cast<std::size_t>(n));
    if (auto nl = reply.find('\n'); nl != std::string::npos) {
      reply.resize(nl);
      return true;
    }
    if (reply.size() > (64u << 20)) {
      err = "reply too long";
      return false;
    }
  }
}

std::string human_size(std::uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", b) : fmt::format("{:.1f} {}", v, units[u]);
}

void print_human(const std::string& command, const json& result) {
  if (command == "status") {
    for (const json& e : result.value("exports", json::array())) {
      std::printf("export '%s': %s (%s, %s%s), %zu connection(s)\n", e.value("name", "").c_str(),
                  e.value("image", "").c_str(), e.value("format", "").c_str(),
                  human_size(e.value("size", std::uint64_t{0})).c_str(),
                  e.value("read_only", false) ? ", read-only" : "", e.value("connections", std::size_t{0}));
      for (const json& b : e.value("bitmaps", json::array())) {
        std::printf("  bitmap '%s': granularity %s, %s%s, %s dirty\n", b.value("name", "").c_str(),
                    human_size(b.value("granularity", std::uint64_t{0})).c_str(),
                    b.value("enabled", false) ? "enabled" : "disabled",
                    b.value("in_use", false) ? ", in use (inconsistent)" : "",
                    human_size(b.value("dirty_bytes", std::uint64_t{0})).c_str());
      }
      for (const json& v : e.value("views", json::array())) {
        std::printf("  view '%s': %s, scratch %s of %s%s%s\n", v.value("name", "").c_str(),
                    v.value("state", "").c_str(), human_size(v.value("scratch_bytes", std::uint64_t{0})).c_str(),
                    human_size(v.value("scratch_max", std::uint64_t{0})).c_str(), v.contains("error") ? ": " : "",
                    v.value("error", "").c_str());
      }
    }
    const json jobs = result.value("jobs", json::array());
    std::printf("jobs: %zu\n", jobs.size());
  } else if (command == "checkpoint") {
    std::printf("checkpoint '%s' taken; writes paused %.0f us\n", result.value("name", "").c_str(),
                result.value("pause_us", 0.0));
    for (const json& v : result.value("views", json::array()))
      std::printf("view '%s' ready\n", v.get<std::string>().c_str());
  } else if (command == "view-end") {
    for (const json& v : result.value("views", json::array()))
      std::printf("view '%s' ended\n", v.get<std::string>().c_str());
  } else {
    std::printf("ok\n");
  }
}

int run_ctl(const CtlArgs& a, const std::string& command, json arguments) {
  if (a.output != "human" && a.output != "json") {
    std::fprintf(stderr, "qnbd ctl: --output must be human or json\n");
    return 1;
  }
  const std::string request =
      json{{"id", 1}, {"command", command}, {"arguments", std::move(arguments)}}.dump(-1, ' ', false,
                                                                                      json::error_handler_t::replace) +
      "\n";
  std::string reply, err;
  if (!roundtrip(a.socket, request, reply, err)) {
    std::fprintf(stderr, "qnbd ctl: %s\n", err.c_str());
    return 1;
  }
  json j = json::parse(reply, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    std::fprintf(stderr, "qnbd ctl: the server sent a reply that is not JSON\n");
    return 1;
  }
  if (a.output == "json") std::printf("%s\n", reply.c_str());
  if (auto e = j.find("error"); e != j.end()) {
    if (a.output == "human") {
      std::fprintf(stderr, "qnbd ctl: %s: %s\n", e->value("code", "?").c_str(), e->value("message", "").c_str());
    }
    return 1;
  }
  if (a.output == "human") print_human(command, j.value("result", json::object()));
  return 0;
}

}  // namespace

void add_ctl_command(CLI::App& app, int& status) {
  auto a = std::make_shared<CtlArgs>();
  auto* ctl = app.add_subcommand("ctl", "Manage a running server through its control socket (docs/control.md)");
  ctl->add_option("-s,--socket", a->socket, "The server's control socket (serve --control)")->required();
  ctl->add_option("--output", a->output, "human (default) or json (the reply as sent)");
  ctl->require_subcommand(1);
  auto on = [&status, a](CLI::App* sub, auto make) {
    sub->callback([&status, a, sub, make] { status = run_ctl(*a, sub->get_name(), make()); });
  };
  on(ctl->add_subcommand("status", "Exports, their bitmaps and connections, running jobs"),
     [] { return json::object(); });

  auto* add = ctl->add_subcommand("bitmap-add", "Add a persistent dirty bitmap, enabled unless --disabled");
  add->add_option("EXPORT", a->exp)->required();
  add->add_option("NAME", a->name)->required();
  add->add_option("-g,--granularity", a->granularity, "Bytes per bit (power of 2, 512 B to 2 GiB)");
  add->add_flag("--disabled", a->disabled, "Create it disabled");
  on(add, [a] {
    json j{{"export", a->exp}, {"name", a->name}};
    if (a->granularity) j["granularity"] = a->granularity;
    if (a->disabled) j["disabled"] = true;
    return j;
  });
  for (const char* n : {"bitmap-remove", "bitmap-clear", "bitmap-enable", "bitmap-disable"}) {
    auto* s =
        ctl->add_subcommand(n, std::string("The live ") + (n + 7) + " of one bitmap, as qnbd bitmap --" + (n + 7));
    s->add_option("EXPORT", a->exp)->required();
    s->add_option("NAME", a->name)->required();
    on(s, [a] { return json{{"export", a->exp}, {"name", a->name}}; });
  }
  auto* merge = ctl->add_subcommand("bitmap-merge", "Merge SOURCE bitmaps into TARGET");
  merge->add_option("EXPORT", a->exp)->required();
  merge->add_option("TARGET", a->target)->required();
  merge->add_option("SOURCE", a->sources)->required();
  on(merge, [a] { return json{{"export", a->exp}, {"target", a->target}, {"sources", a->sources}}; });

  auto* eadd = ctl->add_subcommand(
      "export-add",
      "Serve another image while the server runs, opened as serve opens its own (same locking, cache, discard); "
      "errors: exists, not-found, invalid-argument, not-supported, busy (image locked), io-error");
  eadd->add_option("NAME", a->name, "The export name")->required();
  eadd->add_option("IMAGE", a->image,
                   "The image path on the server; a relative one is resolved against the server's working "
                   "directory, not this command's")
      ->required();
  eadd->add_option("-f,--format", a->format, "raw or qcow2 (default: detect)");
  eadd->add_flag("-r,--read-only", a->read_only, "Read-only export");
  eadd->add_option("-B,--bitmap", a->bitmaps, "Offer qemu:dirty-bitmap:BITMAP");
  eadd->add_flag("-A,--allocation-depth", a->allocation_depth, "Offer qemu:allocation-depth");
  on(eadd, [a] {
    json j{{"name", a->name}, {"image", a->image}};
    if (!a->format.empty()) j["format"] = a->format;
    if (a->read_only) j["read-only"] = true;
    if (!a->bitmaps.empty()) j["bitmaps"] = a->bitmaps;
    if (a->allocation_depth) j["allocation-depth"] = true;
    return j;
  });
  auto* erm = ctl->add_subcommand(
      "export-remove", "Stop serving an export and close its image (bitmaps stored, lock released); errors: not-found, "
                       "busy (clients connected, no --force), io-error");
  erm->add_option("NAME", a->name, "The export name")->required();
  erm->add_flag("--force", a->force,
                "Close its connections (after their in-flight requests are answered) instead of refusing");
  on(erm, [a] { return json{{"name", a->name}, {"force", a->force}}; });

  auto* cp = ctl->add_subcommand("checkpoint", "Add the enabled bitmap NEW (and disable PREV) on every EXPORT at once");
  cp->add_option("--name", a->name, "The new bitmap")->required();
  cp->add_option("--disable", a->disable, "The bitmap to disable (the previous checkpoint)");
  cp->add_option("-g,--granularity", a->granularity, "Bytes per bit of NEW");
  cp->add_flag("--view", a->view,
               "Also serve each EXPORT as it is at the checkpoint: the read-only export EXPORT@NEW "
               "(docs/backup-views.md)");
  cp->add_option("EXPORT", a->exports)->required();
  on(cp, [a] {
    json j{{"name", a->name}, {"exports", a->exports}};
    if (!a->disable.empty()) j["disable"] = a->disable;
    if (a->granularity) j["granularity"] = a->granularity;
    if (a->view) j["views"] = a->exports;
    return j;
  });
  auto* vend =
      ctl->add_subcommand("view-end", "End point-in-time views (EXPORT@CHECKPOINT), or every view of --checkpoint");
  vend->add_option("--checkpoint", a->name, "End every view of this checkpoint");
  vend->add_option("VIEW", a->views);
  on(vend, [a] {
    json j = json::object();
    if (!a->views.empty()) j["views"] = a->views;
    if (!a->name.empty()) j["checkpoint"] = a->name;
    return j;
  });
}

}  // namespace qnbd::cli
