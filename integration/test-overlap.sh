#!/usr/bin/env bash
# Metadata is never overwritten by guest data, whatever a corrupt image
# claims (issue 8 item 2). make-overlap.py builds four images qemu-img check
# calls corrupt; for each, qemu-nbd and qnbd get the same WRITE:
#   a  refcount(cluster 0) = 0, no L2 table: 64 KiB at 0 (the new L2 table
#      would go over the header);
#   b  the same with an L2 table: 64 KiB at 1 MiB holding a qcow2 header that
#      names /etc/passwd as raw backing file (guest data over the header,
#      read back after a restart);
#   c  a COPIED L2 entry naming the refcount block: 4 KiB at 0, in place;
#   d  refcount table entry 0 naming the L1 table: 64 KiB at 1 MiB.
# qemu-nbd answers EIO and marks the image corrupt in every case. qnbd must
# answer EIO too (a-c), set the corrupt bit, leave every other byte of the
# file as it was, log "Preventing invalid write on metadata", and keep
# serving reads; (d) is refused when the image is opened for writing (one
# line naming the overlap), as QEMU's open-time checks, and still serves
# read-only. After (b), a restart must not show /etc/passwd. Last, a zero
# or TRIM that would free (and discard) the refcount block of image c.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-nbd
requires_python_nbd

img=$TMPDIR_TEST/img
mkdir "$img"
"$PY" "$INTEGRATION_DIR/make-overlap.py" "$img"
qemu-img create -q -f qcow2 -b /etc/passwd -F raw "$img/evil.qcow2" 4M

# write_args CASE: OFFSET LENGTH [PAYLOAD]
write_args() {
  case $1 in
    a) echo 0 65536 ;;
    b) echo 1048576 65536 "$img/evil.qcow2" ;;
    c) echo 0 4096 ;;
    d) echo 1048576 65536 ;;
  esac
}

# same_but_corrupt_bit ORIG NOW: every byte equal except the incompatible
# features field (header bytes 72-79), where NOW adds exactly bit 1.
same_but_corrupt_bit() {
  "$PY" - "$1" "$2" <<'PYEOF'
import struct, sys
a, b = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
fa, fb = struct.unpack(">Q", a[72:80])[0], struct.unpack(">Q", b[72:80])[0]
if fb != fa | 2 or fa & 2:
    sys.exit(f"incompatible features {fa:#x} -> {fb:#x}, expected the corrupt bit (2) added")
if len(a) != len(b) or a[:72] + a[80:] != b[:72] + b[80:]:
    diff = next((i for i in range(min(len(a), len(b))) if a[i] != b[i] and not 72 <= i < 80), min(len(a), len(b)))
    sys.exit(f"file changed beyond the corrupt bit: first difference at byte {diff:#x} (sizes {len(a)}, {len(b)})")
PYEOF
}

