// What an accept loop does after a failed accept.
#pragma once

#include <boost/system/error_code.hpp>
#include <chrono>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace qnbd::server {

// A full descriptor table (EMFILE, ENFILE) or a lack of buffers leaves the
// connection in the backlog: accepting again at once would spin a core,
// logging each failure. Wait 100 ms on `ex` then; return at once after any
// other error. The timer service must exist already (made at startup,
// while descriptors are free).
template <class Executor>
boost::asio::awaitable<void> back_off_after_accept(const boost::system::error_code& ec, const Executor& ex) {
  namespace asio = boost::asio;
  if (ec != asio::error::no_descriptors && ec != asio::error::no_buffer_space) co_return;
  asio::steady_timer backoff(ex, std::chrono::milliseconds(100));
  co_await backoff.async_wait(asio::as_tuple(asio::use_awaitable));
}

}  // namespace qnbd::server
