// The control socket of a running server (docs/control.md): a Unix socket,
// mode 0600, speaking the JSON line protocol of protocol/control.hpp.
//
// Threading: the control server has its own io_context and thread, so a
// command that waits (a checkpoint draining in-flight writes, a bitmap
// written to the image) never holds an io thread of the data path, and a
// client that never reads its replies stalls only its own connection. One
// coroutine per client reads one line (at most 1 MiB), runs it, and writes
// the reply before reading the next; a reply not taken within
// kReplyTimeout closes that connection.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "image/block_device.hpp"
#include "protocol/control.hpp"
#include "server/server.hpp"

namespace qnbd::server {

// One export as the control commands see it.
struct ControlExport {
  std::string name;
  std::string image;
  std::string format;
  std::uint64_t size = 0;
  bool read_only = true;
  bool allocation_depth = false;
  std::size_t connections = 0;
  std::shared_ptr<image::BlockDevice> device;
};

// What the server offers the control commands.
class ControlTarget {
 public:
  virtual ~ControlTarget() = default;
  virtual std::vector<ControlExport> control_exports() = 0;
  // Hot add and remove (ENOTSUP where the server cannot).
  [[nodiscard]] virtual Result<void> add_export(const protocol::control::ExportAdd&) {
    return make_error(ENOTSUP, "this server cannot add exports");
  }
  [[nodiscard]] virtual Result<void> remove_export(const std::string&, bool /*force*/) {
    return make_error(ENOTSUP, "this server cannot remove exports");
  }
  // A point-in-time view's export appears (EEXIST if the name is taken)
  // and goes (its connections are closed).
  [[nodiscard]] virtual Result<void> add_view_export(ExportSpec) {
    return make_error(ENOTSUP, "this server cannot serve views");
  }
  [[nodiscard]] virtual Result<void> remove_view_export(const std::string&) {
    return make_error(ENOTSUP, "this server cannot serve views");
  }
};

// Run one parsed request: the result object, or the refusal.
std::variant<nlohmann::json, protocol::control::Refusal> execute_control(ControlTarget& target,
                                                                         const protocol::control::Request& request);
// A whole request line to its reply line (parse, execute, encode).
std::string handle_control_line(ControlTarget& target, std::string_view line);

class ControlServer {
 public:
  // Bind `path` (a stale socket there is replaced, any other file is
  // refused) with mode 0600 and start serving on a thread of its own.
  [[nodiscard]] static Result<std::unique_ptr<ControlServer>> start(const std::string& path, ControlTarget& target);
  // Stops accepting, closes every client, joins the thread, unlinks.
  ~ControlServer();

 private:
  struct Impl;
  explicit ControlServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qnbd::server
