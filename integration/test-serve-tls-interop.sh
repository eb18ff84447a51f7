#!/usr/bin/env bash
# TLS interop: qnbd serve with qemu-nbd's --object tls-creds-x509 /
# tls-creds-psk spelling, reached by libnbd (nbdinfo, nbdcopy, nbdsh with
# nbds:// and nbds+unix:// URIs), qemu-img and qemu-io (--object ...
# endpoint=client), and nbd-client -l. Data written through TLS is read back
# through TLS and compared with the image file. A JSON config serves a TLS TCP
# listener beside a plaintext Unix socket.
source "$(dirname "$0")/lib-serve.sh"
source "$(dirname "$0")/lib-tls.sh"
tls_test_setup nbdinfo nbdcopy qemu-img qemu-io

img=$TMPDIR_TEST/disk.img
head -c 4M /dev/urandom >"$img"
truncate -s 8M "$img"

# --- X.509, Unix socket: nbdinfo, nbdcopy, qemu-img, qemu-io -------------
start_serve -v -f raw --object "tls-creds-x509,id=tls0,endpoint=server,dir=$T/server,verify-peer=on" \
  --tls-creds tls0 "$img"
sock=$SERVE_SOCK
u="nbds+unix:///?socket=$sock&tls-certificates=$T/client1"
expect_eq "$(nbdinfo --size "$u")" 8388608 "nbdinfo --size over TLS"
# Plain nbd+unix:// is refused (TLS_REQD), so the size above really came over TLS.
nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && fail "a plaintext client was served on a TLS listener"
wait_log "$SERVE_LOG" "without TLS" || fail "the plaintext refusal was not logged"

nbdcopy "$u" "$TMPDIR_TEST/copy.img"
cmp "$img" "$TMPDIR_TEST/copy.img" || fail "nbdcopy over TLS read different data"
# -v logs each session's peer and what was negotiated (protocol, key
# exchange, signature, cipher), so an operator sees what a client got.
grep -Eq "TLS up, peer x509 '[^']*CN=client1[^']*', \(TLS1\.[23]\)-\(.*\)-\((AES|CHACHA20)[-A-Z0-9]*\)" "$SERVE_LOG" ||
  fail "the TLS session's peer and cipher were not logged: $(grep 'TLS up' "$SERVE_LOG")"

xo="tls-creds-x509,id=c0,endpoint=client,dir=$T/client1"
qopts="driver=nbd,server.type=unix,server.path=$sock,tls-creds=c0,tls-hostname=localhost"
qemu-io --object "$xo" --image-opts "$qopts" -c 'write -P 0xab 1M 64k' >/dev/null ||
  fail "qemu-io write over TLS failed"
qemu-io --object "$xo" --image-opts "$qopts" -c 'read -P 0xab 1M 64k' | grep -q 'read 65536/65536' ||
  fail "qemu-io read-back over TLS failed"
cmp <(head -c $((1024 * 1024 + 65536)) "$img" | tail -c 65536) <(head -c 65536 /dev/zero | tr '\0' '\253') ||
  fail "the qemu-io write did not reach the image"
qemu-img convert --object "$xo" --image-opts "$qopts" -O raw "$TMPDIR_TEST/qemu.img" ||
  fail "qemu-img convert over TLS failed"
cmp "$img" "$TMPDIR_TEST/qemu.img" || fail "qemu-img convert over TLS read different data"
stop_serve

