#include "common/log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>

namespace qnbd::log {

void init(int verbosity) {
  auto logger = spdlog::stderr_color_mt("qnbd");
  logger->set_pattern("qnbd: %^%l%$: %v");
  spdlog::set_default_logger(logger);
  switch (verbosity) {
    case 0: set_level(Level::warn); break;
    case 1: set_level(Level::info); break;
    case 2: set_level(Level::debug); break;
    default: set_level(Level::trace); break;
  }
}

void set_level(Level level) { spdlog::set_level(static_cast<spdlog::level::level_enum>(static_cast<int>(level))); }

bool trace_enabled() { return spdlog::should_log(spdlog::level::trace); }

bool debug_enabled() { return spdlog::should_log(spdlog::level::debug); }

}  // namespace qnbd::log
