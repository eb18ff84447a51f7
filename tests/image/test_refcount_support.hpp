// A minimal in-memory File for the refcount/create/check tests: a byte
// vector the tests can inspect and patch directly.
#pragma once

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "image/io/file.hpp"

namespace qnbd::test {

class VecFile final : public qnbd::image::File {
 public:
  std::vector<std::byte> data;
  std::uint64_t flushes = 0;

  Result<std::size_t> pread(std::span<std::byte> buf, std::uint64_t offset) override {
    if (offset >= data.size()) return std::size_t{0};
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), data.size() - offset));
    std::memcpy(buf.data(), data.data() + offset, n);
    return n;
  }
  Result<void> pwrite(std::span<const std::byte> buf, std::uint64_t offset) override {
    if (offset + buf.size() > (1ull << 31)) return make_error(EFBIG, "VecFile too large");
    if (data.size() < offset + buf.size()) data.resize(offset + buf.size());
    std::memcpy(data.data() + offset, buf.data(), buf.size());
    return ok();
  }
  Result<void> flush() override {
    flushes++;
    return ok();
  }
  Result<void> truncate(std::uint64_t size) override {
    if (size > (1ull << 31)) return make_error(EFBIG, "VecFile too large");
    data.resize(size);
    return ok();
  }
  Result<std::uint64_t> size() override { return std::uint64_t{data.size()}; }
  const std::string& name() const override { return name_; }

 private:
  std::string name_ = "<vec>";
};

}  // namespace qnbd::test