for c in a b c d; do
  # qemu-nbd, the reference: EIO and the corrupt bit.
  cp "$img/$c.qcow2" "$img/$c.qemu.qcow2"
  start_server "$TMPDIR_TEST/qemu.pid" qemu-nbd -f qcow2 -k "$TMPDIR_TEST/qemu.sock" \
    --pid-file="$TMPDIR_TEST/qemu.pid" "$img/$c.qemu.qcow2" || fail "qemu-nbd did not start on $c"
  read -r -a args <<<"$(write_args $c)"
  got=$("$PY" "$INTEGRATION_DIR/overlap_write.py" "nbd+unix:///?socket=$TMPDIR_TEST/qemu.sock" "${args[@]}")
  expect_eq "${got%% *}" EIO "qemu-nbd: WRITE on image $c"
  stop_server "$SERVER_PID" || true
  qemu-img info "$img/$c.qemu.qcow2" | grep -q 'corrupt: true' || fail "qemu-nbd did not mark image $c corrupt"

  cp "$img/$c.qcow2" "$img/$c.orig"
  if [[ $c == d ]]; then
    # Refused at a writable open: one line naming the overlap, no change.
    if out=$("$QNBD" serve -f qcow2 -k "$TMPDIR_TEST/d.sock" "$img/d.qcow2" 2>&1); then
      fail "qnbd served image d writable: $out"
    fi
    [[ $(wc -l <<<"$out") == 1 ]] || fail "expected one error line for image d, got: $out"
    grep -q 'refcount block 0 at 0x30000 overlaps the active L1 table' <<<"$out" || fail "image d: $out"
    cmp -s "$img/d.qcow2" "$img/d.orig" || fail "image d changed although its open was refused"
    start_serve -r -f qcow2 "$img/d.qcow2"
    "$PY" -c 'import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); assert h.pread(65536, 0) == b"\x11" * 65536' \
      "$SERVE_URI" || fail "image d: read-only serve does not read the guest data"
    stop_serve
    continue
  fi
  start_serve -f qcow2 "$img/$c.qcow2"
  got=$("$PY" "$INTEGRATION_DIR/overlap_write.py" "$SERVE_URI" "${args[@]}")
  expect_eq "$got" "EIO ok" "qnbd: WRITE then READ on image $c"
  # Still serving: a new connection reads; any further write is refused.
  got=$("$PY" "$INTEGRATION_DIR/overlap_write.py" "$SERVE_URI" 2097152 4096)
  expect_eq "$got" "EIO ok" "qnbd: second connection on image $c"
  serve_alive || fail "qnbd exited after the overlap on image $c"
  stop_serve
  grep -q 'Preventing invalid write on metadata (overlaps with the' "$SERVE_LOG" ||
    fail "image $c: no overlap log line: $(cat "$SERVE_LOG")"
  qemu-img info "$img/$c.qcow2" | grep -q 'corrupt: true' || fail "qnbd did not mark image $c corrupt"
  same_but_corrupt_bit "$img/$c.orig" "$img/$c.qcow2" || fail "image $c: metadata changed"
done

# (b) after a restart: no backing file appeared, nothing of /etc/passwd is
# served (the corrupt image opens read-only only).
if "$QNBD" serve -f qcow2 -k "$TMPDIR_TEST/b2.sock" "$img/b.qcow2" 2>/dev/null; then
  fail "a corrupt image was opened for writing"
fi
qemu-img info "$img/b.qcow2" | grep -q 'backing file' && fail "image b now has a backing file"
start_serve -r -f qcow2 "$img/b.qcow2"
"$PY" - "$SERVE_URI" <<'PYEOF' || fail "image b after a restart"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
passwd = open("/etc/passwd", "rb").read(32)
for off in (0, 1 << 20, 2 << 20):
    got = h.pread(4096, off)
    if passwd in got:
        sys.exit(f"/etc/passwd served at {off:#x}")
assert h.pread(65536, 0) == b"\x11" * 65536, "guest data at 0 changed"
assert h.pread(65536, 1 << 20) == bytes(65536), "the refused write shows at 1 MiB"
PYEOF
stop_serve

# Dropping the reference would free the metadata cluster: image c's L2
# entry names the refcount block. A WRITE_ZEROES without NO_HOLE, and a
# TRIM with --discard=unmap (which would also discard the freed cluster in
# the file), get EIO and the corrupt bit; nothing else changes. (qemu-nbd
# 7.2 frees it: qemu-img check then finds the refcount block's own
# refcount wrong, and with --discard=unmap the block punched out.)
for op in --zero --trim; do
  cp "$img/c.orig" "$img/c.free.qcow2"
  start_serve -f qcow2 --discard=unmap "$img/c.free.qcow2"
  got=$("$PY" "$INTEGRATION_DIR/overlap_write.py" "$SERVE_URI" 0 65536 $op)
  expect_eq "$got" "EIO ok" "qnbd: $op of the cluster naming the refcount block, then READ"
  serve_alive || fail "qnbd exited after $op on image c"
  stop_serve
  grep -q 'Preventing invalid free of metadata (overlaps with the refcount block at 0x20000)' "$SERVE_LOG" ||
    fail "$op on image c: no log line: $(cat "$SERVE_LOG")"
  same_but_corrupt_bit "$img/c.orig" "$img/c.free.qcow2" || fail "$op on image c: metadata changed"
done
echo "PASS: overlap"
