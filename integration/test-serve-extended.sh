#!/usr/bin/env bash
# Structured and extended-header transmission over a raw socket (libnbd 1.14
# has no extended headers): sparse READ as OFFSET_DATA/OFFSET_HOLE chunks,
# DF, BLOCK_STATUS (compact type 5 and extended type 6, payload filter,
# REQ_ONE), error chunks, NONE chunks for plain success.
source "$(dirname "$0")/lib-serve.sh"
requires python3

img=$TMPDIR_TEST/disk.img
truncate -s 8M "$img"
printf 'A%.0s' $(seq 65536) | dd of="$img" bs=64k seek=16 conv=notrunc status=none   # data at 1 MiB
start_serve -f raw -A "$img"

PYTHONPATH=$INTEGRATION_DIR python3 - "$SERVE_SOCK" <<'PY' || fail "extended-header script failed"
import struct, sys
from nbdwire import chunks, recvall, send
import nbdwire
SOCK = sys.argv[1]
SIZE = 8 << 20

def connect(extended):
    s, ids, flags, size = nbdwire.connect(SOCK, extended, [b"base:allocation", b"qemu:allocation-depth"])
    assert ids == {"base:allocation": 0, "qemu:allocation-depth": 1}, ids
    assert size == SIZE, size
    return s, flags

for ext in (False, True):
    s, tflags = connect(ext)
    assert tflags & 0x80, "SEND_DF"
    assert bool(tflags & 0x1000) == ext, "BLOCK_STATUS_PAYLOAD only with extended headers"
    # Sparse read across hole/data/hole: holes as OFFSET_HOLE, data as OFFSET_DATA.
    off, ln = (1 << 20) - 65536, 3 * 65536
    send(s, ext, 0, off, ln)
    got = bytearray(ln); covered = 0; kinds = []
    for typ, d in chunks(s, ext, off=off):
        if typ == 1:
            o = struct.unpack(">Q", d[:8])[0]; got[o - off:o - off + len(d) - 8] = d[8:]; covered += len(d) - 8; kinds.append("data")
        elif typ == 2:
            o, hl = struct.unpack(">QI", d); covered += hl; kinds.append("hole")
        else:
            raise AssertionError("unexpected chunk %d" % typ)
    assert covered == ln and "hole" in kinds and "data" in kinds, kinds
    assert got == bytes(65536) + b"A" * 65536 + bytes(65536)
    # DF: a single OFFSET_DATA chunk.
    send(s, ext, 0, off, ln, flags=4)
    c = chunks(s, ext, off=off)
    assert len(c) == 1 and c[0][0] == 1 and c[0][1][8:] == bytes(65536) + b"A" * 65536 + bytes(65536)
    # Block status: one chunk per context.
    send(s, ext, 7, 0, SIZE)
    c = chunks(s, ext, off=0)
    assert [t for t, _ in c] == [6 if ext else 5] * 2, c
    for t, d in c:
        cid = struct.unpack(">I", d[:4])[0]
        if ext:
            n = struct.unpack(">I", d[4:8])[0]
            ex = [struct.unpack(">QQ", d[8 + 16 * i:24 + 16 * i]) for i in range(n)]
            assert all(fl >> 32 == 0 for _, fl in ex)
        else:
            ex = [struct.unpack(">II", d[4 + 8 * i:12 + 8 * i]) for i in range((len(d) - 4) // 8)]
        assert sum(l for l, _ in ex) == SIZE, ex
        if cid == 0:
            data = [ (l, f) for l, f in ex ]
            assert any(f == 0 for _, f in ex) and any(f == 3 for _, f in ex), ex
    # REQ_ONE: one extent per context, within the request.
    send(s, ext, 7, 0, 4096, flags=8)
    for t, d in chunks(s, ext, off=0):
        assert len(d) == (24 if ext else 12), len(d)
    # Errors arrive as error chunks; the connection survives.
    send(s, ext, 0, SIZE, 512)
    c = chunks(s, ext, off=SIZE)
    assert c[0][0] == 0x8001 and struct.unpack(">I", c[0][1][:4])[0] == 22
    # Plain success: simple reply in structured mode, NONE chunk in extended mode.
    send(s, ext, 3, 0, 0)
    if ext:
        c = chunks(s, ext, off=0); assert c == [(0, b"")], c
    else:
        magic, err, ck = struct.unpack(">IIQ", recvall(s, 16)); assert magic == 0x67446698 and err == 0
    if ext:
        # Payload-filtered block status: only context 1, with effect length 1 MiB.
        send(s, ext, 7, 0, 12, flags=0x20, payload=struct.pack(">QI", 1 << 20, 1))
        c = chunks(s, ext, off=0)
        assert len(c) == 1 and struct.unpack(">I", c[0][1][:4])[0] == 1
        # Unknown id in the filter: EINVAL, payload consumed.
        send(s, ext, 7, 0, 12, flags=0x20, payload=struct.pack(">QI", 4096, 9))
        c = chunks(s, ext, off=0)
        assert c[0][0] == 0x8001
        # WRITE with PAYLOAD_LEN, read back.
        send(s, ext, 1, 4096, 5, flags=0x20, payload=b"hello")
        assert chunks(s, ext, off=4096) == [(0, b"")]
        send(s, ext, 0, 4096, 5, flags=4)
        assert chunks(s, ext, off=4096)[0][1][8:] == b"hello"
    send(s, ext, 2, 0, 0)
    s.close()
print("ok")
PY
stop_serve
echo PASS
