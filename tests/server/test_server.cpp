// In-process tests of server/: a real raw image, a real Unix socket, a
// client speaking the wire protocol by hand.
#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <thread>

#include "common/endian.hpp"
#include "protocol/constants.hpp"
#include "server/server.hpp"

using namespace qnbd;
using namespace qnbd::protocol;

namespace {

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/qnbd-server-test.XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

std::shared_ptr<image::BlockDevice> open_raw(const std::string& path, bool read_only) {
  image::OpenOptions oo;
  oo.format = image::ImageFormat::raw;
  oo.read_only = read_only;
  auto dev = image::open_image(path, oo);
  REQUIRE(dev.has_value());
  return std::shared_ptr<image::BlockDevice>(std::move(*dev));
}

int connect_unix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path.c_str());
  for (int i = 0; i < 200; ++i) {
    if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) return fd;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::close(fd);
  return -1;
}

std::vector<std::byte> recv_exact(int fd, std::size_t n) {
  std::vector<std::byte> b(n);
  std::size_t got = 0;
  while (got < n) {
    auto r = ::recv(fd, b.data() + got, n - got, 0);
    REQUIRE(r > 0);
    got += static_cast<std::size_t>(r);
  }
  return b;
}

void send_all(int fd, const std::vector<std::byte>& b) {
  REQUIRE(::send(fd, b.data(), b.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(b.size()));
}

std::vector<std::byte> be(std::initializer_list<std::pair<int, std::uint64_t>> fields) {
  std::vector<std::byte> out;
  for (auto [w, v] : fields)
    for (int i = w - 1; i >= 0; --i) out.push_back(std::byte(static_cast<std::uint8_t>(v >> (8 * i))));
  return out;
}

// A non-persistent server on a Unix socket exporting one raw image, run on
// its own thread; the future holds run_server's result once the last client
// has gone.
std::future<Result<int>> start_one_shot_server(const std::string& img, const std::string& sock, bool read_only,
                                               const std::string& export_name, std::uint32_t threads,
                                               const std::function<void(server::ServerOptions&)>& adjust = {}) {
  server::ServerOptions opts;
  server::ExportSpec spec;
  spec.device = open_raw(img, read_only);
  spec.info = server::describe_export(*spec.device, export_name, "", read_only, false, false);
  opts.exports.push_back(spec);
  server::ListenerSpec l;
  l.kind = server::ListenerSpec::Kind::unix_socket;
  l.path = sock;
  opts.listeners.push_back(l);
  opts.persistent = false;
  opts.threads = threads;
  if (adjust) adjust(opts);
  return std::async(std::launch::async,
                    [opts = std::move(opts)]() mutable { return server::run_server(std::move(opts)); });
}

// The one-shot server exits by itself, with status 0, once its client has
// gone (within 20 s).
void expect_clean_exit(std::future<Result<int>>& fut) {
  REQUIRE(fut.wait_for(std::chrono::seconds(20)) == std::future_status::ready);
  auto status = fut.get();
  REQUIRE(status.has_value());
  CHECK(*status == 0);
}

// Connects and reads the fixed-newstyle greeting (NBD proto.md "Newstyle
// negotiation"); the caller sends the client flags.
int connect_and_read_greeting(const std::string& sock) {
  int fd = connect_unix(sock);
  REQUIRE(fd >= 0);
  auto greeting = recv_exact(fd, 18);
  REQUIRE(load_be64(greeting.data()) == NBDMAGIC);
  REQUIRE(load_be64(greeting.data() + 8) == IHAVEOPT);
  return fd;
}

}  // namespace

TEST_CASE("describe_export follows qemu-nbd's flag choices") {
  TempDir dir;
  auto img = (dir.path / "d.img").string();
  std::ofstream(img).close();
  std::filesystem::resize_file(img, 1 << 20);
  auto rw = server::describe_export(*open_raw(img, false), "x", "", false, false, true);
  CHECK_FALSE(rw.read_only);
  CHECK(rw.can_trim);
  CHECK(rw.can_write_zeroes);
  CHECK(rw.size == (1u << 20));
  CHECK(rw.preferred_block == 4096);
  CHECK(rw.max_payload == kMaxPayload);
  CHECK(rw.allocation_depth);
  auto ro = server::describe_export(*open_raw(img, true), "x", "", true, true, false);
  CHECK(ro.read_only);
  CHECK(ro.can_multi_conn);
}

