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
# is sent), check the bytes, and count the server's large send calls: one per
# READ, not two or more.
source "$(dirname "$0")/functions.sh"
requires_qnbd
requires_strace
requires_python_nbd

READS=64
LEN=$((256 << 10))
# Only calls that carried at least 4 KiB are counted: the handshake's
# replies are smaller, and so are the writes a sanitizer build or the io
# threads' wake-ups make to other descriptors. A reply cut at 64 KiB, or
# split by a full socket buffer, shows as two or more such calls.
BIG=4096
SLACK=4

img=$TMPDIR_TEST/disk.raw
"$PY" - "$img" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.write(os.urandom(16 << 20))
PY

trace=$TMPDIR_TEST/trace.txt sock=$TMPDIR_TEST/s.sock pidfile=$TMPDIR_TEST/s.pid
start_traced_server "$pidfile" "$trace" sendmsg,sendto,sendmmsg,write,writev,splice \
  "$QNBD" serve -r -f raw -k "$sock" --pid-file "$pidfile" "$img" || fail "server did not start"

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

end_traced_server

# A zero-copy READ (test-serve-zero-copy-reads.sh) sends its header with
# sendmsg (under 4 KiB) and its payload with a splice from the pipe
# (splice(PIPE, NULL, SOCKET, ...)): that splice is its one large send.
sends=$(awk -v big=$BIG '/^[0-9]+ +((sendmsg|sendto|sendmmsg|writev?)\(|splice\([0-9]+, NULL,)/ { if ($NF + 0 >= big) n++ } END { print n + 0 }' "$trace")
echo "$sends send calls of $BIG bytes or more for $READS READs of $LEN bytes (at most $((READS + SLACK)))"
((sends >= READS)) || fail "only $sends large send calls for $READS READs: the trace missed the replies"
((sends <= READS + SLACK)) ||
  fail "$sends large send calls for $READS READs of $LEN bytes: replies are cut into pieces"

# Replies the socket cannot take at once: 2 MiB READs (run inline, sent by
# the reader itself first) pile up while the client stops reading for a
# while; whatever the first sendmsg left goes out from the writer, from the
# exact byte where it stopped. Every reply must arrive whole and right.
sock2=$TMPDIR_TEST/s2.sock pidfile2=$TMPDIR_TEST/s2.pid
start_server "$pidfile2" "$QNBD" serve -r -f raw -k "$sock2" --pid-file "$pidfile2" "$img" ||
  fail "second server did not start"
"$PY" - "nbd+unix:///?socket=$sock2" "$img" <<'PY' || fail "2 MiB READs with a client that pauses"
import random, sys, time
import nbd
uri, path = sys.argv[1], sys.argv[2]
src = open(path, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
length = 2 << 20
rng = random.Random(3)
pending = []
for i in range(48):
    off = rng.randrange(len(src) // 4096 - length // 4096) * 4096  # unaligned to the length
    buf = nbd.Buffer(length)
    pending.append((h.aio_pread(buf, off), buf, off))
    if i % 8 == 7:
        time.sleep(0.05)  # not reading: the server's socket fills up
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie, buf, off in pending:
    assert h.aio_command_completed(cookie)
    assert buf.to_bytearray() == src[off:off + length], f"READ at {off} differs"
h.shutdown()
PY
echo PASS
