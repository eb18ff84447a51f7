#include "server/tls.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <map>

#include "common/log.hpp"

namespace qnbd::server {

namespace {

// PEM files and keys.psk are small; a bigger one is a mistake (or /dev/zero).
constexpr off_t kMaxCredFile = 1 << 20;

std::string kind_name(TlsCredsSpec::Kind k) {
  return k == TlsCredsSpec::Kind::x509 ? "tls-creds-x509" : "tls-creds-psk";
}

Result<std::string> read_small_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return make_error(errno, "{}: {}", path, std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > kMaxCredFile) {
    ::close(fd);
    return make_error(EINVAL, "{}: not a regular file of at most 1 MiB", path);
  }
  std::string s(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t got = 0;
  while (got < s.size()) {
    auto n = ::read(fd, s.data() + got, s.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      ::close(fd);
      return make_error(e, "{}: {}", path, std::strerror(e));
    }
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  s.resize(got);
  ::close(fd);
  return s;
}

gnutls_datum_t datum(const std::string& s) {
  return {reinterpret_cast<unsigned char*>(const_cast<char*>(s.data())), static_cast<unsigned>(s.size())};
}

std::string utc(time_t t) {
  char b[40];
  struct tm tm;
  ::gmtime_r(&t, &tm);
  std::strftime(b, sizeof b, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return b;
}

int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

struct TlsCredentials::Impl {
  gnutls_certificate_credentials_t x509 = nullptr;
  gnutls_psk_server_credentials_t psk = nullptr;
  gnutls_priority_t priority = nullptr;
  std::map<std::string, std::string, std::less<>> psk_keys;  // username -> key bytes
  std::optional<TlsAuthzSpec> authz;
  ~Impl() {
    if (x509) gnutls_certificate_free_credentials(x509);
    if (psk) gnutls_psk_free_server_credentials(psk);
    if (priority) gnutls_priority_deinit(priority);
  }
};

TlsCredentials::TlsCredentials(TlsCredsSpec spec) : spec_(std::move(spec)), impl_(std::make_unique<Impl>()) {}
TlsCredentials::~TlsCredentials() = default;

std::string TlsCredentials::describe() const {
  std::string s = kind_name(spec_.kind) + " '" + spec_.id + "' from " + spec_.dir;
  if (spec_.kind == TlsCredsSpec::Kind::x509) s += spec_.verify_peer ? " (verify-peer)" : " (no client certificates)";
  if (impl_->authz) s += ", authz '" + impl_->authz->id + "'";
  return s;
}

namespace {

// GnuTLS asks for a PSK user's key during the handshake (the key must be
// allocated with gnutls_malloc). Unknown users are remembered for the log.
int psk_lookup(gnutls_session_t s, const char* username, gnutls_datum_t* key);

}  // namespace

Result<std::shared_ptr<const TlsCredentials>> TlsCredentials::load(const TlsCredsSpec& spec,
                                                                   std::optional<TlsAuthzSpec> authz) {
  const std::string who = kind_name(spec.kind) + " '" + spec.id + "'";
  struct stat st;
  if (::stat(spec.dir.c_str(), &st) != 0)
    return make_error(errno, "{}: dir {}: {}", who, spec.dir, std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) return make_error(ENOTDIR, "{}: dir {}: not a directory", who, spec.dir);
  std::shared_ptr<TlsCredentials> c(new TlsCredentials(spec));
  auto& im = *c->impl_;
  im.authz = std::move(authz);
  auto file = [&](const char* name) { return spec.dir + "/" + name; };
  auto read = [&](const char* name) -> Result<std::string> {
    auto r = read_small_file(file(name));
    if (!r) return make_error(r.error().code, "{}: {}", who, r.error().message);
    return r;
  };
  int rc;
  if (spec.kind == TlsCredsSpec::Kind::x509) {
    if ((rc = gnutls_certificate_allocate_credentials(&im.x509)) < 0)
      return make_error(ENOMEM, "{}: {}", who, gnutls_strerror(rc));
    auto cert = QNBD_TRY(read("server-cert.pem"));
    auto key = QNBD_TRY(read("server-key.pem"));
    if (spec.verify_peer || ::access(file("ca-cert.pem").c_str(), F_OK) == 0) {
      auto ca = QNBD_TRY(read("ca-cert.pem"));
      auto d = datum(ca);
      rc = gnutls_certificate_set_x509_trust_mem(im.x509, &d, GNUTLS_X509_FMT_PEM);
      if (rc < 0) return make_error(EINVAL, "{}: {}: {}", who, file("ca-cert.pem"), gnutls_strerror(rc));
      if (rc == 0) return make_error(EINVAL, "{}: {}: no certificate in it", who, file("ca-cert.pem"));
    }
    if (::access(file("ca-crl.pem").c_str(), F_OK) == 0) {
      auto crl = QNBD_TRY(read("ca-crl.pem"));
      auto d = datum(crl);
      rc = gnutls_certificate_set_x509_crl_mem(im.x509, &d, GNUTLS_X509_FMT_PEM);
      if (rc < 0) return make_error(EINVAL, "{}: {}: {}", who, file("ca-crl.pem"), gnutls_strerror(rc));
    }
    // Validity first: GnuTLS would accept an expired server certificate and
    // every client would then fail with a less helpful message.
    {
      auto d = datum(cert);
      gnutls_x509_crt_t crts[16];
      unsigned n = 16;
      rc = gnutls_x509_crt_list_import(crts, &n, &d, GNUTLS_X509_FMT_PEM, 0);
      if (rc < 0 || n == 0)
        return make_error(EINVAL, "{}: {}: not a PEM certificate ({})", who, file("server-cert.pem"),
                          rc < 0 ? gnutls_strerror(rc) : "empty");
      time_t now = ::time(nullptr);
      time_t expires = gnutls_x509_crt_get_expiration_time(crts[0]);
      time_t starts = gnutls_x509_crt_get_activation_time(crts[0]);
      for (unsigned i = 0; i < n; ++i) gnutls_x509_crt_deinit(crts[i]);
      if (expires != static_cast<time_t>(-1) && expires < now)
        return make_error(EINVAL, "{}: {}: certificate expired on {}", who, file("server-cert.pem"), utc(expires));
      if (starts != static_cast<time_t>(-1) && starts > now)
        return make_error(EINVAL, "{}: {}: certificate not valid before {}", who, file("server-cert.pem"), utc(starts));
    }
    auto dc = datum(cert), dk = datum(key);
    rc = gnutls_certificate_set_x509_key_mem(im.x509, &dc, &dk, GNUTLS_X509_FMT_PEM);
    if (rc == GNUTLS_E_CERTIFICATE_KEY_MISMATCH)
      return make_error(EINVAL, "{}: {} does not match {}", who, file("server-key.pem"), file("server-cert.pem"));
    if (rc < 0)
      return make_error(EINVAL, "{}: {} / {}: {}", who, file("server-cert.pem"), file("server-key.pem"),
                        gnutls_strerror(rc));
    rc = gnutls_priority_init(&im.priority, "NORMAL", nullptr);
  } else {
    auto text = QNBD_TRY(read("keys.psk"));
    // qemu's (and psktool's) format: one "username:hexkey" per line.
    std::size_t line_no = 0, pos = 0;
    while (pos < text.size()) {
      auto end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string_view line(text.data() + pos, end - pos);
      pos = end + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty()) continue;
      auto colon = line.find(':');
      auto bad = [&](const char* why) {
        return make_error(EINVAL, "{}: {} line {}: {} (expected USERNAME:HEXKEY)", who, file("keys.psk"), line_no, why);
      };
      if (colon == std::string_view::npos || colon == 0) return bad("no username");
      auto hex = line.substr(colon + 1);
      if (hex.empty() || hex.size() % 2 != 0) return bad("key is not an even number of hex digits");
      std::string keyb;
      for (std::size_t i = 0; i < hex.size(); i += 2) {
        int hi = hexval(hex[i]), lo = hexval(hex[i + 1]);
        if (hi < 0 || lo < 0) return bad("key is not hexadecimal");
        keyb.push_back(static_cast<char>(hi * 16 + lo));
      }
      im.psk_keys.emplace(std::string(line.substr(0, colon)), std::move(keyb));
    }
    if (im.psk_keys.empty()) return make_error(EINVAL, "{}: {}: no keys in it", who, file("keys.psk"));
    if ((rc = gnutls_psk_allocate_server_credentials(&im.psk)) < 0)
      return make_error(ENOMEM, "{}: {}", who, gnutls_strerror(rc));
    gnutls_psk_set_server_credentials_function(im.psk, psk_lookup);
    // qemu's PSK priority: the PSK key exchanges on top of the defaults.
    rc = gnutls_priority_init(&im.priority, "NORMAL:+ECDHE-PSK:+PSK", nullptr);
  }
  if (rc < 0) return make_error(EINVAL, "{}: priority: {}", who, gnutls_strerror(rc));
  return std::shared_ptr<const TlsCredentials>(std::move(c));
}

// ---------------------------------------------------------------------------

struct TlsSession::Handle {
  gnutls_session_t s = nullptr;
  const TlsCredentials::Impl* creds = nullptr;
  std::string psk_user;       // the username psk_lookup was asked for
  bool unknown_user = false;  // ... and it has no key
  bool bye_sent = false;
  ~Handle() {
    if (s) gnutls_deinit(s);
  }
};

namespace {

int psk_lookup(gnutls_session_t s, const char* username, gnutls_datum_t* key) {
  auto* h = static_cast<TlsSession::Handle*>(gnutls_session_get_ptr(s));
  h->psk_user = username;
  auto it = h->creds->psk_keys.find(std::string_view(username));
  if (it == h->creds->psk_keys.end()) {
    h->unknown_user = true;
    return -1;
  }
  key->data = static_cast<unsigned char*>(gnutls_malloc(it->second.size()));
  if (!key->data) return -1;
  std::memcpy(key->data, it->second.data(), it->second.size());
  key->size = static_cast<unsigned>(it->second.size());
  return 0;
}

}  // namespace

Result<std::unique_ptr<TlsSession>> TlsSession::create(std::shared_ptr<const TlsCredentials> creds, int fd) {
  std::unique_ptr<TlsSession> t(new TlsSession());
  t->creds_ = std::move(creds);
  t->h_ = std::make_unique<Handle>();
  const auto& im = t->creds_->impl();
  int rc = gnutls_init(&t->h_->s, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
  if (rc < 0) return make_error(ENOMEM, "gnutls_init: {}", gnutls_strerror(rc));
  auto s = t->h_->s;
  if ((rc = gnutls_priority_set(s, im.priority)) < 0) return make_error(EINVAL, "priority: {}", gnutls_strerror(rc));
  if (im.x509) {
    rc = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, im.x509);
    if (rc >= 0 && t->creds_->spec().verify_peer) {
      gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
      // Verify during the handshake, so the client gets a TLS alert.
      gnutls_session_set_verify_cert(s, nullptr, 0);
    }
  } else {
    rc = gnutls_credentials_set(s, GNUTLS_CRD_PSK, im.psk);
  }
  if (rc < 0) return make_error(EINVAL, "credentials: {}", gnutls_strerror(rc));
  t->h_->creds = &im;
  gnutls_session_set_ptr(s, t->h_.get());
  gnutls_transport_set_int(s, fd);
  // The session's handshake deadline bounds the handshake, not GnuTLS.
  gnutls_handshake_set_timeout(s, 0);
  return t;
}

TlsSession::~TlsSession() = default;

TlsSession::Io TlsSession::fail(int e, std::string_view what) {
  if (error_.empty()) error_ = std::string(what) + ": " + gnutls_strerror(e);
  return {Status::error};
}

TlsSession::Io TlsSession::handshake() {
  auto s = h_->s;
  for (;;) {
    int rc = gnutls_handshake(s);
    if (rc == GNUTLS_E_SUCCESS) {
      if (!authorise()) return {Status::error};
      return {Status::done};
    }
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED)
      return {gnutls_record_get_direction(s) ? Status::want_write : Status::want_read};
    if (!gnutls_error_is_fatal(rc)) continue;  // a warning alert
    if (h_->unknown_user) {
      error_ = "unknown PSK username '" + h_->psk_user + "'";
      return {Status::error};
    }
    if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
      unsigned status = gnutls_session_get_verify_cert_status(s);
      gnutls_datum_t out{};
      std::string why = "unknown reason";
      if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
        why.assign(reinterpret_cast<char*>(out.data), out.size);
        gnutls_free(out.data);
      }
      while (!why.empty() && why.back() == ' ') why.pop_back();
      error_ = "client certificate rejected: " + why;
      return {Status::error};
    }
    if (rc == GNUTLS_E_NO_CERTIFICATE_FOUND || rc == GNUTLS_E_CERTIFICATE_REQUIRED) {
      error_ = "client sent no certificate issued by ca-cert.pem (verify-peer is on)";
      return {Status::error};
    }
    if (rc == GNUTLS_E_UNEXPECTED_PACKET_LENGTH || rc == GNUTLS_E_UNSUPPORTED_VERSION_PACKET ||
        rc == GNUTLS_E_UNEXPECTED_PACKET)
      return fail(rc, "not a TLS ClientHello");
    if (rc == GNUTLS_E_PREMATURE_TERMINATION || rc == GNUTLS_E_PUSH_ERROR || rc == GNUTLS_E_PULL_ERROR)
      return fail(rc, "client left during the TLS handshake");
    if (creds_->impl().psk) {
      // A key that does not match shows up as a failed binder (TLS 1.3) or
      // a failed Finished check (TLS 1.2).
      return fail(rc, "TLS handshake failed (wrong key for PSK user '" + h_->psk_user + "'?)");
    }
    return fail(rc, "TLS handshake failed");
  }
}

