#include "protocol/negotiator.hpp"

#include <algorithm>
#include <cstring>

#include "common/endian.hpp"
#include "protocol/constants.hpp"

namespace qnbd::protocol {

namespace {

void put16(std::vector<std::byte>& v, std::uint16_t x) {
  auto n = v.size();
  v.resize(n + 2);
  store_be16(v.data() + n, x);
}
void put32(std::vector<std::byte>& v, std::uint32_t x) {
  auto n = v.size();
  v.resize(n + 4);
  store_be32(v.data() + n, x);
}
void put64(std::vector<std::byte>& v, std::uint64_t x) {
  auto n = v.size();
  v.resize(n + 8);
  store_be64(v.data() + n, x);
}
void put_str(std::vector<std::byte>& v, std::string_view s) {
  auto p = reinterpret_cast<const std::byte*>(s.data());
  v.insert(v.end(), p, p + s.size());
}

// Bounded reader over one option's data; every get checks the remaining length.
struct Cursor {
  std::span<const std::byte> d;
  std::size_t pos = 0;
  std::size_t left() const { return d.size() - pos; }
  bool get32(std::uint32_t& x) {
    if (left() < 4) return false;
    x = load_be32(d.data() + pos);
    pos += 4;
    return true;
  }
  bool get16(std::uint16_t& x) {
    if (left() < 2) return false;
    x = load_be16(d.data() + pos);
    pos += 2;
    return true;
  }
  bool get_str(std::size_t n, std::string_view& s) {
    if (left() < n) return false;
    s = std::string_view(reinterpret_cast<const char*>(d.data() + pos), n);
    pos += n;
    return true;
  }
};

}  // namespace

Negotiator::Negotiator(const ExportCatalog& catalog, TlsMode tls) : catalog_(catalog), tls_mode_(tls) {
  // Greeting (proto.md "Newstyle negotiation"): fixed newstyle, and we can omit
  // the zeroes.
  put64(out_, NBDMAGIC);
  put64(out_, IHAVEOPT);
  put16(out_, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  out_pending_ = true;
}

Action Negotiator::next() {
  if (out_pending_) {
    out_pending_ = false;
    return {Action::Kind::send, out_, 0};
  }
  out_.clear();
  if (close_after_send_) stage_ = Stage::closed;
  if (tls_after_send_ && stage_ != Stage::closed) {
    // Stays set until tls_started(): nothing may be read in clear meanwhile.
    return {Action::Kind::start_tls, {}, 0};
  }
  switch (stage_) {
    case Stage::transmission: return {Action::Kind::start_transmission, {}, 0};
    case Stage::closed: return {Action::Kind::close, {}, 0};
    case Stage::option_skip: return {Action::Kind::need_bytes, {}, skip_left_};
    default: return {Action::Kind::need_bytes, {}, need_ - in_.size()};
  }
}

void Negotiator::tls_started() {
  if (!tls_after_send_) return;
  tls_after_send_ = false;
  tls_active_ = true;
  // NBD proto.md "NBD_OPT_STARTTLS": after the upgrade the client must
  // renegotiate structured replies, extended headers and meta contexts.
  mode_ = ReplyMode::simple;
  selected_.clear();
  selected_export_.clear();
  has_selection_ = false;
}

void Negotiator::feed(std::span<const std::byte> bytes) {
  if (stage_ == Stage::transmission || stage_ == Stage::closed || close_after_send_ || tls_after_send_) return;
  if (stage_ == Stage::option_skip) {
    skip_left_ -= std::min(bytes.size(), skip_left_);
    if (skip_left_ == 0) skipped_option();
    return;
  }
  auto take = std::min(bytes.size(), need_ - in_.size());
  in_.insert(in_.end(), bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(take));
  if (in_.size() == need_) process();
}

void Negotiator::fail(std::string reason) {
  close_reason_ = std::move(reason);
  stage_ = Stage::closed;
  in_.clear();
}

void Negotiator::reply(std::uint32_t type, std::span<const std::byte> data) {
  put64(out_, NBD_REP_MAGIC);
  put32(out_, opt_);
  put32(out_, type);
  put32(out_, static_cast<std::uint32_t>(data.size()));
  out_.insert(out_.end(), data.begin(), data.end());
  out_pending_ = true;
}

void Negotiator::reply_error(std::uint32_t type, std::string_view message) {
  reply(type, std::as_bytes(std::span(message.data(), std::min(message.size(), kMaxString))));
}

void Negotiator::process() {
  switch (stage_) {
    case Stage::client_flags: {
      auto flags = load_be32(in_.data());
      in_.clear();
      // proto.md "Client flags": unknown or unadvertised bits are a MUST-close.
      if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) return fail("client flags contain unknown bits");
      // Non-fixed newstyle clients are served like fixed ones (allowed by
      // proto.md "Client flags"); they can only send EXPORT_NAME anyway.
      no_zeroes_ = (flags & NBD_FLAG_C_NO_ZEROES) != 0;
      stage_ = Stage::option_header;
      need_ = kOptionHeaderSize;
      return;
    }
    case Stage::option_header: {
      auto magic = load_be64(in_.data());
      opt_ = load_be32(in_.data() + 8);
      auto len = load_be32(in_.data() + 12);
      in_.clear();
      if (magic != IHAVEOPT) return fail("bad option magic");
      if (len > kMaxOptionDrain) return fail("option length above limit");
      if (len > kMaxOptionLength) {
        stage_ = Stage::option_skip;
        skip_left_ = len;
        return;
      }
      stage_ = Stage::option_data;
      need_ = len;
      if (len == 0) process();
      return;
    }
    case Stage::option_data:
      process_option();
      in_.clear();
      if (stage_ == Stage::option_data) {
        stage_ = Stage::option_header;
        need_ = kOptionHeaderSize;
      }
      return;
    default: return;
  }
}

// The data of an option above kMaxOptionLength has been dropped unread.
void Negotiator::skipped_option() {
  stage_ = Stage::option_header;
  need_ = kOptionHeaderSize;
  switch (opt_) {
    case NBD_OPT_EXPORT_NAME: return fail("EXPORT_NAME data above limit");
    case NBD_OPT_ABORT:
      reply(NBD_REP_ACK);  // proto.md "NBD_OPT_ABORT": data ignored
      close_after_send_ = true;
      return;
    default:
      if (tls_refused()) return;
      return reply_error(NBD_REP_ERR_TOO_BIG, "option data above 1 MiB");
  }
}

std::uint16_t Negotiator::transmission_flags(const ExportInfo& exp, ReplyMode mode, bool has_contexts) {
  // qemu-nbd's set (nbd/server.c nbd_export_create): HAS_FLAGS, FLUSH, FUA,
  // CACHE always; then either READ_ONLY or the write-side features;
  // per-connection DF / BS payload.
  std::uint16_t f = NBD_FLAG_HAS_FLAGS;
  if (exp.can_flush) f |= NBD_FLAG_SEND_FLUSH;
  if (exp.can_fua) f |= NBD_FLAG_SEND_FUA;
  if (exp.can_cache) f |= NBD_FLAG_SEND_CACHE;
  if (exp.rotational) f |= NBD_FLAG_ROTATIONAL;
  if (exp.read_only) {
    f |= NBD_FLAG_READ_ONLY;
  } else {
    if (exp.can_trim) f |= NBD_FLAG_SEND_TRIM;
    if (exp.can_write_zeroes) {
      f |= NBD_FLAG_SEND_WRITE_ZEROES;
      if (exp.can_fast_zero) f |= NBD_FLAG_SEND_FAST_ZERO;
    }
  }
  if (exp.can_multi_conn) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (mode != ReplyMode::simple) f |= NBD_FLAG_SEND_DF;
  if (mode == ReplyMode::extended && has_contexts) f |= NBD_FLAG_BLOCK_STATUS_PAYLOAD;
  return f;
}

std::uint16_t Negotiator::flags_for(const ExportInfo& exp) const {
  bool has = selection_for(exp) && !selected_.empty();
  return transmission_flags(exp, mode_, has);
}

// FORCEDTLS before the upgrade (NBD proto.md "FORCEDTLS mode"): every option
// but STARTTLS and ABORT, unknown ones included, gets NBD_REP_ERR_TLS_REQD and
// EXPORT_NAME, which cannot carry an error, ends the session. Nothing about
// the exports is revealed. True when the option was answered here.
bool Negotiator::tls_refused() {
  if (tls_mode_ != TlsMode::required || tls_active_) return false;
  if (opt_ == NBD_OPT_STARTTLS || opt_ == NBD_OPT_ABORT) return false;
  if (opt_ == NBD_OPT_EXPORT_NAME) {
    fail("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS listener");
    return true;
  }
  reply_error(NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
  return true;
}

void Negotiator::opt_starttls(bool has_data) {
  if (has_data) return reply_error(NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
  if (tls_mode_ == TlsMode::none) return reply_error(NBD_REP_ERR_POLICY, "TLS not configured");
  if (tls_active_) return reply_error(NBD_REP_ERR_INVALID, "TLS is already active");
  reply(NBD_REP_ACK);
  tls_after_send_ = true;
}

void Negotiator::process_option() {
  if (tls_refused()) return;
  if (catalog_.shutting_down() && opt_ != NBD_OPT_ABORT) {
    if (opt_ == NBD_OPT_EXPORT_NAME) return fail("server shutting down");
    return reply_error(NBD_REP_ERR_SHUTDOWN, "server is shutting down");
  }
  const bool has_data = !in_.empty();
  switch (opt_) {
    case NBD_OPT_EXPORT_NAME: return opt_export_name();
    case NBD_OPT_ABORT:
      // proto.md "NBD_OPT_ABORT": data ignored; ACK then close.
      reply(NBD_REP_ACK);
      close_after_send_ = true;
      return;
    case NBD_OPT_LIST:
      if (has_data) return reply_error(NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
      return opt_list();
    case NBD_OPT_STARTTLS: return opt_starttls(has_data);
    case NBD_OPT_INFO: return opt_info_go(false);
    case NBD_OPT_GO: return opt_info_go(true);
    case NBD_OPT_STRUCTURED_REPLY:
      if (has_data) return reply_error(NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
      if (mode_ == ReplyMode::extended)
        return reply_error(NBD_REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated");
      if (mode_ == ReplyMode::structured)
        return reply_error(NBD_REP_ERR_INVALID, "structured reply already negotiated");
      mode_ = ReplyMode::structured;
      return reply(NBD_REP_ACK);
    case NBD_OPT_LIST_META_CONTEXT: return opt_meta_context(false);
    case NBD_OPT_SET_META_CONTEXT: return opt_meta_context(true);
    case NBD_OPT_EXTENDED_HEADERS:
      if (has_data) return reply_error(NBD_REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
      if (mode_ == ReplyMode::extended) return reply_error(NBD_REP_ERR_INVALID, "extended headers already negotiated");
      mode_ = ReplyMode::extended;
      return reply(NBD_REP_ACK);
    default: return reply_error(NBD_REP_ERR_UNSUP, "option not supported");
  }
}

void Negotiator::opt_export_name() {
  // proto.md "NBD_OPT_EXPORT_NAME": failures cannot be reported; the only
  // answer is a hard disconnect.
  if (mode_ == ReplyMode::extended) return fail("NBD_OPT_EXPORT_NAME after extended headers");
  if (in_.size() > kMaxString) return fail("export name too long");
  std::string_view name(reinterpret_cast<const char*>(in_.data()), in_.size());
  const auto exp = catalog_.find(name);
  if (!exp) return fail("unknown export");
  auto flags = flags_for(*exp);
  put64(out_, exp->size);
  put16(out_, flags);
  if (!no_zeroes_) out_.resize(out_.size() + 124);
  out_pending_ = true;
  result_.export_info = exp;
  result_.transmission_flags = flags;
  result_.mode = mode_;
  if (selection_for(*exp)) result_.contexts = selected_;
  result_.block_size_committed = false;
  result_.min_block = 1;
  result_.max_payload = exp->max_payload;
  stage_ = Stage::transmission;
}

void Negotiator::opt_list() {
  std::vector<std::byte> d;
  for (const auto& e : *catalog_.exports()) {
    d.clear();
    put32(d, static_cast<std::uint32_t>(e.name.size()));
    put_str(d, e.name);
    put_str(d, e.description);
    reply(NBD_REP_SERVER, d);
  }
  reply(NBD_REP_ACK);
}

void Negotiator::opt_info_go(bool go) {
  // proto.md "NBD_OPT_INFO" / "NBD_OPT_GO" layout: name length, name, count of
  // info requests, requests.
  Cursor c{in_};
  std::uint32_t name_len;
  std::string_view name;
  std::uint16_t nreq;
  if (!c.get32(name_len) || !c.get_str(name_len, name) || !c.get16(nreq) || c.left() != 2u * nreq)
    return reply_error(NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
  if (name.size() > kMaxString) return reply_error(NBD_REP_ERR_INVALID, "export name too long");
  bool want_name = false, want_desc = false, want_bs = false;
  for (std::uint16_t i = 0; i < nreq; ++i) {
    std::uint16_t r = 0;
    (void)c.get16(r);
    if (r == NBD_INFO_NAME)
      want_name = true;
    else if (r == NBD_INFO_DESCRIPTION)
      want_desc = true;
    else if (r == NBD_INFO_BLOCK_SIZE)
      want_bs = true;
    // unknown info requests are ignored (proto.md "NBD_OPT_INFO")
  }
  const auto exp = catalog_.find(name);
  if (!exp) return reply_error(NBD_REP_ERR_UNKNOWN, "export not present");

  std::vector<std::byte> d;
  if (want_name) {
    put16(d, NBD_INFO_NAME);
    put_str(d, exp->name);
    reply(NBD_REP_INFO, d);
  }
  if (want_desc && !exp->description.empty()) {
    d.clear();
    put16(d, NBD_INFO_DESCRIPTION);
    put_str(d, exp->description);
    reply(NBD_REP_INFO, d);
  }
  // Like qemu: always advertise block sizes; the minimum is 1 unless the
  // client committed to honour it (GO with NBD_INFO_BLOCK_SIZE).
  std::uint32_t min_block = (go && want_bs) ? exp->min_block : 1;
  if (!go && want_bs) min_block = exp->min_block;
  std::uint32_t preferred = std::max({exp->preferred_block, min_block, 4096u});
  std::uint32_t max_payload = std::max(exp->max_payload, preferred);
  d.clear();
  put16(d, NBD_INFO_BLOCK_SIZE);
  put32(d, min_block);
  put32(d, preferred);
  put32(d, max_payload);
  reply(NBD_REP_INFO, d);
  if (!go && !want_bs && exp->min_block > 1)
    return reply_error(NBD_REP_ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export");

  auto flags = flags_for(*exp);
  d.clear();
  put16(d, NBD_INFO_EXPORT);
  put64(d, exp->size);
  put16(d, flags);
  reply(NBD_REP_INFO, d);
  reply(NBD_REP_ACK);
  if (!go) return;
  result_.export_info = exp;
  result_.transmission_flags = flags;
  result_.mode = mode_;
  // proto.md "Metadata querying": the selection counts only if the last SET
  // named this export.
  if (selection_for(*exp)) result_.contexts = selected_;
  result_.block_size_committed = want_bs;
  result_.min_block = min_block;
  result_.max_payload = max_payload;
  stage_ = Stage::transmission;
}

void Negotiator::opt_meta_context(bool set) {
  if (set) {
    // proto.md "NBD_OPT_SET_META_CONTEXT": SET replaces the previous selection
    // even when it fails.
    selected_.clear();
    selected_export_.clear();
    has_selection_ = false;
    if (mode_ == ReplyMode::simple) return reply_error(NBD_REP_ERR_INVALID, "structured replies not negotiated");
  }
  Cursor c{in_};
  std::uint32_t name_len, nq;
  std::string_view name;
  if (!c.get32(name_len) || !c.get_str(name_len, name) || !c.get32(nq))
    return reply_error(NBD_REP_ERR_INVALID, "malformed meta context request");
  std::vector<std::string_view> queries;
  for (std::uint32_t i = 0; i < nq; ++i) {
    std::uint32_t ql;
    std::string_view q;
    if (!c.get32(ql) || !c.get_str(ql, q)) return reply_error(NBD_REP_ERR_INVALID, "malformed meta context query");
    queries.push_back(q);
  }
  if (c.left() != 0) return reply_error(NBD_REP_ERR_INVALID, "trailing data in meta context request");
  if (name.size() > kMaxString) return reply_error(NBD_REP_ERR_INVALID, "export name too long");
  const auto exp = catalog_.find(name);
  if (!exp) return reply_error(NBD_REP_ERR_UNKNOWN, "export not present");
  auto contexts = match_meta_contexts(*exp, queries, !set);
  std::vector<std::byte> d;
  for (const auto& m : contexts) {
    d.clear();
    put32(d, set ? m.id : 0);
    put_str(d, m.name);
    reply(NBD_REP_META_CONTEXT, d);
  }
  reply(NBD_REP_ACK);
  if (set) {
    selected_ = std::move(contexts);
    selected_export_ = std::string(name);
    selected_instance_ = exp->instance;
    has_selection_ = true;
  }
}

}  // namespace qnbd::protocol
