// PollWindow: the adaptive polling window of a connection (server/poll_window.hpp).
#include <doctest/doctest.h>

#include <chrono>

#include "server/poll_window.hpp"

using qnbd::server::PollWindow;
using namespace std::chrono_literals;

TEST_CASE("PollWindow grows while the client answers fast and falls to zero when it goes idle") {
  PollWindow w;
  REQUIRE(PollWindow::kDefaultMax == 64us);
  CHECK(w.window() == 0ns);  // a new connection does not spin
  w.after_wait(10us);
  CHECK(w.window() == PollWindow::kMin);
  w.after_wait(10us);
  CHECK(w.window() == 8us);
  w.after_wait(PollWindow::kDefaultMax);  // still short enough to have been caught
  CHECK(w.window() == 16us);
  w.after_wait(1us);
  CHECK(w.window() == 32us);
  w.after_wait(1us);
  CHECK(w.window() == 64us);
  w.after_wait(1us);
  CHECK(w.window() == 64us);  // never beyond the ceiling
  w.after_wait(5ms);          // the client went quiet
  CHECK(w.window() == 32us);
  w.after_wait(65us);  // just past the ceiling: no window would have caught it
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

TEST_CASE("PollWindow keeps to a smaller ceiling, and a ceiling of 0 never polls") {
  PollWindow w(32us);
  for (int i = 0; i < 10; ++i) w.after_wait(20us);
  CHECK(w.window() == 32us);
  w.after_wait(40us);  // past this ceiling, though inside the default one
  CHECK(w.window() == 16us);

  PollWindow off(0ns);
  for (int i = 0; i < 10; ++i) off.after_wait(1us);
  CHECK(off.window() == 0ns);
  PollWindow tiny(PollWindow::kMin - 1ns);  // below the smallest window: off too
  tiny.after_wait(1us);
  CHECK(tiny.window() == 0ns);
}
