# TLS material for the TLS tests, made fresh at test time with certtool and
# psktool (gnutls-bin). Source after lib-serve.sh (or functions.sh):
#   source "$(dirname "$0")/lib-tls.sh"
#   tls_test_setup TOOLS...      # requires TOOLS and python3-libnbd, makes
#                                # the material, sets TLS_DIR and T
# or, for the material alone:
#   make_tls_material            # sets TLS_DIR
#
# Layout under $TLS_DIR (qemu's file names, so the same directories work for
# qemu-nbd, qemu-img/qemu-io --object tls-creds-x509 and libnbd's
# tls-certificates=):
#   server/    ca-cert.pem server-cert.pem server-key.pem (CN=localhost,
#              DNS localhost, IP 127.0.0.1)
#   client1/   ca-cert.pem client-cert.pem client-key.pem  DN $TLS_DN1
#   client2/   same, DN $TLS_DN2
#   expired/   a client certificate of the same CA that expired in 2020
#   otherca/   a client certificate from a second CA the server does not trust
#   nocert/    ca-cert.pem only (a client without a certificate)
#   psk/keys.psk        user alice (and bob) with random keys
#   psk-wrong/keys.psk  user alice with another key
# ECDSA P-256 keys: generating them takes milliseconds, RSA would take seconds.

TLS_DN1="C=GB,O=qnbd test,CN=client1"
TLS_DN2="C=GB,O=qnbd test,CN=client2"

_tls_cert() {  # _tls_cert OUTCERT KEY TEMPLATE [CACERT CAKEY]
  local out=$1 key=$2 tmpl=$3
  if [[ $# -ge 5 ]]; then
    certtool --generate-certificate --load-privkey "$key" --load-ca-certificate "$4" \
      --load-ca-privkey "$5" --template "$tmpl" --outfile "$out" >/dev/null 2>&1
  else
    certtool --generate-self-signed --load-privkey "$key" --template "$tmpl" --outfile "$out" >/dev/null 2>&1
  fi || fail "certtool could not make $out"
}

_tls_key() { certtool --generate-privkey --key-type ecdsa --curve secp256r1 --outfile "$1" >/dev/null 2>&1 ||
  fail "certtool could not make $1"; }

make_tls_material() {
  requires certtool psktool
  TLS_DIR=$TMPDIR_TEST/tls
  local d=$TLS_DIR w=$TMPDIR_TEST/tls-work
  mkdir -p "$d"/{server,client1,client2,expired,otherca,nocert,psk,psk-wrong} "$w"
  # CA and a second, untrusted CA.
  local ca
  for ca in ca ca2; do
    _tls_key "$w/$ca-key.pem"
    printf 'cn = "qnbd test %s"\nca\ncert_signing_key\nexpiration_days = 2\n' "$ca" >"$w/$ca.info"
    _tls_cert "$w/$ca-cert.pem" "$w/$ca-key.pem" "$w/$ca.info"
  done
  local c
  for c in server client1 client2 expired otherca nocert; do cp "$w/ca-cert.pem" "$d/$c/ca-cert.pem"; done
  # Server certificate for localhost and 127.0.0.1.
  _tls_key "$d/server/server-key.pem"
  printf 'organization = "qnbd test"\ncn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' \
    >"$w/server.info"
  _tls_cert "$d/server/server-cert.pem" "$d/server/server-key.pem" "$w/server.info" "$w/ca-cert.pem" "$w/ca-key.pem"
  # Clients. The DN as qemu and qnbd print it (gnutls_x509_crt_get_dn): C=GB,O=qnbd test,CN=NAME.
  local name issuer dates
  for c in client1 client2 expired otherca; do
    name=$c issuer=ca dates='expiration_days = 2'
    [[ $c == expired ]] && dates=$'activation_date = "2019-01-01 00:00:00"\nexpiration_date = "2020-01-01 00:00:00"'
    [[ $c == otherca ]] && issuer=ca2
    _tls_key "$d/$c/client-key.pem"
    printf 'country = "GB"\norganization = "qnbd test"\ncn = "%s"\ntls_www_client\nencryption_key\nsigning_key\n%s\n' \
      "$name" "$dates" >"$w/$c.info"
    _tls_cert "$d/$c/client-cert.pem" "$d/$c/client-key.pem" "$w/$c.info" "$w/$issuer-cert.pem" "$w/$issuer-key.pem"
  done
  # PSK: alice and bob on the server; the "wrong" file has alice with another key.
  psktool -u alice -p "$d/psk/keys.psk" >/dev/null 2>&1 || fail "psktool failed"
  psktool -u bob -p "$d/psk/keys.psk" >/dev/null 2>&1 || fail "psktool failed"
  psktool -u alice -p "$d/psk-wrong/keys.psk" >/dev/null 2>&1 || fail "psktool failed"
  cmp -s "$d/psk/keys.psk" "$d/psk-wrong/keys.psk" && fail "psktool made the same key twice"
  # Keys must not be world-readable, like real deployments (and qemu warns).
  chmod 600 "$d"/*/*key.pem "$d"/psk*/keys.psk
}

# wait_log FILE PATTERN: true once FILE has a line matching PATTERN (the
# server logs a refusal just after the client has already gone), at most 5 s.
wait_log() {
  local i
  for ((i = 0; i < 100; i++)); do
    grep -q -- "$2" "$1" && return 0
    sleep 0.05
  done
  return 1
}

# tls_test_setup TOOLS...: the preamble every TLS test shares: skip unless
# TOOLS and python3-libnbd ($PY) are there, make the material, T=$TLS_DIR.
tls_test_setup() {
  requires "$@"
  requires_python_nbd
  make_tls_material
  T=$TLS_DIR
}

# free_port: a TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# serve_tls_tcp PORT ARGS...: qnbd serve on 127.0.0.1:PORT (persistent) with
# the X.509 server credentials of $T/server as --tls-creds t; ARGS end with
# the image. Sets SRV_PID and SRV_LOG (its stderr); returns once the pid file
# is written (the listener is bound by then).
serve_tls_tcp() {
  local port=$1
  shift
  SRV_LOG=$TMPDIR_TEST/srv$port.log
  "$QNBD" serve -t -b 127.0.0.1 -p "$port" \
    --object "tls-creds-x509,id=t,endpoint=server,dir=$T/server" --tls-creds t \
    --pid-file "$TMPDIR_TEST/srv$port.pid" "$@" 2>"$SRV_LOG" &
  SRV_PID=$!
  cleanup_fn "kill -9 $SRV_PID 2>/dev/null"
  local i
  for ((i = 0; i < 200; i++)); do [[ -s $TMPDIR_TEST/srv$port.pid ]] && return; sleep 0.05; done
  fail "server on port $port did not start"
}