bool TlsSession::authorise() {
  auto s = h_->s;
  const auto& im = creds_->impl();
  std::string identity, rfc4514;
  bool have_identity = false;
  if (im.psk) {
    const char* u = gnutls_psk_server_get_username(s);
    if (u) identity = u, have_identity = true;
    peer_ = "psk user '" + identity + "'";
  } else {
    unsigned n = 0;
    const gnutls_datum_t* list = gnutls_certificate_get_peers(s, &n);
    if (list && n > 0) {
      gnutls_x509_crt_t crt;
      if (gnutls_x509_crt_init(&crt) == 0) {
        if (gnutls_x509_crt_import(crt, &list[0], GNUTLS_X509_FMT_DER) == 0) {
          // gnutls_x509_crt_get_dn is what qemu's authz compares against, so
          // the same identity strings work for both servers.
          std::size_t len = 0;
          gnutls_x509_crt_get_dn(crt, nullptr, &len);
          identity.resize(len);
          if (gnutls_x509_crt_get_dn(crt, identity.data(), &len) == 0) {
            identity.resize(len);
            have_identity = true;
          }
          // The RFC 4514 spelling (last RDN first, as `certtool -i` and
          // openssl print it) names the same identity; accept it too.
          gnutls_datum_t d{};
          if (gnutls_x509_crt_get_dn3(crt, &d, 0) == 0) {
            rfc4514.assign(reinterpret_cast<char*>(d.data), d.size);
            gnutls_free(d.data);
          }
        }
        gnutls_x509_crt_deinit(crt);
      }
    }
    peer_ = have_identity ? "x509 '" + identity + "'" : "x509 without a client certificate";
  }
  if (!im.authz) return true;
  if (!have_identity) {
    error_ = "no client identity to check against authz '" + im.authz->id + "'";
    return false;
  }
  const auto& ids = im.authz->identities;
  if (std::find(ids.begin(), ids.end(), identity) != ids.end()) return true;
  if (!rfc4514.empty() && std::find(ids.begin(), ids.end(), rfc4514) != ids.end()) return true;
  error_ = "identity '" + identity + "' not allowed by authz '" + im.authz->id + "'";
  return false;
}