TEST_CASE("systemd_listeners ignores variables meant for another process") {
  ::setenv("LISTEN_PID", "1", 1);
  ::setenv("LISTEN_FDS", "1", 1);
  CHECK(server::systemd_listeners().empty());
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
}

TEST_CASE("non-persistent server: one client writes and reads, server exits 0 and data is on disk") {
  TempDir dir;
  auto img = (dir.path / "d.img").string();
  auto sock = (dir.path / "s.sock").string();
  std::ofstream(img).close();
  std::filesystem::resize_file(img, 1 << 20);
  auto fut = start_one_shot_server(img, sock, /*read_only=*/false, "", /*threads=*/2);

  int fd = connect_and_read_greeting(sock);
  send_all(fd, be({{4, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES}}));
  send_all(fd, be({{8, IHAVEOPT}, {4, NBD_OPT_EXPORT_NAME}, {4, 0}}));
  auto ex = recv_exact(fd, 10);
  CHECK(load_be64(ex.data()) == (1u << 20));
  // WRITE 4 bytes with FUA at 512, then READ them back.
  auto w = be({{4, NBD_REQUEST_MAGIC}, {2, NBD_CMD_FLAG_FUA}, {2, NBD_CMD_WRITE}, {8, 11}, {8, 512}, {4, 4}});
  for (char c : std::string("qnbd")) w.push_back(std::byte(c));
  send_all(fd, w);
  auto wr = recv_exact(fd, 16);
  CHECK(load_be32(wr.data()) == NBD_SIMPLE_REPLY_MAGIC);
  CHECK(load_be32(wr.data() + 4) == 0);
  CHECK(load_be64(wr.data() + 8) == 11);
  send_all(fd, be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_READ}, {8, 12}, {8, 512}, {4, 4}}));
  auto rd = recv_exact(fd, 20);
  CHECK(load_be32(rd.data() + 4) == 0);
  CHECK(std::string(reinterpret_cast<const char*>(rd.data() + 16), 4) == "qnbd");
  send_all(fd, be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_DISC}, {8, 13}, {8, 0}, {4, 0}}));
  ::close(fd);

  expect_clean_exit(fut);
  std::ifstream f(img, std::ios::binary);
  f.seekg(512);
  char buf[4];
  f.read(buf, 4);
  CHECK(std::string(buf, 4) == "qnbd");
  CHECK_FALSE(std::filesystem::exists(sock));
}

namespace {

// One reply as a minimal client sees it: simple (NBD proto.md "Simple reply
// message") or one structured chunk ("Structured reply chunk message").
struct WireReply {
  bool structured = false;
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint32_t error = 0;  // simple replies, and the first field of an error chunk
  std::uint64_t cookie = 0;
  std::vector<std::byte> payload;  // structured chunks only
};

WireReply read_reply(int fd) {
  WireReply r;
  auto magic = recv_exact(fd, 4);
  if (load_be32(magic.data()) == NBD_SIMPLE_REPLY_MAGIC) {
    auto rest = recv_exact(fd, 12);
    r.error = load_be32(rest.data());
    r.cookie = load_be64(rest.data() + 4);
    return r;
  }
  REQUIRE(load_be32(magic.data()) == NBD_STRUCTURED_REPLY_MAGIC);
  r.structured = true;
  auto rest = recv_exact(fd, 16);
  r.flags = load_be16(rest.data());
  r.type = load_be16(rest.data() + 2);
  r.cookie = load_be64(rest.data() + 4);
  r.payload = recv_exact(fd, load_be32(rest.data() + 12));
  if (r.type & (1u << 15)) r.error = load_be32(r.payload.data());
  return r;
}

// Option reply header + data (NBD proto.md "Option reply").
struct OptReply {
  std::uint32_t option = 0;
  std::uint32_t type = 0;
  std::vector<std::byte> data;
};

OptReply read_opt_reply(int fd) {
  auto h = recv_exact(fd, 20);
  REQUIRE(load_be64(h.data()) == NBD_REP_MAGIC);
  OptReply r{load_be32(h.data() + 8), load_be32(h.data() + 12), {}};
  r.data = recv_exact(fd, load_be32(h.data() + 16));
  return r;
}

}  // namespace