# --- X.509, TCP 127.0.0.1: nbds://localhost with the host name checked ------
port=$(free_port)
serve_tls_tcp "$port" -f raw "$img"
tcp_pid=$SRV_PID
tu="nbds://localhost:$port/?tls-certificates=$T/client2&tls-verify-peer=true"
# python3-libnbd (what nbdsh runs): nbdsh -u refuses tls-certificates= in a URI.
got=$("$PY" -c 'import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
sys.stdout.buffer.write(h.pread(65536, 2 * 1024 * 1024))' "$tu" | od -An -tx1 | md5sum)
want=$(head -c $((2 * 1024 * 1024 + 65536)) "$img" | tail -c 65536 | od -An -tx1 | md5sum)
expect_eq "$got" "$want" "nbdsh pread over nbds://localhost"
# nbd-client -l with its TLS options, where Debian's build has them (3.24's
# help lists them, but bookworm's binary is built without GnuTLS and
# rejects -F: then this part is skipped, and says so).
if nbd-client -l 127.0.0.1 "$port" -x -A "$T/client1/ca-cert.pem" -F "$T/client1/client-cert.pem" \
  -K "$T/client1/client-key.pem" -H localhost >"$TMPDIR_TEST/nbd-client.out" 2>&1; then
  grep -qx '' "$TMPDIR_TEST/nbd-client.out" || fail "nbd-client -l over TLS did not list the default export"
elif grep -q "unrecognized option" "$TMPDIR_TEST/nbd-client.out"; then
  echo "note: nbd-client has no TLS support in this build; its check is skipped"
else
  cat "$TMPDIR_TEST/nbd-client.out" >&2
  fail "nbd-client -l over TLS failed"
fi
kill -TERM "$tcp_pid"
wait "$tcp_pid" || fail "TCP TLS server exited with $?"

# --- PSK: libnbd (user in the URI) and qemu-io (username=) -----------------
start_serve -f raw --object "tls-creds-psk,id=p0,endpoint=server,dir=$T/psk" --tls-creds p0 "$img"
pu="nbds+unix://alice@/?socket=$SERVE_SOCK&tls-psk-file=$T/psk/keys.psk"
expect_eq "$(nbdinfo --size "$pu")" 8388608 "nbdinfo --size over TLS-PSK"
nbdcopy "$pu" "$TMPDIR_TEST/psk-copy.img"
cmp "$img" "$TMPDIR_TEST/psk-copy.img" || fail "nbdcopy over TLS-PSK read different data"
qemu-io --object "tls-creds-psk,id=k0,endpoint=client,dir=$T/psk,username=bob" \
  --image-opts "driver=nbd,server.type=unix,server.path=$SERVE_SOCK,tls-creds=k0" \
  -c 'read -P 0xab 1M 64k' | grep -q 'read 65536/65536' || fail "qemu-io over TLS-PSK failed"
stop_serve

# --- JSON config: TLS TCP listener beside a plaintext Unix socket ----------
port=$(free_port)
cat >"$TMPDIR_TEST/tls.json" <<EOF
{
  "exports": [ { "name": "d", "image": "$img", "format": "raw" } ],
  "listeners": [
    { "type": "tcp", "host": "127.0.0.1", "port": $port,
      "tls": { "creds": "x509", "dir": "$T/server", "authz": ["CN=client1,O=qnbd test,C=GB"] } },
    { "type": "unix", "path": "$TMPDIR_TEST/plain.sock" }
  ]
}
EOF
"$QNBD" serve --config "$TMPDIR_TEST/tls.json" --pid-file "$TMPDIR_TEST/cfg.pid" 2>"$TMPDIR_TEST/cfg.log" &
cfg_pid=$!
cleanup_fn "kill -9 $cfg_pid 2>/dev/null"
for ((i = 0; i < 200; i++)); do [[ -s $TMPDIR_TEST/cfg.pid ]] && break; sleep 0.05; done
expect_eq "$(nbdinfo --size "nbd+unix:///d?socket=$TMPDIR_TEST/plain.sock")" 8388608 "plaintext Unix listener"
expect_eq "$(nbdinfo --size "nbds://localhost:$port/d?tls-certificates=$T/client1")" 8388608 \
  "TLS TCP listener, authorised DN"
nbdinfo --size "nbd://127.0.0.1:$port/d" >/dev/null 2>&1 && fail "plaintext served on the config's TLS listener"
nbdinfo --size "nbds://localhost:$port/d?tls-certificates=$T/client2" >/dev/null 2>&1 &&
  fail "client2's DN is not in the config's authz list but was served"
wait_log "$TMPDIR_TEST/cfg.log" "not allowed by authz" || fail "the authz refusal was not logged"
kill -TERM "$cfg_pid"
wait "$cfg_pid" || fail "config server exited with $?"
echo "ok"
