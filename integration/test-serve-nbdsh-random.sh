#!/usr/bin/env bash
# Seeded random reads/writes/zeroes/trims through libnbd (python) on three
# connections to qnbd serving raw and then qcow2, mirrored into a reference
# file; reads, block status (base:allocation and qemu:allocation-depth,
# REQ_ONE), several reads in flight at once on one connection, and
# strict-mode-off error replies (beyond the end) are checked.
source "$(dirname "$0")/lib-serve.sh"
requires_python_nbd

for fmt in raw qcow2; do
img=$TMPDIR_TEST/disk.$fmt
ref=$TMPDIR_TEST/ref.img
qemu-img create -q -f "$fmt" "$img" 8M
truncate -s 8M "$ref"
start_serve -f "$fmt" -e 4 -A --discard=unmap "$img"

"$PY" - "$SERVE_URI" "$ref" <<'PY' || fail "$fmt: nbdsh random test failed"
import nbd, os, random, sys
uri, refpath = sys.argv[1], sys.argv[2]
SIZE = 8 << 20
rnd = random.Random(1234)
ref = bytearray(SIZE)

hs = []
for i in range(3):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(uri)
    assert h.can_meta_context("base:allocation") and h.can_meta_context("qemu:allocation-depth")
    assert h.can_multi_conn()
    hs.append(h)

for step in range(400):
    h = rnd.choice(hs)
    off = rnd.randrange(0, SIZE - 1)
    ln = rnd.randrange(1, min(SIZE - off, 256 << 10) + 1)
    op = rnd.random()
    if op < 0.45:
        data = os.urandom(ln)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
        ref[off:off + ln] = data
    elif op < 0.6:
        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0)
        ref[off:off + ln] = bytes(ln)
    elif op < 0.65:
        # TRIM leaves contents unspecified: re-establish them with zeroes.
        h.trim(ln, off)
        h.zero(ln, off)
        ref[off:off + ln] = bytes(ln)
    else:
        got = h.pread(ln, off)
        assert got == bytes(ref[off:off + ln]), "read mismatch at %d+%d step %d" % (off, ln, step)

# Several requests in flight at once on one connection, completed out of order.
h = hs[0]
bufs = []
for i in range(32):
    off = rnd.randrange(0, SIZE - 65536)
    b = nbd.Buffer(65536)
    h.aio_pread(b, off)
    bufs.append((b, off))
while h.aio_in_flight() > 0:
    h.poll(-1)
for b, off in bufs:
    assert b.to_bytearray() == ref[off:off + 65536]

# Block status: every extent is consistent with the reference contents.
for h in hs[:1]:
    entries = {}
    def cb(meta, offset, extents, err):
        entries.setdefault(meta, []).append((offset, list(extents)))
        return 0
    h.block_status(SIZE, 0, cb)
    ext = entries["base:allocation"][0][1]
    pos = 0
    for i in range(0, len(ext), 2):
        ln, flags = ext[i], ext[i + 1]
        assert ln > 0
        if flags & 2:  # ZERO
            assert ref[pos:pos + ln] == bytes(ln), "ZERO extent not zero at %d" % pos
        pos += ln
    assert pos >= 1
    depth = entries["qemu:allocation-depth"][0][1]
    assert all(depth[i] > 0 for i in range(0, len(depth), 2))
    # REQ_ONE: a single extent no longer than the request.
    entries.clear()
    h.block_status(12345, 4096, cb, nbd.CMD_FLAG_REQ_ONE)
    for meta, lst in entries.items():
        assert len(lst[0][1]) == 2 and lst[0][1][0] <= 12345, (meta, lst)

# Error replies with strict mode off: connection survives.
h = hs[1]
h.set_strict_mode(0)
for fn in (lambda: h.pread(4096, SIZE), lambda: h.pwrite(b"x" * 4096, SIZE - 100)):
    try:
        fn()
        raise AssertionError("out-of-range request succeeded")
    except nbd.Error as e:
        assert e.errno in ("EINVAL", "ENOSPC") or e.errnum in (22, 28), e
assert h.pread(16, 0) == bytes(ref[0:16])

for h in hs:
    h.flush()
    h.shutdown()
open(refpath, "wb").write(ref)
print("ok")
PY
stop_serve
if [[ $fmt == qcow2 ]]; then
  qemu-img check -q -f qcow2 "$img" || fail "qcow2: qemu-img check after the random workload"
fi
qemu-img compare -q -f "$fmt" -F raw "$img" "$ref" || fail "$fmt: image differs from reference after shutdown"
done
echo PASS
