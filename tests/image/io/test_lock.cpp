// Image locks (image/io/lock.hpp): the byte layout of QEMU's file-posix
// locks as the kernel records it (/proc/locks), conflicts between open file
// descriptions, permission changes and the off switch. test-lock.sh checks
// the same against qemu-img, qemu-io and qemu-nbd.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "image/io/file.hpp"
#include "image/io/lock.hpp"
#include "image_test_support.hpp"

using namespace qnbd;
using namespace qnbd::image;

namespace {

constexpr std::uint64_t CR = BLK_PERM_CONSISTENT_READ, W = BLK_PERM_WRITE, WU = BLK_PERM_WRITE_UNCHANGED,
                        RS = BLK_PERM_RESIZE;

// The bytes locked on `path` by anyone, as "100 101 201" (one entry per
// byte; /proc/locks lists ranges "start end").
std::string locked_bytes(const std::string& path) {
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  std::ifstream in("/proc/locks");
  std::set<unsigned long> bytes;
  std::string line;
  // Built without `":" + std::to_string(...)`: g++ 12 at -O3 reports a
  // false -Wrestrict on that concatenation (GCC bug 105329).
  std::string ino = std::to_string(st.st_ino);
  ino.insert(ino.begin(), ':');
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, kind, advisory, type, pid, dev, start, end;
    ls >> id >> kind >> advisory >> type >> pid >> dev >> start >> end;
    if (kind != "OFDLCK" || dev.size() < ino.size() || dev.compare(dev.size() - ino.size(), ino.size(), ino) != 0) {
      continue;
    }
    for (unsigned long b = std::stoul(start); b <= std::stoul(end); ++b) bytes.insert(b);
  }
  std::string out;
  for (auto b : bytes) {
    if (!out.empty()) out += ' ';
    out += std::to_string(b);
  }
  return out;
}

struct Fd {
  int fd;
  explicit Fd(const std::string& path, int flags = O_RDWR) : fd(::open(path.c_str(), flags | O_CLOEXEC)) {
    REQUIRE(fd >= 0);
  }
  ~Fd() { ::close(fd); }
};

LockRequest req(std::uint64_t perm, std::uint64_t shared) {
  LockRequest r;
  r.perm = perm;
  r.shared = shared;
  r.locking = Locking::on;
  return r;
}

std::string bytes_for(LockUse use, LockRole role, bool qcow2, bool writable, bool force_share = false) {
  LockOptions o;
  o.use = use;
  o.force_share = force_share;
  return lock_bytes(lock_request(o, role, qcow2, writable));
}

}  // namespace

TEST_CASE("lock_request: the bytes QEMU 7.2 locks per format, role and use") {
  // As /proc/locks shows them for qemu-nbd, qemu-io and qemu-img 7.2
  // (test-lock.sh compares qnbd and qemu-nbd live).
  CHECK(bytes_for(LockUse::export_, LockRole::image, true, true) == "100 101 103 201 203");
  CHECK(bytes_for(LockUse::export_, LockRole::image, true, false) == "100 201 203");
  CHECK(bytes_for(LockUse::export_, LockRole::image, false, true) == "100 101 203");
  CHECK(bytes_for(LockUse::export_, LockRole::image, false, false) == "100 203");
  CHECK(bytes_for(LockUse::tool, LockRole::image, false, true) == "100 101");
  CHECK(bytes_for(LockUse::tool, LockRole::image, false, false) == "100");
  CHECK(bytes_for(LockUse::tool, LockRole::image, true, true) == "100 101 103 201 203");
  CHECK(bytes_for(LockUse::export_, LockRole::backing, true, false) == "100 201 203");
  CHECK(bytes_for(LockUse::export_, LockRole::backing, false, false) == "100");
  CHECK(bytes_for(LockUse::export_, LockRole::data_file, false, true) == "100 101 103 203");
  CHECK(bytes_for(LockUse::export_, LockRole::data_file, false, false) == "100 203");
  CHECK(bytes_for(LockUse::info, LockRole::image, true, false) == "201 203");
  CHECK(bytes_for(LockUse::info, LockRole::image, false, false) == "");
  CHECK(bytes_for(LockUse::info, LockRole::data_file, false, false) == "");
  // -U keeps the held permissions and shares everything.
  CHECK(bytes_for(LockUse::tool, LockRole::image, true, false, true) == "100");
  CHECK(bytes_for(LockUse::info, LockRole::image, true, false, true) == "");
  CHECK(perm_names(CR | W | WU | RS) == "consistent read, write, write unchanged, resize");
}

