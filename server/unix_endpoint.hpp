// The address of a Unix socket the server listens on, checked first: Asio's
// endpoint constructor throws for a path that does not fit, which would end
// the process instead of refusing one option.
#pragma once

#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>

#include <boost/asio/local/stream_protocol.hpp>

#include "common/result.hpp"

namespace qnbd::server {

// `path` must fit sockaddr_un.sun_path with its terminating NUL (107 bytes
// on Linux) and not be empty; the refusal says so in one line, as qemu-nbd
// does ("UNIX socket path '...' is too long").
inline Result<boost::asio::local::stream_protocol::endpoint> unix_endpoint(const std::string& path) {
  constexpr std::size_t max = sizeof(sockaddr_un::sun_path) - 1;
  if (path.empty()) return make_error(EINVAL, "empty Unix socket path");
  if (path.size() > max) {
    return make_error(ENAMETOOLONG, "Unix socket path '{}' is too long ({} bytes; at most {})", path, path.size(), max);
  }
  return boost::asio::local::stream_protocol::endpoint(path);
}

// Before binding `path`: a stale socket from an earlier run is removed;
// anything else there (a file, a folder, a link: a mistyped path) is
// refused and left as it is. qemu-nbd unlinks whatever is there.
inline Result<void> clear_stale_socket(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return ok();
  if (!S_ISSOCK(st.st_mode)) return make_error(EEXIST, "a file that is not a socket is there (left as it is)");
  ::unlink(path.c_str());
  return ok();
}

}  // namespace qnbd::server
