// Helpers shared by the image commands (info, map, convert): option parsing
// for -f and the one-line error format "qnbd: IMAGE: <defect>".
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include "common/result.hpp"
#include "image/block_device.hpp"

namespace qnbd::cli {

// Parse a -f value; false if unknown.
inline bool parse_image_format(const std::string& name, image::ImageFormat& out) {
  if (name.empty()) {
    out = image::ImageFormat::detect;
  } else if (name == "raw") {
    out = image::ImageFormat::raw;
  } else if (name == "qcow2") {
    out = image::ImageFormat::qcow2;
  } else {
    return false;
  }
  return true;
}

// Print an error as one line on stderr. Messages from open_image already
// start with the path; others get it prepended.
inline void print_image_error(const std::string& path, const Error& e) {
  if (e.message.rfind(path + ":", 0) == 0) {
    std::fprintf(stderr, "qnbd: %s\n", e.message.c_str());
  } else {
    std::fprintf(stderr, "qnbd: %s: %s\n", path.c_str(), e.message.c_str());
  }
}

// Open read-only with an optional -f format; prints the error itself.
inline std::unique_ptr<image::BlockDevice> open_for_reading(const std::string& path, const std::string& format) {
  image::OpenOptions options;
  if (!parse_image_format(format, options.format)) {
    std::fprintf(stderr, "qnbd: %s: unknown image format '%s' (expected raw or qcow2)\n", path.c_str(),
                 format.c_str());
    return nullptr;
  }
  options.read_only = true;
  auto dev = image::open_image(path, options);
  if (!dev) {
    print_image_error(path, dev.error());
    return nullptr;
  }
  return std::move(*dev);
}

}  // namespace qnbd::cli
