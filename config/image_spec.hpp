// An image argument that is more than a file name: QEMU's `json:{...}`
// pseudo-filename and qemu-nbd's `--image-opts` (the same block options
// written as key=value,... with dotted keys, ",," for a comma).
//
// Tools start qemu-nbd this way: oVirt imageio always passes
// `json:{"driver": FORMAT, "file": {"driver": "file", "filename": PATH}}`,
// adds `"backing": null` to serve one qcow2 layer without its backing chain,
// and puts a raw node with `offset`/`size` under the format to serve a range
// of a file (a disk inside a larger one). qnbd opens exactly those trees:
//
//   format node      driver raw | qcow2 | (absent: probe) ; or driver
//                    file | host_device with filename (the file as raw)
//     raw            offset, size (QEMU's BlockdevOptionsRaw)
//     qcow2          backing: null (or "" as QEMU still accepts, with its
//                    deprecation warning)
//     file           the protocol node {driver: file | host_device,
//                    filename}, or a raw range node {driver: raw, offset,
//                    size, file: protocol node} under a format node
//
// Anything else is refused with one line in QEMU's words where QEMU has
// them (an unknown option, a node reference, a missing file name).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.hpp"

namespace qnbd::config {

struct ImageSpec {
  std::string filename;
  std::string format;                   // "raw", "qcow2"; "" = probe
  std::optional<std::uint64_t> offset;  // a raw range of the file: its start
  std::optional<std::uint64_t> size;    // and its length (else to the end)
  bool no_backing = false;              // qcow2 "backing": null
  std::vector<std::string> warnings;    // to log (QEMU's deprecation warning)
};

// Whether a serve/info argument is a `json:` pseudo-filename.
[[nodiscard]] bool is_json_filename(std::string_view image);
// Parse `json:{...}` (the whole argument, prefix included).
[[nodiscard]] Result<ImageSpec> parse_image_json(std::string_view image);
// Parse an --image-opts argument.
[[nodiscard]] Result<ImageSpec> parse_image_opts(std::string_view text);
// A json: image of a config file with every relative "filename" made
// relative to `base_dir` (the config's directory), as plain image paths
// are; the argument is returned unchanged if it does not parse.
[[nodiscard]] std::string rebase_image_json(const std::string& image, const std::string& base_dir);

}  // namespace qnbd::config
