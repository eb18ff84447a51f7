// PollWindow: how long a connection with nothing in flight looks for its
// client's next request before it sleeps (Session::poll_for_request, which
// says why). QEMU's event loop adapts its poll time the same way
// (util/aio-posix.c, the iothread property poll-max-ns): grow while the
// waits that follow stay short, shrink after long ones.
#pragma once

#include <algorithm>
#include <chrono>

namespace qnbd::server {

class PollWindow {
 public:
  static constexpr std::chrono::nanoseconds kMin{4'000};
  // The default ceiling. QEMU's iothreads stop at 32 us (poll-max-ns), but
  // on a VM a sleeping thread takes tens of microseconds to wake (the vCPU
  // halts and must be kicked), and a local client that sends one request
  // per round trip turns around in 30-60 us there: fio 4 KiB random reads
  // at queue depth 1 over a Unix socket read 14-15k IOPS with 32 us (the
  // window never caught the next request and fell to 0) and 36-38k with
  // 64 us (2026-12-07, this project's 2-core VM). A remote client's round
  // trip is longer than either, so over a network the window falls to 0.
  static constexpr std::chrono::nanoseconds kDefaultMax{64'000};

  // `max` 0 (or below kMin): never poll.
  explicit PollWindow(std::chrono::nanoseconds max = kDefaultMax) : max_(max) {}

  std::chrono::nanoseconds window() const { return window_; }

  // The connection then slept `blocked` for its next request. A wait no
  // longer than the ceiling would have been caught by a longer window:
  // double it (from kMin, at most the ceiling). A longer one means the
  // client is idle or slow: halve it, down to 0 (no polling) below kMin.
  void after_wait(std::chrono::nanoseconds blocked) {
    if (max_ < kMin) return;
    if (blocked <= max_)
      window_ = std::clamp<std::chrono::nanoseconds>(window_ * 2, kMin, max_);
    else if ((window_ /= 2) < kMin)
      window_ = std::chrono::nanoseconds{0};
  }

 private:
  std::chrono::nanoseconds max_;
  std::chrono::nanoseconds window_{0};
};

}  // namespace qnbd::server
