#!/usr/bin/env bash
# Zero-copy READs: where a device lends its host file (a raw file, a qcow2
# image opened read-only), an inline READ's payload goes from the page
# cache into the connection's pipe and from there to the socket (splice),
# instead of pread into a buffer and sendmsg out of it. What can go wrong
# there is ordering and bookkeeping, so every case checks bytes against
# what qemu-img says the image holds:
#   1. a read-only qcow2 with a backing file, clusters written out of order
#      (so runs of guest data are scattered in the file), zero and
#      compressed clusters, read with many concurrent READs of mixed sizes
#      (spliced, copied, pooled, and ones the full pipe cuts in two), over a
#      Unix socket; under strace, which must show splice from the image
#      file (the test fails if zero-copy is not used);
#   2. a writable raw file over TCP: reads after writes see the writes, and
#      a file that shrinks under the server reads as zeroes past its end;
#   3. a READ that fails after part of it went into the pipe (a damaged
#      compressed cluster behind a data cluster): EIO, and the pages it left
#      in the pipe must not reach the next reply;
#   4. splice refused (a kernel or sandbox that does not splice into the
#      socket, or out of the file system): the same READs, copied instead.
source "$(dirname "$0")/functions.sh"
requires_qnbd
requires_strace
requires_python_nbd
requires qemu-img qemu-io

d=$TMPDIR_TEST

# --- 1. read-only qcow2 with a backing file ---------------------------------
"$PY" - "$d" <<'PY'
import os, random, sys
d = sys.argv[1]
rng = random.Random(11)
open(f"{d}/base.raw", "wb").write(rng.randbytes(32 << 20))
for i in range(4):
    open(f"{d}/pat{i}", "wb").write(rng.randbytes(64 << 10))
PY
qemu-img create -q -f qcow2 -o cluster_size=65536 -b "$d/base.raw" -F raw "$d/top.qcow2" 32M
cmds=()
# Clusters of [4 MiB, 12 MiB) in a shuffled order: consecutive guest
# clusters land in non-consecutive host clusters, with some runs in order.
mapfile -t order < <("$PY" -c 'import random; r = random.Random(5); c = list(range(64, 192)); r.shuffle(c); print("\n".join(map(str, c)))')
for c in "${order[@]}"; do cmds+=(-c "write -q -s $d/pat$((c % 4)) $((c * 65536)) 64k"); done
cmds+=(-c "write -q -s $d/pat1 13M 3M")                  # one contiguous run of 3 MiB
cmds+=(-c "write -q -z 17M 1M" -c "write -q -z 18M 100k") # zero clusters (and a partial one)
cmds+=(-c "write -q -c -P 0x5a 20M 64k" -c "write -q -c -P 0xa5 20544k 64k")
qemu-io -f qcow2 "${cmds[@]}" "$d/top.qcow2" || fail "qemu-io could not build the image"
qemu-img convert -f qcow2 -O raw "$d/top.qcow2" "$d/truth.raw" || fail "qemu-img convert"