TEST_CASE("ImageLock: holds exactly the request's bytes; release and close drop them") {
  qnbd::test::TempDir d;
  const std::string path = d / "img";
  std::ofstream(path) << "x";
  {
    Fd a(path);
    auto lock = ImageLock::acquire(a.fd, path, req(CR | W | RS, ~(W | RS)));
    REQUIRE(lock.has_value());
    CHECK(lock->active());
    CHECK(locked_bytes(path) == "100 101 103 201 203");
    lock->release();
    CHECK(!lock->active());
    CHECK(locked_bytes(path) == "");
    auto again = ImageLock::acquire(a.fd, path, req(CR, BLK_PERM_ALL));
    REQUIRE(again.has_value());
    CHECK(locked_bytes(path) == "100");
  }
  CHECK(locked_bytes(path) == "");  // closing the descriptor released it
}

TEST_CASE("ImageLock: a writer keeps out writers and readers that refuse to share write") {
  qnbd::test::TempDir d;
  const std::string path = d / "img";
  std::ofstream(path) << "x";
  Fd a(path), b(path), c(path, O_RDONLY);
  auto writer = ImageLock::acquire(a.fd, path, req(CR | W | RS, ~(W | RS)));
  REQUIRE(writer.has_value());

  auto second = ImageLock::acquire(b.fd, path, req(CR | W | RS, ~(W | RS)));
  REQUIRE(!second.has_value());
  CHECK(second.error().code == EAGAIN);
  CHECK(second.error().message ==
        path + ": Failed to get \"write\" lock. Is another process using the image [" + path + "]?");
  // The failed opener left nothing behind.
  CHECK(locked_bytes(path) == "100 101 103 201 203");

  // qemu-img info: holds nothing, refuses to share write.
  auto info = ImageLock::acquire(c.fd, path, req(0, ~(W | RS)));
  REQUIRE(!info.has_value());
  CHECK(info.error().message.find("Failed to get shared \"write\" lock") != std::string::npos);

  // A reader sharing everything (-U) gets in.
  auto shared_reader = ImageLock::acquire(c.fd, path, req(CR, BLK_PERM_ALL));
  CHECK(shared_reader.has_value());

  // Once the writer is gone, the second writer is welcome.
  writer->release();
  shared_reader->release();
  CHECK(ImageLock::acquire(b.fd, path, req(CR | W | RS, ~(W | RS))).has_value());
}

TEST_CASE(
    "ImageLock: readers coexist; change() upgrades only when nobody refuses, and keeps the old locks on failure") {
  qnbd::test::TempDir d;
  const std::string path = d / "img";
  std::ofstream(path) << "x";
  Fd a(path), b(path);
  auto r1 = ImageLock::acquire(a.fd, path, req(CR, ~(W | RS)));
  auto r2 = ImageLock::acquire(b.fd, path, req(CR, ~(W | RS)));
  REQUIRE(r1.has_value());
  REQUIRE(r2.has_value());

  auto up = r1->change(CR | W | RS, ~(W | RS));
  REQUIRE(!up.has_value());
  CHECK(up.error().message.find("Failed to get \"write\" lock") != std::string::npos);
  CHECK(r1->perm() == CR);
  CHECK(locked_bytes(path) == "100 201 203");

  r2->release();
  REQUIRE(r1->change(CR | W | RS, ~(W | RS)).has_value());
  CHECK(locked_bytes(path) == "100 101 103 201 203");
  // And back down: the write and resize bytes go, the rest stays.
  REQUIRE(r1->change(CR, BLK_PERM_ALL).has_value());
  CHECK(locked_bytes(path) == "100");
}

TEST_CASE("ImageLock: locking=off takes nothing and ignores holders") {
  qnbd::test::TempDir d;
  const std::string path = d / "img";
  std::ofstream(path) << "x";
  Fd a(path), b(path);
  auto writer = ImageLock::acquire(a.fd, path, req(CR | W | RS, ~(W | RS)));
  REQUIRE(writer.has_value());
  LockRequest off = req(CR | W | RS, ~(W | RS));
  off.locking = Locking::off;
  auto second = ImageLock::acquire(b.fd, path, off);
  REQUIRE(second.has_value());
  CHECK(!second->active());
  CHECK(locked_bytes(path) == "100 101 103 201 203");
}

TEST_CASE("PosixFile::set_lock: two opens of one file conflict like two processes") {
  qnbd::test::TempDir d;
  const std::string path = d / "img";
  std::ofstream(path) << "x";
  auto f1 = open_posix_file(path, OpenMode::read_write, CacheMode::none);
  auto f2 = open_posix_file(path, OpenMode::read_write);
  REQUIRE(f1.has_value());
  REQUIRE(f2.has_value());
  REQUIRE((*f1)->set_lock(req(CR | W | RS, ~(W | RS))).has_value());
  auto r = (*f2)->set_lock(req(CR | W | RS, ~(W | RS)));
  REQUIRE(!r.has_value());
  CHECK(r.error().message.find(path + ": Failed to get \"write\" lock") == 0);
  f1->reset();
  CHECK(locked_bytes(path) == "");
  CHECK((*f2)->set_lock(req(CR | W | RS, ~(W | RS))).has_value());
}