// The session machinery in-process: fixed-newstyle negotiation with
// structured replies and NBD_OPT_GO, a structured READ, an out-of-range READ
// answered with an error chunk (the session keeps serving), FLUSH, DISC.
TEST_CASE("in-process session: OPT_GO + structured replies, errors keep the session serving") {
  TempDir dir;
  auto img = (dir.path / "d.img").string();
  auto sock = (dir.path / "s.sock").string();
  std::string pattern;
  for (int i = 0; i < 4096; ++i) pattern.push_back(static_cast<char>('a' + i % 26));
  {
    std::ofstream o(img, std::ios::binary);
    o << pattern;
  }
  std::filesystem::resize_file(img, 64 << 10);
  auto fut = start_one_shot_server(img, sock, /*read_only=*/true, "ro", /*threads=*/1);

  int fd = connect_and_read_greeting(sock);
  send_all(fd, be({{4, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES}}));

  send_all(fd, be({{8, IHAVEOPT}, {4, NBD_OPT_STRUCTURED_REPLY}, {4, 0}}));
  auto sr = read_opt_reply(fd);
  CHECK(sr.option == NBD_OPT_STRUCTURED_REPLY);
  CHECK(sr.type == NBD_REP_ACK);

  // An export that does not exist: NBD_REP_ERR_UNKNOWN, negotiation goes on.
  send_all(fd, be({{8, IHAVEOPT}, {4, NBD_OPT_GO}, {4, 4 + 4 + 2}, {4, 4}, {4, 0x6e6f7065 /* "nope" */}, {2, 0}}));
  auto unknown = read_opt_reply(fd);
  CHECK(unknown.option == NBD_OPT_GO);
  CHECK(unknown.type == NBD_REP_ERR_UNKNOWN);

  send_all(fd, be({{8, IHAVEOPT}, {4, NBD_OPT_GO}, {4, 4 + 2 + 2}, {4, 2}, {2, 0x726f /* "ro" */}, {2, 0}}));
  std::uint64_t size = 0;
  std::uint16_t tflags = 0;
  for (int i = 0; i < 16; ++i) {
    auto r = read_opt_reply(fd);
    REQUIRE(r.option == NBD_OPT_GO);
    if (r.type == NBD_REP_ACK) break;
    REQUIRE(r.type == NBD_REP_INFO);
    REQUIRE(r.data.size() >= 2);
    if (load_be16(r.data.data()) == NBD_INFO_EXPORT) {
      REQUIRE(r.data.size() == 12);
      size = load_be64(r.data.data() + 2);
      tflags = load_be16(r.data.data() + 10);
    }
  }
  CHECK(size == (64u << 10));
  CHECK((tflags & NBD_FLAG_HAS_FLAGS) != 0);
  CHECK((tflags & NBD_FLAG_READ_ONLY) != 0);

  // READ 4096 at 0: OFFSET_DATA chunks covering the range, the last with DONE.
  send_all(fd, be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_READ}, {8, 21}, {8, 0}, {4, 4096}}));
  std::string got(4096, '\0');
  std::size_t covered = 0;
  for (int i = 0; i < 64; ++i) {
    auto r = read_reply(fd);
    REQUIRE(r.structured);
    CHECK(r.cookie == 21);
    if (r.type == NBD_REPLY_TYPE_OFFSET_DATA) {
      auto off = load_be64(r.payload.data());
      auto n = r.payload.size() - 8;
      REQUIRE(off + n <= got.size());
      std::memcpy(got.data() + off, r.payload.data() + 8, n);
      covered += n;
    } else {
      REQUIRE(r.type == NBD_REPLY_TYPE_NONE);
    }
    if (r.flags & NBD_REPLY_FLAG_DONE) break;
  }
  CHECK(covered == 4096);
  CHECK(got == pattern);

  // READ past the end: EINVAL (NBD proto.md "Request errors"), as an error
  // chunk, then the session still answers.
  send_all(fd, be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_READ}, {8, 22}, {8, size}, {4, 512}}));
  auto bad = read_reply(fd);
  CHECK(bad.cookie == 22);
  CHECK(bad.error == NBD_EINVAL);
  if (bad.structured) {
    CHECK(bad.type == NBD_REPLY_TYPE_ERROR);
    CHECK((bad.flags & NBD_REPLY_FLAG_DONE) != 0);
  }
  // WRITE to a read-only export: EPERM, payload consumed, still serving.
  auto w = be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_WRITE}, {8, 23}, {8, 0}, {4, 4}});
  for (char c : std::string("qnbd")) w.push_back(std::byte(c));
  send_all(fd, w);
  auto perm = read_reply(fd);
  CHECK(perm.cookie == 23);
  CHECK(perm.error == NBD_EPERM);

  send_all(fd, be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_FLUSH}, {8, 24}, {8, 0}, {4, 0}}));
  auto fl = read_reply(fd);
  CHECK(fl.cookie == 24);
  CHECK(fl.error == 0);
  if (fl.structured) CHECK((fl.flags & NBD_REPLY_FLAG_DONE) != 0);

  send_all(fd, be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_DISC}, {8, 25}, {8, 0}, {4, 0}}));
  ::close(fd);
  expect_clean_exit(fut);
  // The read-only export was not written.
  std::ifstream f(img, std::ios::binary);
  std::string head(4, '\0');
  f.read(head.data(), 4);
  CHECK(head == pattern.substr(0, 4));
}

