// Running an io_context on a thread of the server.
#pragma once

#include <exception>

#include <boost/asio/io_context.hpp>

#include "common/log.hpp"

namespace qnbd::server {

// Run `ctx` until it stops. A handler that lets an exception escape makes
// Asio rethrow it out of run(). That is a defect, but ending the process
// for it (std::terminate, from a thread or from the joinable threads'
// destructors) would lose unflushed writes and leave the bitmaps in_use:
// log it and go on running; a signal still stops the server cleanly.
inline void run_context(boost::asio::io_context& ctx, const char* what) {
  for (;;) {
    try {
      ctx.run();
      return;
    } catch (const std::exception& e) {
      log::error("internal error in the {} (the operation is abandoned): {}", what, e.what());
    }
  }
}

}  // namespace qnbd::server
