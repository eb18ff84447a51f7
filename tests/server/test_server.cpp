// In-process tests of server/: a real raw image, a real Unix socket, a
// client speaking the wire protocol by hand.
#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
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
  server::ServerOptions opts;
  server::ExportSpec spec;
  spec.device = open_raw(img, false);
  spec.info = server::describe_export(*spec.device, "", "", false, false, false);
  opts.exports.push_back(spec);
  server::ListenerSpec l;
  l.kind = server::ListenerSpec::Kind::unix_socket;
  l.path = sock;
  opts.listeners.push_back(l);
  opts.persistent = false;
  opts.threads = 2;
  auto fut = std::async(std::launch::async, [&] { return server::run_server(std::move(opts)); });

  int fd = connect_unix(sock);
  REQUIRE(fd >= 0);
  auto greeting = recv_exact(fd, 18);
  CHECK(load_be64(greeting.data()) == NBDMAGIC);
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

  REQUIRE(fut.wait_for(std::chrono::seconds(20)) == std::future_status::ready);
  auto status = fut.get();
  REQUIRE(status.has_value());
  CHECK(*status == 0);
  std::ifstream f(img, std::ios::binary);
  f.seekg(512);
  char buf[4];
  f.read(buf, 4);
  CHECK(std::string(buf, 4) == "qnbd");
  CHECK_FALSE(std::filesystem::exists(sock));
}
