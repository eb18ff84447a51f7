// WriteGate: lets a live bitmap change (a control-socket bitmap command or a
// checkpoint over several exports) happen between two guest writes, never
// in the middle of one.
//
// Every write, write_zeroes and discard of a device holds a Pass from
// before it marks the dirty bitmaps until its data is written. close()
// stops new passes (they wait) and returns once the passes already given
// are gone; open() lets the waiting writes go on. So a write is either
// wholly before the switch made between close() and open() (its granules
// are marked in the bitmaps as they were) or wholly after it.
//
// A fair gate rather than a reader-writer lock: glibc's rwlock prefers
// readers, so a steady stream of writes could starve close() forever.
//
// Thread-safety: all methods may be called from any thread; close()/open()
// pairs on one gate must not overlap (the device's edit lock orders them).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace qnbd::image {

class WriteGate {
 public:
  class Pass {
   public:
    explicit Pass(WriteGate* g) : g_(g) {}
    Pass(Pass&& o) noexcept : g_(o.g_) { o.g_ = nullptr; }
    Pass(const Pass&) = delete;
    Pass& operator=(const Pass&) = delete;
    Pass& operator=(Pass&&) = delete;
    ~Pass() {
      if (g_) g_->leave();
    }

   private:
    WriteGate* g_;
  };

  // Wait while the gate is closed, then count one more write in flight.
  [[nodiscard]] Pass enter() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !closed_; });
    ++inflight_;
    return Pass(this);
  }
  // Stop new writes and wait until the ones in flight have finished.
  void close() {
    shut();
    drain();
  }
  // close() in two halves, so several gates are shut at once and then
  // drained (the pause is the longest write in flight, not their sum).
  void shut() {
    std::lock_guard lock(mu_);
    closed_ = true;
  }
  void drain() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return inflight_ == 0; });
  }
  void open() {
    {
      std::lock_guard lock(mu_);
      closed_ = false;
    }
    cv_.notify_all();
  }
  std::uint64_t inflight() const {
    std::lock_guard lock(mu_);
    return inflight_;
  }

 private:
  void leave() {
    bool wake;
    {
      std::lock_guard lock(mu_);
      wake = --inflight_ == 0 && closed_;
    }
    if (wake) cv_.notify_all();
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::uint64_t inflight_ = 0;
  bool closed_ = false;
};

}  // namespace qnbd::image
