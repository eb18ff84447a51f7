// ExportCatalog: what the handshake needs to know about the exports, as
// plain data (no image types), so the Negotiator stays pure and testable.
//
// Thread-safety: the Negotiator calls the catalog from one thread at a time;
// implementations shared between connections must be safe for concurrent
// const calls.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qnbd::protocol {

struct ExportInfo {
  std::string name;
  std::string description;
  std::uint64_t size = 0;
  // Inputs of the transmission flags (§8.1); per-connection bits (SEND_DF,
  // BLOCK_STATUS_PAYLOAD) are added by the Negotiator from the reply mode.
  bool read_only = true;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = false;
  bool can_write_zeroes = false;
  bool can_fast_zero = false;
  bool can_multi_conn = false;
  bool can_cache = true;
  bool rotational = false;
  // §9 size constraints. min_block is advertised only to clients that asked
  // for NBD_INFO_BLOCK_SIZE in GO (like qemu); others see 1.
  std::uint32_t min_block = 1;
  std::uint32_t preferred_block = 4096;
  std::uint32_t max_payload = 32u << 20;
  // Metadata contexts (§13).
  bool allocation_depth = false;
  std::vector<std::string> bitmaps;
};

class ExportCatalog {
 public:
  virtual ~ExportCatalog() = default;
  // Exports in listing order (NBD_OPT_LIST).
  virtual const std::vector<ExportInfo>& exports() const = 0;
  // The export called `name`; "" is the default export. nullptr if none.
  virtual const ExportInfo* find(std::string_view name) const {
    for (const auto& e : exports())
      if (e.name == name) return &e;
    return nullptr;
  }
  // True once the server is shutting down: new options get NBD_REP_ERR_SHUTDOWN.
  virtual bool shutting_down() const { return false; }
};

// A catalog over a fixed vector, for tests and the simple server.
class StaticCatalog : public ExportCatalog {
 public:
  explicit StaticCatalog(std::vector<ExportInfo> exports) : exports_(std::move(exports)) {}
  const std::vector<ExportInfo>& exports() const override { return exports_; }

 private:
  std::vector<ExportInfo> exports_;
};

}  // namespace qnbd::protocol
