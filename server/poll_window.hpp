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
  static constexpr std::chrono::nanoseconds kMax{32'000};

  std::chrono::nanoseconds window() const { return window_; }

  // The connection then slept `blocked` for its next request. A wait no
  // longer than kMax would have been caught by a longer window: double it
  // (from kMin, at most kMax). A longer one means the client is idle or
  // slow: halve it, down to 0 (no polling) below kMin.
  void after_wait(std::chrono::nanoseconds blocked) {
    if (blocked <= kMax)
      window_ = std::clamp<std::chrono::nanoseconds>(window_ * 2, kMin, kMax);
    else if ((window_ /= 2) < kMin)
      window_ = std::chrono::nanoseconds{0};
  }

 private:
  std::chrono::nanoseconds window_{0};
};

}  // namespace qnbd::server
