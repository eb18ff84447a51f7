// ExportCatalog: what the handshake needs to know about the exports, as
// plain data (no image types), so the Negotiator stays pure and testable.
//
// Thread-safety: the Negotiator calls the catalog from one thread at a time;
// implementations shared between connections must be safe for concurrent
// const calls. The export set may change while clients negotiate (the
// server's control socket adds and removes exports): exports() hands out an
// immutable snapshot, and what find() returns stays valid as long as the
// caller holds it, whatever changes afterwards.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qnbd::protocol {

struct ExportInfo {
  std::string name;
  std::string description;
  std::uint64_t size = 0;
  // Inputs of the transmission flags (proto.md "Transmission flags");
  // per-connection bits (SEND_DF, BLOCK_STATUS_PAYLOAD) are added by the
  // Negotiator from the reply mode.
  bool read_only = true;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = false;
  bool can_write_zeroes = false;
  bool can_fast_zero = false;
  bool can_multi_conn = false;
  bool can_cache = true;
  bool rotational = false;
  // proto.md "Size constraints". min_block is advertised only to clients that
  // asked for NBD_INFO_BLOCK_SIZE in GO (like qemu); others see 1.
  std::uint32_t min_block = 1;
  std::uint32_t preferred_block = 4096;
  std::uint32_t max_payload = 32u << 20;
  // Metadata contexts (proto.md "Metadata querying").
  bool allocation_depth = false;
  std::vector<std::string> bitmaps;
  // Set by the catalog: tells apart two exports of the same name, one
  // removed and the other added later (a connection that negotiated the
  // first must never be attached to the second). 0 when not used.
  std::uint64_t instance = 0;
};

using ExportList = std::vector<ExportInfo>;

class ExportCatalog {
 public:
  virtual ~ExportCatalog() = default;
  // Exports in listing order (NBD_OPT_LIST): a snapshot, never null.
  virtual std::shared_ptr<const ExportList> exports() const = 0;
  // The export called `name`; "" is the default export. nullptr if none.
  // Shares ownership of the snapshot it was found in.
  virtual std::shared_ptr<const ExportInfo> find(std::string_view name) const {
    auto list = exports();
    for (const auto& e : *list)
      if (e.name == name) return std::shared_ptr<const ExportInfo>(list, &e);
    return nullptr;
  }
  // True once the server is shutting down: new options get NBD_REP_ERR_SHUTDOWN.
  virtual bool shutting_down() const { return false; }
};

// A catalog over a fixed vector, for tests and the simple server.
class StaticCatalog : public ExportCatalog {
 public:
  explicit StaticCatalog(std::vector<ExportInfo> exports)
      : exports_(std::make_shared<const ExportList>(std::move(exports))) {}
  std::shared_ptr<const ExportList> exports() const override { return exports_; }

 private:
  std::shared_ptr<const ExportList> exports_;
};

}  // namespace qnbd::protocol
