// One logging facade for the whole project (spdlog underneath).
//
// Thread-safe. Data-path messages use QNBD_TRACE, which costs one branch when
// trace logging is off.
#pragma once

#include <spdlog/spdlog.h>

namespace qnbd::log {

enum class Level { trace = 0, debug = 1, info = 2, warn = 3, error = 4, off = 6 };

// Log to stderr. verbosity: 0 = warnings and errors, 1 = info, 2 = debug, 3+ = trace.
void init(int verbosity);
void set_level(Level level);
bool trace_enabled();
bool debug_enabled();

template <typename... Args>
void error(spdlog::format_string_t<Args...> f, Args&&... args) {
  spdlog::error(f, std::forward<Args>(args)...);
}
template <typename... Args>
void warn(spdlog::format_string_t<Args...> f, Args&&... args) {
  spdlog::warn(f, std::forward<Args>(args)...);
}
template <typename... Args>
void info(spdlog::format_string_t<Args...> f, Args&&... args) {
  spdlog::info(f, std::forward<Args>(args)...);
}
template <typename... Args>
void debug(spdlog::format_string_t<Args...> f, Args&&... args) {
  spdlog::debug(f, std::forward<Args>(args)...);
}

}  // namespace qnbd::log

#define QNBD_TRACE(...)                                                                                                \
  do {                                                                                                                 \
    if (::qnbd::log::trace_enabled()) spdlog::trace(__VA_ARGS__);                                                      \
  } while (0)
