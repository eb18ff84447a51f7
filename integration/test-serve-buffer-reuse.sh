#!/usr/bin/env bash
# Request buffers are pooled per slot: a request above 1 MiB gives its buffer
# back to the shared pool, and the slot's next, smaller request must get a
# fresh one. Large and small reads, writes and reads after trims alternate on
# one connection (so the same slot is reused), with structured and simple
# replies, and every byte is checked against a reference copy.
source "$(dirname "$0")/lib-serve.sh"
requires_python_nbd

for fmt in raw qcow2; do
  img=$TMPDIR_TEST/disk.$fmt
  qemu-img create -q -f "$fmt" "$img" 16M
  start_serve -f "$fmt" --discard=unmap "$img"
  for structured in 1 0; do
    "$PY" - "$SERVE_URI" "$structured" <<'PY' || fail "$fmt structured=$structured: buffer reuse failed"
import nbd, random, sys
uri, structured = sys.argv[1], sys.argv[2] == "1"
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
size = h.get_size()
ref = bytearray(h.pread(size, 0))  # 16 MiB: the slot's buffer goes back to the pool
rnd = random.Random(7)
for step in range(300):
    big = rnd.randrange(3) == 0
    length = rnd.randrange(1 << 20, 4 << 20) if big else rnd.randrange(1, 64 << 10)
    off = rnd.randrange(0, size - length + 1)
    op = rnd.randrange(3)
    if op == 0:
        buf = bytes((step + i) & 0xFF for i in range(length))
        h.pwrite(buf, off)
        ref[off:off + length] = buf
    elif op == 1:
        h.trim(length, off)
        ref[off:off + length] = h.pread(length, off)
    got = h.pread(length, off)
    assert got == ref[off:off + length], f"step {step}: {off}+{length} differs"
assert h.pread(size, 0) == ref
print(f"ok: structured={structured}")
PY
  done
  stop_serve
done
echo "test-serve-buffer-reuse: ok"
