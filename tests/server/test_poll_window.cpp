// PollWindow: the adaptive polling window of a connection (server/poll_window.hpp).
#include <doctest/doctest.h>

#include <chrono>

#include "server/poll_window.hpp"

using qnbd::server::PollWindow;
using namespace std::chrono_literals;

TEST_CASE("PollWindow grows while the client answers fast and falls to zero when it goes idle") {
  PollWindow w;
  CHECK(w.window() == 0ns);  // a new connection does not spin
  w.after_wait(10us);
  CHECK(w.window() == PollWindow::kMin);
  w.after_wait(10us);
  CHECK(w.window() == 8us);
  w.after_wait(PollWindow::kMax);  // still short enough to have been caught
  CHECK(w.window() == 16us);
  w.after_wait(1us);
  CHECK(w.window() == PollWindow::kMax);
  w.after_wait(1us);
  CHECK(w.window() == PollWindow::kMax);  // never beyond kMax
  w.after_wait(5ms);                      // the client went quiet
  CHECK(w.window() == 16us);
  w.after_wait(1s);
  CHECK(w.window() == 8us);
  w.after_wait(1s);
  CHECK(w.window() == PollWindow::kMin);
  w.after_wait(1s);
  CHECK(w.window() == 0ns);  // an idle client costs no more spinning
  w.after_wait(1s);
  CHECK(w.window() == 0ns);
}
