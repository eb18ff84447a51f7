#!/usr/bin/env bash
# Extended headers beyond 32 bits: an 8 GiB sparse qcow2 with data at 5 GiB
# and a dirty bitmap, served writable with -A -B. A raw-socket client
# negotiates NBD_OPT_EXTENDED_HEADERS, writes and reads past 4 GiB, and asks
# BLOCK_STATUS for the whole disk in one request (a 64-bit length):
# base:allocation, qemu:allocation-depth and qemu:dirty-bitmap:b0 each cover
# all 8 GiB with extents matching the layout (`qemu-img map` and the writes
# made), some of them longer than 4 GiB. Afterwards qemu-img check is clean
# and qemu-io reads the bytes written.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io python3
requires_qnbd

img=$TMPDIR_TEST/big.qcow2
qemu-img create -q -f qcow2 "$img" 8G
qemu-io -f qcow2 -c 'write -P 0x11 5G 64k' "$img" >/dev/null
qemu-img bitmap --add "$img" b0
qemu-io -f qcow2 -c 'write -P 0x22 0 4k' -c 'write -P 0x33 6G 128k' "$img" >/dev/null
start_serve -f qcow2 -A -B b0 "$img"

PYTHONPATH=$INTEGRATION_DIR python3 - "$SERVE_SOCK" <<'PY' || fail "extended headers past 4 GiB"
import struct, sys
import nbdwire
from nbdwire import chunks, extents, send
G = 1 << 30
s, ids, tflags, size = nbdwire.connect(
    sys.argv[1], True, [b"base:allocation", b"qemu:allocation-depth", b"qemu:dirty-bitmap:b0"])
assert size == 8 * G, size
assert set(ids) == {"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"}, ids
assert not tflags & 2, "exported read-only"

# WRITE past 4 GiB (64-bit offset), then READ it back with DF.
off = 5 * G + 4096
send(s, True, 1, off, 5, payload=b"hello", cookie=1)
assert chunks(s, True, cookie=1, off=off) == [(0, b"")]
send(s, True, 0, off - 4, 13, flags=4, cookie=2)
c = chunks(s, True, cookie=2, off=off - 4)
assert len(c) == 1 and c[0][0] == 1, c
assert c[0][1][8:] == b"\x11" * 4 + b"hello" + b"\x11" * 4, c[0][1][8:]

# One BLOCK_STATUS for the whole 8 GiB: the length field is 64-bit.
send(s, True, 7, 0, 8 * G, cookie=3)
got = {}
for typ, data in chunks(s, True, cookie=3, off=0):
    assert typ == 6, typ  # NBD_REPLY_TYPE_BLOCK_STATUS_EXT
    cid, ex = extents(True, data)
    got[cid] = ex
def runs(ex):
    out, pos = [], 0
    for ln, fl in ex:
        out.append((pos, ln, fl)); pos += ln
    assert pos == 8 * G, pos
    return out
def merged(pairs):
    out = []
    for p, l in pairs:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + l)
        else:
            out.append((p, l))
    return out
base = runs(got[ids["base:allocation"]])
# Allocated: the cluster at 0, the one at 5 GiB, 128 KiB at 6 GiB. Runs are
# merged: inside an allocated cluster the server may report the part the
# host file holds as a hole as NBD_STATE_ZERO (qemu-nbd does; whether ext4
# calls an unwritten extent a hole depends on the page cache).
data = merged([(p, l) for p, l, f in base if f & 1 == 0])
assert data == [(0, 64 << 10), (5 * G, 64 << 10), (6 * G, 128 << 10)], data
assert any(l > 4 * G for p, l, f in base), "no extent over 4 GiB: " + str(base)
depth = runs(got[ids["qemu:allocation-depth"]])
assert merged([(p, l) for p, l, f in depth if f == 1]) == data, depth
dirty = runs(got[ids["qemu:dirty-bitmap:b0"]])
# Granularity 64 KiB: the writes after the bitmap was added, and ours.
assert merged([(p, l) for p, l, f in dirty if f == 1]) == [(0, 64 << 10), (5 * G, 64 << 10), (6 * G, 128 << 10)], dirty
send(s, True, 2, 0, 0)
s.close()
print("ok:", len(base), "allocation extents,", len(dirty), "bitmap extents")
PY
stop_serve
qemu-img check -q "$img" || fail "qemu-img check after the writes"
qemu-io -f qcow2 -c 'read -P 0x68 5368713216 1' -c 'read -P 0x11 5368709120 4096' "$img" >/dev/null ||
  fail "bytes written past 4 GiB do not read back"
echo PASS
