#!/usr/bin/env bash
# TLS refusals: each bad client is refused or cut off with a logged reason,
# while a good TLS client connected before them keeps being served:
# plaintext client, client certificate missing / expired / from another CA /
# with a DN outside the authz list, a client stalling in the TLS handshake
# (the handshake timeout covers it), garbage instead of a ClientHello; with
# PSK a wrong key and an unknown user. Bad credential directories fail at
# start with one line naming the file.
source "$(dirname "$0")/lib-serve.sh"
source "$(dirname "$0")/lib-tls.sh"
tls_test_setup nbdinfo timeout

img=$TMPDIR_TEST/disk.img
head -c 1M /dev/urandom >"$img"

# A good client that stays connected through all refusals and reads at the
# end; it waits for a line on stdin between connecting and reading.
good_client_start() {  # URI
  mkfifo "$TMPDIR_TEST/go"
  "$PY" -c 'import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
data = h.pread(65536, 0)
open(sys.argv[2], "rb").read(65536) == data or sys.exit("data differs")
h.shutdown()
print("read ok", flush=True)' "$1" "$img" <"$TMPDIR_TEST/go" >"$TMPDIR_TEST/good.out" 2>&1 &
  GOOD_PID=$!
  exec 7>"$TMPDIR_TEST/go"
  local i
  for ((i = 0; i < 200; i++)); do grep -q connected "$TMPDIR_TEST/good.out" && return; sleep 0.05; done
  cat "$TMPDIR_TEST/good.out" >&2
  fail "the good client did not connect"
}
good_client_finish() {
  echo go >&7
  exec 7>&-
  wait "$GOOD_PID" || { cat "$TMPDIR_TEST/good.out" >&2; fail "the good client failed after the refusals"; }
  rm -f "$TMPDIR_TEST/go"
}

refused() {  # WHAT LOG-PATTERN URI
  if timeout 20 nbdinfo --size "$3" >"$TMPDIR_TEST/bad.out" 2>&1; then fail "$1: was served"; fi
  wait_log "$SERVE_LOG" "$2" || { cat "$SERVE_LOG" >&2; fail "$1: no log line matching '$2'"; }
}

# Raw-socket clients: STARTTLS then stall, or STARTTLS then garbage.
raw_tls_client() {  # MODE SOCKET
  "$PY" - "$@" <<'PY'
import socket, struct, sys, time
mode, path = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
def recvall(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b
recvall(18)
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
magic, opt, typ, ln = struct.unpack(">QIII", recvall(20))
assert typ == 1, hex(typ)
start = time.monotonic()
if mode == "garbage":
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 200)
# Either way the server must close: read until EOF.
# (a reset counts: the server closed with our garbage unread).
s.settimeout(30)
try:
    while s.recv(4096):
        pass
except ConnectionResetError:
    pass
print(f"{time.monotonic() - start:.1f}")
PY
}

# --- X.509 with authz ----------------------------------------------------
start_serve -f raw -e 0 --handshake-timeout 2 \
  --object "tls-creds-x509,id=tls0,endpoint=server,dir=$T/server" \
  --object "authz-simple,id=auth0,identity=${TLS_DN1//,/,,}" --tls-creds tls0 --tls-authz auth0 "$img"
sock=$SERVE_SOCK
good_client_start "nbds+unix:///?socket=$sock&tls-certificates=$T/client1"
refused "plaintext client" "without TLS" "nbd+unix:///?socket=$sock"
refused "no client certificate" "sent no certificate" "nbds+unix:///?socket=$sock&tls-certificates=$T/nocert"
refused "expired client certificate" "expired" "nbds+unix:///?socket=$sock&tls-certificates=$T/expired"
# GnuTLS clients send only a certificate issued by a CA the server names, so
# the one from another CA is not even sent; either way it is refused.
: >"$SERVE_LOG.mark"
refused "certificate from another CA" "TLS refused" "nbds+unix:///?socket=$sock&tls-certificates=$T/otherca"
refused "DN outside authz" "'C=GB,O=qnbd test,CN=client2' not allowed" \
  "nbds+unix:///?socket=$sock&tls-certificates=$T/client2"
