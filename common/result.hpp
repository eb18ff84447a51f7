// Result<T>: the value of an operation or the error that stopped it.
//
// Every layer boundary (image/, protocol/, config/) returns Result instead of
// throwing. An Error carries an errno value, which the NBD layer maps onto
// NBD_E* codes, and a one-line human message naming the defect.
#pragma once

#include <cerrno>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace qnbd {

struct Error {
  int code = EIO;       // errno value (EIO, EINVAL, ENOSPC, EROFS, ENOTSUP, ...)
  std::string message;  // one line, no trailing newline
};

// Build an Error with a formatted message: make_error(EINVAL, "bad {}", x).
template <typename... Args>
[[nodiscard]] Error make_error(int code, fmt::format_string<Args...> format, Args&&... args) {
  return Error{code, fmt::format(format, std::forward<Args>(args)...)};
}

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}      // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool has_value() const { return v_.index() == 0; }
  explicit operator bool() const { return has_value(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

  // Move the value out as a prvalue (QNBD_TRY relies on this: a reference
  // into the statement expression's local would dangle).
  T take() && { return std::get<0>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT

  bool has_value() const { return ok_; }
  explicit operator bool() const { return ok_; }
  void value() const {}

  const Error& error() const& { return error_; }
  Error&& error() && { return std::move(error_); }
  void take() && {}

 private:
  Error error_;
  bool ok_ = true;
};

inline Result<void> ok() { return {}; }

}  // namespace qnbd

// Propagate an error to the caller, else yield the value (GNU statement
// expression; the project builds with g++ and GNU extensions on). The value
// is yielded by value: the Result local dies at the end of the expression.
#define QNBD_TRY(expr)                                                                                                 \
  ({                                                                                                                   \
    auto&& qnbd_try_r_ = (expr);                                                                                       \
    if (!qnbd_try_r_) return std::move(qnbd_try_r_).error();                                                           \
    std::move(qnbd_try_r_).take();                                                                                     \
  })
