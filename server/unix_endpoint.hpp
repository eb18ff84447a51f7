// The address of a Unix socket the server listens on, checked first: Asio's
// endpoint constructor throws for a path that does not fit, which would end
// the process instead of refusing one option.
#pragma once

#include <sys/un.h>

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

}  // namespace qnbd::server
