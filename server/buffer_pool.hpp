// The process-wide pool of request and read buffers.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace qnbd::server {

// ---------------------------------------------------------------------------
// Buffers: request payloads and read data come from a process-wide pool so a
// request does not map and zero a fresh buffer (qemu-nbd spends ~30 % of its
// CPU doing that, see STYLE.md "Speed").
struct Buffer {
  std::unique_ptr<std::byte[]> data;
  std::size_t capacity = 0;

  Buffer() = default;
  Buffer(std::unique_ptr<std::byte[]> d, std::size_t cap) : data(std::move(d)), capacity(cap) {}
  // A moved-from buffer must read as empty: callers test capacity before
  // reusing a slot's buffer, and a stale capacity over a null pointer sent
  // a READ into pread(NULL) after a big request had given its buffer back.
  Buffer(Buffer&& o) noexcept : data(std::move(o.data)), capacity(std::exchange(o.capacity, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    data = std::move(o.data);
    capacity = std::exchange(o.capacity, 0);
    return *this;
  }
};

class BufferPool {
 public:
  Buffer get(std::size_t n) {
    {
      std::lock_guard lk(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->capacity >= n) {
          Buffer b = std::move(*it);
          retained_ -= b.capacity;
          free_.erase(it);
          return b;
        }
      }
    }
    // Round up so buffers are reusable for similar sizes.
    std::size_t cap = std::max<std::size_t>(n, 64 * 1024);
    cap = std::size_t{1} << (64 - __builtin_clzll(cap - 1));
    return Buffer{std::make_unique_for_overwrite<std::byte[]>(cap), cap};
  }
  void put(Buffer b) {
    if (!b.data) return;
    std::lock_guard lk(mu_);
    if (retained_ + b.capacity > kMaxRetained || free_.size() >= 64) return;
    retained_ += b.capacity;
    free_.push_back(std::move(b));
  }

 private:
  static constexpr std::size_t kMaxRetained = 256u << 20;
  std::mutex mu_;
  std::vector<Buffer> free_;
  std::size_t retained_ = 0;
};

// The one pool of the process.
BufferPool& buffer_pool();

}  // namespace qnbd::server
