// TLS for NBD_OPT_STARTTLS through GnuTLS (docs/tls.md says why GnuTLS):
// server credentials in qemu's layout (tls-creds-x509 / tls-creds-psk
// directories), the authz-simple identity check, and a per-connection
// session over a non-blocking socket descriptor.
//
// Asio-free: TlsSession never blocks; each call answers "done" or which
// readiness (read/write) to wait for, and the caller (session.cpp) waits for
// it on the socket and calls again.
//
// Threading: TlsCredentials is immutable after load() and shared by every
// connection. A TlsSession belongs to one connection; one reader and one
// writer may use it concurrently only from the same strand (GnuTLS keeps the
// send and receive state apart).
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/result.hpp"

namespace qnbd::server {

struct TlsCredsSpec {
  enum class Kind { x509, psk };
  Kind kind = Kind::x509;
  std::string id;
  std::string dir;
  // x509 only: ask for and verify a client certificate against ca-cert.pem
  // (qemu's default is on).
  bool verify_peer = true;
};

// authz-simple: the client certificate's distinguished name (or, with PSK,
// the PSK username) must equal one of these exactly.
struct TlsAuthzSpec {
  std::string id;
  std::vector<std::string> identities;
};

class TlsCredentials {
 public:
  ~TlsCredentials();
  TlsCredentials(const TlsCredentials&) = delete;
  TlsCredentials& operator=(const TlsCredentials&) = delete;

  // Load and check the files now, so a bad setup fails at start with one
  // line naming the file: missing, unreadable, not PEM, key not matching
  // the certificate, certificate expired or not yet valid.
  [[nodiscard]] static Result<std::shared_ptr<const TlsCredentials>> load(const TlsCredsSpec& spec,
                                                                          std::optional<TlsAuthzSpec> authz);

  const TlsCredsSpec& spec() const { return spec_; }
  // For the log line at start: "x509 DIR (verify-peer)" etc.
  std::string describe() const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  explicit TlsCredentials(TlsCredsSpec spec);
  TlsCredsSpec spec_;
  std::unique_ptr<Impl> impl_;
};

class TlsSession {
 public:
  enum class Status {
    done,        // the step finished (bytes moved: see `n`)
    want_read,   // wait until the socket is readable, then call again
    want_write,  // wait until writable, then call again with the same data
    eof,         // the peer closed (TLS close_notify or end of stream)
    error,       // fatal: error() says why; drop the connection
  };
  struct Io {
    Status status;
    std::size_t n = 0;
  };

  // `fd` must be non-blocking; the session does not own it.
  [[nodiscard]] static Result<std::unique_ptr<TlsSession>> create(std::shared_ptr<const TlsCredentials> creds, int fd);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // Drive the handshake; on done the peer is verified and authorised
  // (peer() names it), on error error() says why (wrong PSK, unknown user,
  // certificate missing/expired/untrusted, DN not authorised, not TLS).
  Io handshake();
  Io read(std::span<std::byte> buf);
  // Sends a prefix of `buf` (one record or more); after want_write call
  // again with the same buffer.
  Io write(std::span<const std::byte> buf);
  // Bytes already decrypted and waiting (no socket readiness will show them).
  std::size_t pending() const;
  // Best-effort close_notify; never blocks.
  void bye();

  const std::string& error() const { return error_; }
  // "x509 DN" or "psk username" once the handshake is done.
  const std::string& peer() const { return peer_; }
  // The negotiated protocol, key exchange and cipher, as GnuTLS prints
  // them: "(TLS1.3)-(ECDHE-SECP256R1)-(ECDSA-SECP256R1-SHA256)-(AES-256-GCM)".
  std::string description() const;

  struct Handle;  // GnuTLS state, defined in tls.cpp

 private:
  TlsSession() = default;
  Io fail(int gnutls_error, std::string_view what);
  bool authorise();

  std::shared_ptr<const TlsCredentials> creds_;
  std::unique_ptr<Handle> h_;
  std::string error_;
  std::string peer_;
};

}  // namespace qnbd::server
