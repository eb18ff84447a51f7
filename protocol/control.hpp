// The control socket's protocol, pure (no sockets): one JSON request per
// line in, one typed command or a refusal out; replies encoded as one line.
// docs/control.md documents it, with a JSON Schema per command.
//
//   request: {"id": ID, "command": "NAME", "arguments": {...}}
//   reply:   {"id": ID, "result": {...}}
//        or  {"id": ID, "error": {"code": "CODE", "message": "..."}}
//
// ID is any JSON string, number or null, echoed back (null when the line
// could not be parsed far enough to find it). Every refusal carries a
// stable machine-readable code (ErrorCode) and a one-line message.
//
// All input is untrusted: a line is at most max_line_bytes (LineBuffer
// drops longer ones and reports them), nesting is at most max_depth,
// unknown arguments are refused rather than ignored, and parse_request
// never throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

namespace qnbd::protocol::control {

inline constexpr std::size_t max_line_bytes = 1u << 20;
inline constexpr unsigned max_depth = 16;
inline constexpr std::size_t max_name_bytes = 4096;         // NBD export names (proto.md "Metadata querying")
inline constexpr std::size_t max_bitmap_name_bytes = 1023;  // qcow2.txt "Bitmap directory": name_size
inline constexpr std::size_t max_list_items = 256;          // exports of a checkpoint, merge sources, ...

enum class ErrorCode {
  parse_error,       // not JSON, not an object, too deep, line too long
  unknown_command,   // "command" names no command
  invalid_argument,  // a missing, unknown or ill-typed argument; a refused value
  not_found,         // no such export or bitmap
  exists,            // the export or bitmap already exists
  busy,              // refused while clients are connected, or another edit runs
  not_supported,     // the export's format or mode cannot do it (raw, read-only)
  io_error,          // the image could not be read or written
};
const char* error_code_name(ErrorCode code);
// The code for an errno from the image layer (ENOENT not-found, EEXIST
// exists, EBUSY busy, ENOTSUP/EROFS not-supported, EINVAL/EFBIG/...
// invalid-argument, anything else io-error).
ErrorCode error_code_for_errno(int err);

struct Status {};
struct BitmapAdd {
  std::string export_name, name;
  std::uint64_t granularity = 0;  // 0: the image's default
  bool disabled = false;
};
// bitmap-remove, -clear, -enable, -disable: one bitmap of one export.
struct BitmapSimple {
  enum class Kind { remove, clear, enable, disable };
  Kind kind = Kind::remove;
  std::string export_name, name;
};
struct BitmapMerge {
  std::string export_name, target;
  std::vector<std::string> sources;  // merged into target in order
};
struct ExportAdd {
  std::string name, image;
  std::string format;  // "", "raw" or "qcow2" ("": detect)
  bool read_only = false;
  std::vector<std::string> bitmaps;
  bool allocation_depth = false;
};
struct ExportRemove {
  std::string name;
  bool force = false;
};
struct Checkpoint {
  std::string name;
  std::string disable;  // "" when no bitmap is disabled
  std::vector<std::string> exports;
  std::uint64_t granularity = 0;
  // Exports (among `exports`) that get a point-in-time view EXPORT@NAME
  // (docs/backup-views.md).
  std::vector<std::string> views;
};
// End views: the named ones (EXPORT@CHECKPOINT), or every view of `checkpoint`.
struct ViewEnd {
  std::vector<std::string> views;
  std::string checkpoint;
};
using Command =
    std::variant<Status, BitmapAdd, BitmapSimple, BitmapMerge, ExportAdd, ExportRemove, Checkpoint, ViewEnd>;

struct Request {
  nlohmann::json id;  // string, number or null
  std::string command;
  Command cmd;
};
struct Refusal {
  nlohmann::json id;  // null when unknown
  ErrorCode code = ErrorCode::parse_error;
  std::string message;
};

// Parse one line (without its newline). Never throws.
std::variant<Request, Refusal> parse_request(std::string_view line);

// One reply line each, newline-terminated. Strings that are not valid
// UTF-8 (an image path, say) are written with U+FFFD in their place.
std::string encode_result(const nlohmann::json& id, const nlohmann::json& result);
std::string encode_error(const nlohmann::json& id, ErrorCode code, std::string_view message);

// Splits a byte stream into lines of at most max_line_bytes. A longer line
// is dropped as it arrives (memory stays bounded) and reported once, as
// too_long, when its newline comes.
class LineBuffer {
 public:
  struct Line {
    std::string text;
    bool too_long = false;
  };
  explicit LineBuffer(std::size_t max_bytes = max_line_bytes) : max_(max_bytes) {}
  void feed(std::string_view bytes);
  std::optional<Line> next();
  std::size_t buffered() const { return buf_.size(); }

 private:
  std::size_t max_;
  std::string buf_;        // the start of the current line (at most max_ bytes)
  bool skipping_ = false;  // the current line passed max_: dropping until '\n'
  std::vector<Line> ready_;
  std::size_t next_ready_ = 0;
};

}  // namespace qnbd::protocol::control
