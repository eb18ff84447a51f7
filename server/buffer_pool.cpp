#include "server/buffer_pool.hpp"

namespace qnbd::server {

BufferPool& buffer_pool() {
  static BufferPool pool;
  return pool;
}

}  // namespace qnbd::server
