#!/usr/bin/env bash
# A READ reply goes out in one sendmsg when the socket can hold it. Two
# things cut replies into pieces before: asio::async_write's default
# condition hands the kernel at most 64 KiB per sendmsg (four calls for a
# 256 KiB reply, sixteen for 1 MiB), and a Unix socket's default send buffer
# (net.core.wmem_default, 208 KiB) holds less than one 256 KiB reply, so the
# rest waited for the client to drain it. Each extra piece is a syscall and
# a readiness wait; together they held nbdcopy's sequential read of a qcow2
# to about 2.3 GB/s here (3.5 GB/s after).
#
# Without timing anything: serve a raw file under strace, read it 256 KiB at
# a time with one request in flight (so the socket is empty whenever a reply
# is sent), check the bytes, and count the server's send calls: one per
# READ plus the handshake's, not two or more per READ.
source "$(dirname "$0")/functions.sh"
requires_qnbd
requires strace
requires_python_nbd

if ! strace -f -qq -o /dev/null true 2>/dev/null; then
  echo "SKIP: $0: strace cannot trace here (ptrace not permitted)"
  exit 77
fi

READS=64
LEN=$((256 << 10))
# Handshake replies (each option's reply, the export info) and the
# disconnect: far fewer than READS.
HANDSHAKE_SENDS=32

img=$TMPDIR_TEST/disk.raw
"$PY" - "$img" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.write(os.urandom(16 << 20))
PY

trace=$TMPDIR_TEST/trace.txt sock=$TMPDIR_TEST/s.sock pidfile=$TMPDIR_TEST/s.pid
# LeakSanitizer cannot run under ptrace (see test-serve-raw-tmpfs-probes.sh).
start_server "$pidfile" strace -f -qq --seccomp-bpf -e trace=sendmsg,sendto,sendmmsg,write,writev -o "$trace" \
  env ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" "$QNBD" serve -r -f raw -k "$sock" \
  --pid-file "$pidfile" "$img" || fail "server did not start"
strace_pid=$SERVER_PID
qnbd_pid=$(cat "$pidfile")

"$PY" - "nbd+unix:///?socket=$sock" "$img" "$READS" "$LEN" <<'PY' || fail "reads"
import random, sys
import nbd
uri, path, reads, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(7)
with open(path, "rb") as f:
    for _ in range(reads):
        off = rng.randrange(size // length) * length
        got = h.pread(length, off)
        f.seek(off)
        assert got == f.read(length), f"data differs at {off}"
h.shutdown()
PY

# Without -t qnbd exits once the client has gone; strace exits with it.
for ((i = 0; i < 200; i++)); do
  kill -0 "$qnbd_pid" 2>/dev/null || break
  sleep 0.05
done
kill -TERM "$qnbd_pid" 2>/dev/null || true
wait "$strace_pid" || fail "qnbd serve (under strace) exited with status $?"
unset "_live_servers[$strace_pid]"

sends=$(grep -cE '^[0-9]+ +(sendmsg|sendto|sendmmsg|writev?)\(' "$trace" || true)
echo "$sends send calls for $READS READs of $LEN bytes (at most $((READS + HANDSHAKE_SENDS)))"
((sends >= READS)) || fail "only $sends send calls for $READS READs: the trace missed the replies"
((sends <= READS + HANDSHAKE_SENDS)) ||
  fail "$sends send calls for $READS READs of $LEN bytes: replies are cut into pieces"
echo PASS