namespace {

// Opens export `name` with OPT_GO (simple replies) and returns the socket,
// in transmission.
int open_transmission(const std::string& sock, const std::string& name) {
  int fd = connect_and_read_greeting(sock);
  send_all(fd, be({{4, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES}}));
  auto go = be({{8, IHAVEOPT}, {4, NBD_OPT_GO}, {4, 4 + name.size() + 2}, {4, name.size()}});
  for (char c : name) go.push_back(std::byte(c));
  for (auto b : be({{2, 0}})) go.push_back(b);
  send_all(fd, go);
  for (int i = 0; i < 16; ++i) {
    auto r = read_opt_reply(fd);
    REQUIRE(r.option == NBD_OPT_GO);
    if (r.type == NBD_REP_ACK) return fd;
    REQUIRE(r.type == NBD_REP_INFO);
  }
  FAIL("no NBD_REP_ACK for NBD_OPT_GO");
  return -1;
}

// `reads` 4 KiB READs on fd, one at a time (queue depth 1: each sent as soon
// as the previous reply is in), simple replies.
void ping_pong_reads(int fd, int reads) {
  for (int i = 0; i < reads; ++i) {
    send_all(fd, be({{4, NBD_REQUEST_MAGIC},
                     {2, 0},
                     {2, NBD_CMD_READ},
                     {8, static_cast<std::uint64_t>(i)},
                     {8, (static_cast<std::uint64_t>(i) * 4096) % (64 << 10)},
                     {4, 4096}}));
    auto h = recv_exact(fd, 16);
    REQUIRE(load_be32(h.data()) == NBD_SIMPLE_REPLY_MAGIC);
    REQUIRE(load_be32(h.data() + 4) == 0);
    REQUIRE(load_be64(h.data() + 8) == static_cast<std::uint64_t>(i));
    recv_exact(fd, 4096);
  }
}

void disconnect(int fd) {
  send_all(fd, be({{4, NBD_REQUEST_MAGIC}, {2, 0}, {2, NBD_CMD_DISC}, {8, 0}, {8, 0}, {4, 0}}));
  ::close(fd);
}

}  // namespace

// Adaptive polling (Session::poll_for_request) spins on the io thread: it
// must never hold back another connection's requests there, and --poll-max-ns
// 0 turns it off. One io thread; the client answers each reply at once, so
// a connection alone there does spin.
TEST_CASE("a connection spins for its next request only while it is alone on its io thread") {
  TempDir dir;
  auto img = (dir.path / "d.img").string();
  { std::ofstream o(img, std::ios::binary); }
  std::filesystem::resize_file(img, 64 << 10);
  struct Case {
    const char* what;
    bool second_connection;
    std::chrono::nanoseconds poll_max;
  };
  for (const Case& c : {Case{"alone", false, server::PollWindow::kDefaultMax},
                        Case{"beside an idle connection", true, server::PollWindow::kDefaultMax},
                        Case{"--poll-max-ns 0", false, std::chrono::nanoseconds{0}}}) {
    const std::string what = c.what;
    CAPTURE(what);
    auto sock = (dir.path / "p.sock").string();
    std::atomic<std::uint64_t> polls{0};
    auto fut = start_one_shot_server(img, sock, true, "", 1, [&](server::ServerOptions& o) {
      o.polls_started = &polls;
      o.poll_max = c.poll_max;
      o.max_connections = 0;
    });
    int other = c.second_connection ? open_transmission(sock, "") : -1;
    int fd = open_transmission(sock, "");
    ping_pong_reads(fd, 400);
    disconnect(fd);
    if (other >= 0) disconnect(other);
    expect_clean_exit(fut);
    if (c.second_connection || c.poll_max.count() == 0) {
      CHECK(polls.load() == 0);
    } else if (::sysconf(_SC_NPROCESSORS_ONLN) > 1) {  // Server::may_poll
      CHECK(polls.load() > 0);
    }
  }
}