trace=$d/trace.txt sock=$d/s.sock pidfile=$d/s.pid
cat >"$d/reads.py" <<'PY'
import random, sys
import nbd
uri, truth = sys.argv[1], open(sys.argv[2], "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_size() == len(truth)
rng = random.Random(17)
# Sizes: small (copied), 64 KiB - 2 MiB (inline, spliced where the pipe has
# room), above 2 MiB (the pool), and odd lengths at odd offsets.
sizes = [512, 4096, 65536, 65536 + 4095, 256 << 10, 1 << 20, (1 << 20) + 777, 2 << 20, 3 << 20, 5 << 20]
for rnd in range(6):
    pending = []
    for i in range(64):
        n = rng.choice(sizes)
        off = rng.randrange(len(truth) - n)
        if rng.random() < 0.5:
            off -= off % 512
        buf = nbd.Buffer(n)
        pending.append((h.aio_pread(buf, off), buf, off, n))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, buf, off, n in pending:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == truth[off:off + n], f"READ {off}+{n} differs"
# The whole image in order, 1 MiB at a time (full pipe, then the socket).
for off in range(0, len(truth), 1 << 20):
    assert h.pread(1 << 20, off) == truth[off:off + (1 << 20)], f"sequential READ at {off} differs"
h.shutdown()
PY
start_traced_server "$pidfile" "$trace" splice \
  "$QNBD" serve -r -f qcow2 -k "$sock" --pid-file "$pidfile" "$d/top.qcow2" || fail "server did not start"
"$PY" "$d/reads.py" "nbd+unix:///?socket=$sock" "$d/truth.raw" || fail "concurrent READs of the read-only qcow2"
end_traced_server
# splice(IMAGE_FD, [OFFSET], PIPE_FD, NULL, ...) = N: pages from the image.
from_file=$(grep -cE '^[0-9]+ +splice\([0-9]+, \[[0-9]+\], [0-9]+, NULL, .* = [1-9]' "$trace" || true)
to_socket=$(grep -cE '^[0-9]+ +splice\([0-9]+, NULL, [0-9]+, NULL, .* = [1-9]' "$trace" || true)
echo "read-only qcow2: $from_file splices from the image file, $to_socket from the pipe to the socket"
((from_file > 0 && to_socket > 0)) || fail "READs of a read-only qcow2 were not spliced"

# A writable qcow2 never lends its clusters (one freed and reused between
# the splice and the client's receive would send another offset's bytes).
cp "$d/top.qcow2" "$d/rw.qcow2"
trace2=$d/trace2.txt sock2=$d/s2.sock pidfile2=$d/s2.pid
start_traced_server "$pidfile2" "$trace2" splice \
  "$QNBD" serve -f qcow2 -k "$sock2" --pid-file "$pidfile2" "$d/rw.qcow2" || fail "server did not start"
"$PY" - "nbd+unix:///?socket=$sock2" "$d/truth.raw" <<'PY' || fail "READs of the writable qcow2"
import sys
import nbd
uri, truth = sys.argv[1], open(sys.argv[2], "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
for off in range(0, len(truth), 1 << 20):
    assert h.pread(1 << 20, off) == truth[off:off + (1 << 20)], f"READ at {off} differs"
h.shutdown()
PY
end_traced_server
n=$(grep -cE 'splice\(' "$trace2" || true)
((n == 0)) || fail "a writable qcow2's READs were spliced ($n splice calls)"

# --- 2. writable raw over TCP ------------------------------------------------
cp "$d/base.raw" "$d/rw.raw"
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pidfile3=$d/s3.pid
start_server "$pidfile3" "$QNBD" serve -f raw -b 127.0.0.1 -p "$port" -t --pid-file "$pidfile3" "$d/rw.raw" ||
  fail "TCP server did not start"
tcp_server=$SERVER_PID
"$PY" - "nbd://127.0.0.1:$port/" "$d/rw.raw" <<'PY' || fail "writes then reads of a writable raw file"
import os, random, sys
import nbd
uri, path = sys.argv[1], sys.argv[2]
model = bytearray(open(path, "rb").read())
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(23)
for i in range(200):
    n = rng.choice([4096, 65536, 300000, 1 << 20])
    off = rng.randrange(len(model) - n)
    if rng.random() < 0.5:
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    else:
        assert h.pread(n, off) == model[off:off + n], f"READ {off}+{n} after writes differs"
# The file shrinks under the server: bytes past its new end read as zeroes.
h.flush()
cut = len(model) - (3 << 20) + 12345
os.truncate(path, cut)
model[cut:] = bytes(len(model) - cut)
for off in range(len(model) - (4 << 20), len(model), 1 << 20):
    assert h.pread(1 << 20, off) == model[off:off + (1 << 20)], f"READ at {off} across the shrunk end differs"
h.shutdown()
PY
stop_server "$tcp_server"

# --- 3. a READ that fails after part of it was spliced -----------------------
"$PY" - "$d" <<'PY'
import random, sys
d = sys.argv[1]
rng = random.Random(29)
open(f"{d}/c0", "wb").write(rng.randbytes(128 << 10))
open(f"{d}/c1", "wb").write(rng.randbytes(128 << 10))
PY
qemu-img create -q -f qcow2 -o cluster_size=65536 "$d/bad.qcow2" 1M
qemu-io -f qcow2 -c "write -q -s $d/c0 0 128k" -c "write -q -c -P 0x5a 128k 64k" \
  -c "write -q -s $d/c1 256k 128k" "$d/bad.qcow2" || fail "qemu-io could not build the damaged image"
# Damage the compressed cluster's deflate stream (qcow2.txt "Compressed
# Clusters Descriptor": host offset in the low 62 - (cluster_bits - 8) bits).
"$PY" - "$d/bad.qcow2" <<'PY' || fail "could not damage the compressed cluster"
import struct, sys
f = open(sys.argv[1], "r+b")
hdr = f.read(48)
cluster_bits = struct.unpack(">I", hdr[20:24])[0]
l1 = struct.unpack(">Q", hdr[40:48])[0]
f.seek(l1)
l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2 + 8 * 2)
entry = struct.unpack(">Q", f.read(8))[0]
assert entry & (1 << 62), "cluster 2 is not compressed"
host = entry & ((1 << (62 - (cluster_bits - 8))) - 1)
f.seek(host)
f.write(b"\xff" * 64)
PY
sock4=$d/s4.sock pidfile4=$d/s4.pid
start_server "$pidfile4" "$QNBD" serve -r -f qcow2 -t -k "$sock4" --pid-file "$pidfile4" "$d/bad.qcow2" ||
  fail "server did not start"
bad_server=$SERVER_PID
"$PY" - "nbd+unix:///?socket=$sock4" "$d/c0" "$d/c1" <<'PY' || fail "a failed spliced READ leaked into the next reply"
import sys
import nbd
uri, c0, c1 = sys.argv[1], open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
for i in range(3):
    try:
        h.pread(192 << 10, 0)  # 128 KiB of data (spliced), then the damaged cluster
        raise AssertionError("READ over the damaged compressed cluster succeeded")
    except nbd.Error as e:
        assert e.errno == "EIO", f"expected EIO, got {e.errno}"
    # Another offset's data: the failed READ's pages must not come first.
    assert h.pread(128 << 10, 256 << 10) == c1, "READ after the failed one returned other bytes"
    assert h.pread(64 << 10, 64 << 10) == c0[64 << 10:], "READ of cluster 1 differs"
h.shutdown()
PY
stop_server "$bad_server"

# --- 4. splice refused -------------------------------------------------------
# Where the kernel or a sandbox will not splice into a socket, or out of
# the image's file system, splice fails (EINVAL): the same READs as in 1
# must come back whole and in order, by copying, on the same connection
# (pages already in the pipe included). A shim makes splice refuse and
# counts the refusals, so the case cannot pass without meeting one.
requires cc
cc -shared -fPIC -O2 -o "$d/refuse.so" "$INTEGRATION_DIR/splice_refuse_shim.c" -ldl ||
  fail "cannot build the splice shim"
for refuse in socket file; do
  what="into the socket"
  [[ $refuse == file ]] && what="out of the image file"
  log=$d/refusals.$refuse sock5=$d/s5.$refuse.sock pidfile5=$d/s5.$refuse.pid
  start_server "$pidfile5" env LD_PRELOAD="$d/refuse.so" QNBD_SPLICE_REFUSE=$refuse QNBD_SPLICE_LOG="$log" \
    ASAN_OPTIONS="$ASAN_OPTIONS:verify_asan_link_order=0" \
    "$QNBD" serve -r -f qcow2 -t -k "$sock5" --pid-file "$pidfile5" "$d/top.qcow2" || fail "server did not start"
  refusing_server=$SERVER_PID
  "$PY" "$d/reads.py" "nbd+unix:///?socket=$sock5" "$d/truth.raw" ||
    fail "READs with splice $what refused"
  # And a second connection, which finds splicing off from its start or
  # meets the refusal itself.
  "$PY" "$d/reads.py" "nbd+unix:///?socket=$sock5" "$d/truth.raw" ||
    fail "READs of a second connection with splice $what refused"
  stop_server "$refusing_server"
  refusals=$(stat -c %s "$log" 2>/dev/null || echo 0)
  echo "splice $what refused: $refusals refusals met, every READ right"
  ((refusals > 0)) || fail "the shim refused no splice $what: the case tested nothing"
done
echo PASS
