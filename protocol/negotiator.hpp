// Negotiator: the server side of the NBD handshake (proto.md "Handshake",
// "Option types", "Option reply types", "TLS support") as a pure state machine.
// Bytes in, actions out; no sockets, so it can be unit-tested with scripts
// split at every byte boundary and fuzzed.
//
// Use: loop { a = next(); send a.data / read exactly a.bytes and feed() them /
// start transmission with result() / close }. The negotiator never asks for
// more bytes than the handshake needs, so nothing of the transmission phase
// is consumed by it. Not thread-safe (one per connection).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "protocol/catalog.hpp"
#include "protocol/meta_context.hpp"
#include "protocol/mode.hpp"

namespace qnbd::protocol {

struct Action {
  enum class Kind : std::uint8_t {
    send,                // write `data` to the peer, then call next() again
    need_bytes,          // read exactly `bytes` more bytes and feed() them
    start_transmission,  // handshake done: see Negotiator::result()
    start_tls,           // run the TLS handshake on the socket, then call
                         // tls_started() (or close if it fails)
    close,               // drop the connection (after sending nothing more)
  };
  Kind kind = Kind::close;
  std::span<const std::byte> data;  // for send; valid until the next call
  std::size_t bytes = 0;            // for need_bytes
};

// What the handshake settled.
struct Negotiated {
  // The export as negotiated (shared with the catalog's snapshot, so it
  // stays valid if the export is removed meanwhile).
  std::shared_ptr<const ExportInfo> export_info;
  std::uint16_t transmission_flags = 0;
  ReplyMode mode = ReplyMode::simple;
  std::vector<MetaContext> contexts;  // usable selection (empty: no BLOCK_STATUS)
  bool block_size_committed = false;  // GO asked for NBD_INFO_BLOCK_SIZE
  std::uint32_t min_block = 1;        // as advertised to this client
  std::uint32_t max_payload = 32u << 20;
};

// The listener's TLS mode (NBD proto.md section "TLS support"): without
// credentials NOTLS (STARTTLS gets NBD_REP_ERR_POLICY); with them FORCEDTLS.
enum class TlsMode : std::uint8_t { none, required };

class Negotiator {
 public:
  explicit Negotiator(const ExportCatalog& catalog, TlsMode tls = TlsMode::none);

  // The TLS handshake that start_tls asked for succeeded: TLS is now active
  // and every state negotiated before it is discarded (section "NBD_OPT_STARTTLS").
  void tls_started();
  bool tls_active() const { return tls_active_; }

  Action next();
  // Feed bytes read from the peer; at most the count last asked for.
  void feed(std::span<const std::byte> bytes);

  const Negotiated& result() const { return result_; }
  // Why the negotiator chose to close (empty after ABORT or success).
  const std::string& close_reason() const { return close_reason_; }

  // Transmission flags advertised for `exp` in `mode`, with `has_contexts`
  // telling whether a context selection for it exists (BLOCK_STATUS_PAYLOAD).
  static std::uint16_t transmission_flags(const ExportInfo& exp, ReplyMode mode, bool has_contexts);

 private:
  // option_skip: dropping the data of an option above kMaxOptionLength.
  enum class Stage : std::uint8_t { client_flags, option_header, option_data, option_skip, transmission, closed };

  void process();
  void process_option();
  void skipped_option();
  void fail(std::string reason);
  void reply(std::uint32_t type, std::span<const std::byte> data = {});
  void reply_error(std::uint32_t type, std::string_view message);
  bool tls_refused();
  void opt_starttls(bool has_data);
  void opt_export_name();
  void opt_list();
  void opt_info_go(bool go);
  void opt_meta_context(bool set);
  std::uint16_t flags_for(const ExportInfo& exp) const;

  const ExportCatalog& catalog_;
  Stage stage_ = Stage::client_flags;
  std::vector<std::byte> in_;
  std::size_t need_ = 4;
  std::size_t skip_left_ = 0;  // option_skip: bytes still to drop
  std::vector<std::byte> out_;
  bool out_pending_ = false;
  bool close_after_send_ = false;
  bool tls_after_send_ = false;  // STARTTLS acknowledged: next is start_tls
  TlsMode tls_mode_ = TlsMode::none;
  bool tls_active_ = false;

  bool no_zeroes_ = false;
  std::uint32_t opt_ = 0;
  ReplyMode mode_ = ReplyMode::simple;
  // Last SET_META_CONTEXT selection and the export it named (proto.md
  // "NBD_OPT_SET_META_CONTEXT"), with that export's instance: a selection made
  // on an export that was then removed and added again (same name, other
  // bitmaps) does not carry over.
  std::vector<MetaContext> selected_;
  std::string selected_export_;
  std::uint64_t selected_instance_ = 0;
  bool has_selection_ = false;
  bool selection_for(const ExportInfo& exp) const {
    return has_selection_ && selected_export_ == exp.name && selected_instance_ == exp.instance;
  }

  Negotiated result_;
  std::string close_reason_;
};

}  // namespace qnbd::protocol