TlsSession::Io TlsSession::read(std::span<std::byte> buf) {
  for (;;) {
    auto rc = gnutls_record_recv(h_->s, buf.data(), buf.size());
    if (rc > 0) return {Status::done, static_cast<std::size_t>(rc)};
    if (rc == 0) return {Status::eof};
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) return {Status::want_read};
    if (rc == GNUTLS_E_REHANDSHAKE) continue;  // renegotiation is not offered; ignore the request
    if (rc == GNUTLS_E_PREMATURE_TERMINATION) return {Status::eof};
    if (!gnutls_error_is_fatal(static_cast<int>(rc))) continue;
    return fail(static_cast<int>(rc), "TLS receive");
  }
}

TlsSession::Io TlsSession::write(std::span<const std::byte> buf) {
  for (;;) {
    auto rc = gnutls_record_send(h_->s, buf.data(), buf.size());
    if (rc >= 0) return {Status::done, static_cast<std::size_t>(rc)};
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) return {Status::want_write};
    return fail(static_cast<int>(rc), "TLS send");
  }
}

std::string TlsSession::description() const {
  std::string out;
  if (char* d = gnutls_session_get_desc(h_->s)) {
    out = d;
    gnutls_free(d);
  }
  return out;
}

std::size_t TlsSession::pending() const { return gnutls_record_check_pending(h_->s); }

void TlsSession::bye() {
  if (h_->bye_sent) return;
  h_->bye_sent = true;
  (void)gnutls_bye(h_->s, GNUTLS_SHUT_WR);  // non-blocking: AGAIN just drops it
}

}  // namespace qnbd::server
