#!/usr/bin/env bash
# Process lifecycle of qnbd serve: exit after the last client without -t
# (like qemu-nbd), TCP listener, --fork + --pid-file, the --shared cap,
# the handshake timeout, SIGTERM with requests in flight, systemd socket
# activation, --poll-max-ns refusals.
source "$(dirname "$0")/lib-serve.sh"
requires nbdinfo nbdcopy python3 timeout

img=$TMPDIR_TEST/disk.img
head -c 8M /dev/urandom >"$img"

# 1. Without --persistent the server exits 0 once its only client leaves.
NOPERSIST=1 start_serve -f raw "$img"
nbdinfo "$SERVE_URI" >/dev/null
status=0
timeout 10 tail --pid="$SERVE_PID" -f /dev/null || fail "server still running after last client left"
wait "$SERVE_PID" || status=$?
expect_eq "$status" 0 "exit status after last client"
SERVE_PID=

# 1b. A SIGTERM that lands while such a server is already ending on its own
# (closing images, removing its pid file) asks for what is happening: the
# exit status stays 0, wherever in that sequence it lands (it used to be
# 1, or 143, when it came after the io threads had stopped).
for i in $(seq 1 25); do
  NOPERSIST=1 start_serve -f raw "$img"
  nbdinfo --size "$SERVE_URI" >/dev/null
  kill -TERM "$SERVE_PID" 2>/dev/null || true
  status=0
  wait "$SERVE_PID" || status=$?
  expect_eq "$status" 0 "exit status with SIGTERM during the exit after the last client (round $i)"
  SERVE_PID=
done

# 2. TCP on 127.0.0.1 with a free port; --fork returns once listening.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pidfile=$TMPDIR_TEST/fork.pid
"$QNBD" serve --fork --pid-file "$pidfile" -t -p "$port" -b 127.0.0.1 -f raw "$img" || fail "--fork failed"
[[ -s $pidfile ]] || fail "--fork returned before the pid file existed"
fpid=$(cat "$pidfile")
cleanup_fn "kill -9 $fpid 2>/dev/null"
nbdcopy "nbd://127.0.0.1:$port" "$TMPDIR_TEST/tcp.img"
cmp "$img" "$TMPDIR_TEST/tcp.img" || fail "TCP copy differs"
kill -TERM "$fpid"
for _ in $(seq 100); do kill -0 "$fpid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$fpid" 2>/dev/null && fail "forked server ignored SIGTERM"
[[ -e $pidfile ]] && fail "pid file left behind"

# 3. --shared 1: a second client waits until the first leaves; handshake timeout drops idle clients.
start_serve -f raw -e 1 --handshake-timeout 1 "$img"
python3 - "$SERVE_SOCK" <<'PY' || fail "shared/timeout checks"
import socket, struct, sys, time
a = socket.socket(socket.AF_UNIX); a.connect(sys.argv[1])
assert len(a.recv(18)) == 18
b = socket.socket(socket.AF_UNIX); b.connect(sys.argv[1]); b.settimeout(0.5)
try:
    b.recv(18); raise AssertionError("second client served while the first is connected")
except socket.timeout:
    pass
# The idle first client is dropped by the handshake timeout; then b gets its greeting.
a.settimeout(5)
assert a.recv(100) == b"", "idle client not dropped"
b.settimeout(5)
assert len(b.recv(18)) == 18, "second client not served after the first left"
PY
stop_serve

# 4. SIGTERM while requests are in flight: they complete, exit status 0.
start_serve -f raw -e 0 "$img"
python3 - "$SERVE_SOCK" "$SERVE_PID" <<'PY' || fail "SIGTERM with requests in flight"
import os, signal, socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(18); s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
while True:
    magic, opt, typ, ln = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL)); s.recv(ln, socket.MSG_WAITALL) if ln else None
    if typ == 1: break
reqs = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, i * 65536, 65536) for i in range(16))
s.sendall(reqs)
got = done = 0
signalled = False
while got < 16:
    if got == 1 and not signalled:
        # Signal only once the server is provably serving this batch (a
        # signal that wins the race may refuse all 16, which is legal but
        # proves nothing about finishing in-flight work).
        os.kill(int(sys.argv[2]), signal.SIGTERM)
        signalled = True
    hdr = s.recv(16, socket.MSG_WAITALL)
    assert len(hdr) == 16, "connection closed with %d replies" % got
    magic, err, ck = struct.unpack(">IIQ", hdr)
    # Requests read before the signal complete; later ones may get NBD_ESHUTDOWN.
    assert err in (0, 108), err
    if err == 0:
        assert len(s.recv(65536, socket.MSG_WAITALL)) == 65536
        done += 1
    got += 1
s.settimeout(10)
assert s.recv(1) == b"", "server did not close after finishing"
assert done >= 1, "no request completed"
PY
status=0; wait "$SERVE_PID" || status=$?
expect_eq "$status" 0 "exit status after SIGTERM"
SERVE_PID=

# 5. systemd socket activation: the inherited listener is used.
if command -v systemd-socket-activate >/dev/null; then
  sock=$TMPDIR_TEST/activated.sock
  systemd-socket-activate -l "$sock" "$QNBD" serve -t -f raw "$img" 2>"$TMPDIR_TEST/sd.log" &
  sdpid=$!
  cleanup_fn "kill -9 $sdpid 2>/dev/null"
  wait_ready -S "$sock" $sdpid || fail "systemd-socket-activate did not listen"
  nbdcopy "nbd+unix:///?socket=$sock" "$TMPDIR_TEST/sd.img" || { cat "$TMPDIR_TEST/sd.log"; fail "socket activation"; }
  cmp "$img" "$TMPDIR_TEST/sd.img" || fail "socket-activated copy differs"
  kill -TERM $sdpid; wait $sdpid || true
fi

# 6. --poll-max-ns: a value out of range or not a number is refused with a
# one-line error before anything listens; 0 (no polling) serves.
for bad in 1000001 -5 abc; do
  run_checked 10 "$QNBD" serve -f raw --poll-max-ns "$bad" -k "$TMPDIR_TEST/poll.sock" "$img"
  [[ $RUN_KIND == error ]] || fail "--poll-max-ns $bad: $RUN_KIND $RUN_STATUS"
  grep -q -- "--poll-max-ns" "$RUN_STDERR" || fail "--poll-max-ns $bad: the error does not name it: $(cat "$RUN_STDERR")"
  [[ ! -e $TMPDIR_TEST/poll.sock ]] || fail "--poll-max-ns $bad: the server listened"
done
start_serve -f raw --poll-max-ns 0 "$img"
nbdcopy "$SERVE_URI" "$TMPDIR_TEST/poll0.img" || fail "nbdcopy from a server with --poll-max-ns 0"
cmp "$img" "$TMPDIR_TEST/poll0.img" || fail "copy with --poll-max-ns 0 differs"
stop_serve
echo PASS