took=$(raw_tls_client garbage "$sock") || fail "garbage ClientHello: the client script failed"
wait_log "$SERVE_LOG" "not a TLS ClientHello" || { cat "$SERVE_LOG" >&2; fail "garbage ClientHello not logged"; }
took=$(raw_tls_client stall "$sock") || fail "stalled handshake: the client script failed"
# --handshake-timeout 2 covers the TLS handshake: cut off after ~2 s.
[[ ${took%.*} -ge 1 && ${took%.*} -le 6 ]] || fail "stalled TLS handshake was cut after ${took}s, expected ~2s"
wait_log "$SERVE_LOG" "handshake timed out" || fail "stalled handshake not logged"
good_client_finish
serve_alive || fail "the server died"
stop_serve

# --- PSK --------------------------------------------------------------------
start_serve -f raw -e 0 --object "tls-creds-psk,id=p0,endpoint=server,dir=$T/psk" --tls-creds p0 "$img"
good_client_start "nbds+unix://alice@/?socket=$SERVE_SOCK&tls-psk-file=$T/psk/keys.psk"
refused "wrong PSK" "wrong key for PSK user 'alice'" \
  "nbds+unix://alice@/?socket=$SERVE_SOCK&tls-psk-file=$T/psk-wrong/keys.psk"
sed 's/^alice:/carol:/' "$T/psk/keys.psk" >"$TMPDIR_TEST/carol.psk"
refused "unknown PSK user" "unknown PSK username 'carol'" \
  "nbds+unix://carol@/?socket=$SERVE_SOCK&tls-psk-file=$TMPDIR_TEST/carol.psk"
good_client_finish
stop_serve

# --- bad credential directories fail at start, one line each -------------
bad_creds() {  # WHAT PATTERN DIR [KIND]
  local kind=${4:-tls-creds-x509}
  if "$QNBD" serve -k "$TMPDIR_TEST/never.sock" -f raw --object "$kind,id=b,endpoint=server,dir=$3" \
    --tls-creds b "$img" 2>"$TMPDIR_TEST/start.err"; then
    fail "$1: qnbd serve started"
  fi
  grep -q -- "$2" "$TMPDIR_TEST/start.err" || { cat "$TMPDIR_TEST/start.err" >&2; fail "$1: message lacks '$2'"; }
  [[ $(grep -c . "$TMPDIR_TEST/start.err") == 1 ]] || { cat "$TMPDIR_TEST/start.err" >&2; fail "$1: not one line"; }
}
b=$TMPDIR_TEST/bad
mkdir -p "$b"/{nokey,mismatch,expired,notpem,psknone}
cp "$T/server/"*.pem "$b/nokey/" && rm "$b/nokey/server-key.pem"
cp "$T/server/"*.pem "$b/mismatch/" && cp "$T/client1/client-key.pem" "$b/mismatch/server-key.pem"
cp "$T/server/ca-cert.pem" "$b/expired/" && cp "$T/expired/client-cert.pem" "$b/expired/server-cert.pem" &&
  cp "$T/expired/client-key.pem" "$b/expired/server-key.pem"
cp "$T/server/"*.pem "$b/notpem/" && echo "not a key" >"$b/notpem/server-key.pem"
echo "alice:xyz" >"$b/psknone/keys.psk"
bad_creds "missing dir" "No such file or directory" "$TMPDIR_TEST/absent"
bad_creds "missing key" "server-key.pem: No such file or directory" "$b/nokey"
bad_creds "key not matching the certificate" "server-key.pem does not match" "$b/mismatch"
bad_creds "expired server certificate" "certificate expired on 2020-01-01" "$b/expired"
bad_creds "unreadable key" "server-key.pem" "$b/notpem"
bad_creds "malformed keys.psk" "keys.psk line 1" "$b/psknone" tls-creds-psk
# Unused credentials objects are accepted (as qemu-nbd does); a bad one is not.
NOPERSIST=1 start_serve -f raw --object "tls-creds-psk,id=unused,endpoint=server,dir=$T/psk" "$img"
expect_eq "$(nbdinfo --size "$SERVE_URI")" 1048576 "plaintext with an unused --object"
stop_serve
if "$QNBD" serve -k "$TMPDIR_TEST/never.sock" -f raw --object "tls-creds-x509,id=x,dir=$T/server,bogus=1" "$img" \
  2>"$TMPDIR_TEST/start.err"; then fail "an --object with an unknown property was accepted"; fi
grep -q "unsupported property 'bogus'" "$TMPDIR_TEST/start.err" || fail "unknown --object property: wrong message"
echo "ok"
