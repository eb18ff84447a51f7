#!/usr/bin/env bash
# Crash-safe bitmaps (docs/crash-safe-bitmaps.md) with a real `qnbd serve`:
#  - 50 SIGKILLs of a writable serve while two libnbd connections write
#    (crash_rounds.py): each restart exports both bitmaps with -B, every
#    changed granule is dirty, no dirty granule lies outside a touched
#    recovery chunk, and qemu-nbd -B reports the same extents;
#  - after a kill, `qnbd info` reports the pending record and `qnbd check`
#    names it; a qemu-io write, qemu-img check -r all, a writable qemu-nbd or
#    qemu-img bitmap in between makes the record stale: the restarted qnbd
#    refuses the bitmap as inconsistent, as it does with --recover-bitmaps=no,
#    and so does qnbd check -r all once it repaired a corruption;
#    untouched, the same crashed image recovers and covers the write, and
#    so it does after `qnbd bitmap --add` (which recovers first) and after
#    `qnbd check -r all` that found only leaks; a read-only serve exports
#    the recovered b0 and writes nothing (not under --force-share).
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo timeout
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
img=$T/disk.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 4M' "$img"
qemu-img bitmap --add -g 64k "$img" b0
qemu-img bitmap --add -g 512k "$img" b1

rounds=${CRASH_ROUNDS:-50}
start=$SECONDS
timeout 300 "$PY" "$INTEGRATION_DIR/crash_rounds.py" "$QNBD" "$img" "$T" "$rounds" 11 65536 ||
  fail "SIGKILL rounds failed"
echo "($rounds rounds in $((SECONDS - start)) s)"
qemu-img check -q "$img" || [[ $? == 3 ]] || fail "qemu-img check found corruption after the rounds"

# One more kill, right after a write of 0x77 at 12M.
start_serve -f qcow2 --recovery-chunk-size 65536 "$img"
qemu-io -f raw -c 'write -q -P 0x77 12M 64k' "$SERVE_URI" || fail "qemu-io write through qnbd serve"
kill -KILL "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=
[[ -e $img.qnbd-intent ]] || fail "no write-intent record beside the image after the kill"
info=$("$QNBD" info "$img") || fail "qnbd info after the kill"
[[ $info == *"write-intent record: pending"* ]] || fail "qnbd info does not show the pending record: $info"
"$QNBD" check "$img" >/dev/null 2>"$T/check.err" || [[ $? == 3 ]] || fail "qnbd check after the kill"
grep -q "write-intent record: pending" "$T/check.err" || fail "qnbd check does not name the record: $(cat "$T/check.err")"

copy() { cp "$img" "$T/$1.qcow2" && cp "$img.qnbd-intent" "$T/$1.qcow2.qnbd-intent"; }
# expect_refused NAME [serve args]: qnbd serve -B b0 on copy NAME refuses.
expect_refused() {
  local name=$1
  shift
  run_checked 20 "$QNBD" serve "$@" -B b0 -f qcow2 -k "$T/r.sock" "$T/$name.qcow2"
  [[ $RUN_KIND == error ]] || fail "$name: qnbd serve -B b0 served a stale bitmap ($RUN_KIND $RUN_STATUS)"
  grep -q "inconsistent" "$RUN_STDERR" || fail "$name: refusal does not say inconsistent: $(cat "$RUN_STDERR")"
  echo "$name: refused: $(tail -n 1 "$RUN_STDERR")"
}
copy io
qemu-io -f qcow2 -c 'write -q -P 0x11 1M 4k' "$T/io.qcow2" || fail "qemu-io write on the crashed copy"
expect_refused io
copy checkr
qemu-img check -q -r all "$T/checkr.qcow2" || fail "qemu-img check -r all on the crashed copy"
expect_refused checkr
# qnbd check -r all repairing a corruption (a data cluster's L2 entry
# without OFLAG_COPIED, its refcount 1) retires the record: the repair may
# change what the record does not cover.
copy qnbdcheck
"$PY" - "$T/qnbdcheck.qcow2" <<'PY' || fail "cannot clear OFLAG_COPIED on the crashed copy"
import json, struct, subprocess, sys
path = sys.argv[1]
m = json.loads(subprocess.check_output(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path]))
host = next(e["offset"] for e in m if e["start"] <= 3 << 20 < e["start"] + e["length"] and e["data"])
host += (3 << 20) - next(e["start"] for e in m if e["start"] <= 3 << 20 < e["start"] + e["length"])
want = struct.pack(">Q", host | 1 << 63)
data = open(path, "rb").read()
hits = [i for i in range(0, len(data), 8) if data[i:i + 8] == want]
assert len(hits) == 1, hits
with open(path, "r+b") as f:
    f.seek(hits[0])
    f.write(struct.pack(">Q", host))
PY
"$QNBD" check -r all "$T/qnbdcheck.qcow2" >/dev/null 2>"$T/qnbdcheck.err" ||
  fail "qnbd check -r all on the crashed copy: $(cat "$T/qnbdcheck.err")"
grep -q "retired by the repair of corruptions" "$T/qnbdcheck.err" ||
  fail "qnbd check -r all fixed a corruption but kept the record: $(cat "$T/qnbdcheck.err")"
expect_refused qnbdcheck
copy qemunbd
start_server "$T/q.pid" qemu-nbd -t -f qcow2 -k "$T/q.sock" --pid-file "$T/q.pid" "$T/qemunbd.qcow2" ||
  fail "qemu-nbd (writable) did not start"
qemu-io -f raw -c 'write -q -P 0x22 2M 4k' "nbd+unix:///?socket=$T/q.sock" || fail "qemu-io through qemu-nbd"
stop_server "$SERVER_PID" || fail "qemu-nbd did not stop cleanly"
expect_refused qemunbd
copy qbitmap
qemu-img bitmap --add "$T/qbitmap.qcow2" b2 || fail "qemu-img bitmap --add on the crashed copy"
expect_refused qbitmap
copy off
expect_refused off --recover-bitmaps=no

# expect_recovered NAME [BITMAP...]: served writable with -B b0 (and each
# BITMAP), copy NAME's b0 has the write before the kill dirty, no record is
# left after a clean stop, and qemu-img sees consistent bitmaps.
# expect_b0_dirty NAME [serve args]: served so (and -B b0), copy NAME's b0
# has the write before the kill (0x77 at 12M) dirty.
expect_b0_dirty() {
  local name=$1
  shift
  start_serve -f qcow2 "$@" -B b0 "$T/$name.qcow2"
  nbdinfo --json --map=qemu:dirty-bitmap:b0 "$SERVE_URI" >"$T/$name.json" || fail "$name: nbdinfo map of b0"
  stop_serve
  "$PY" - "$T/$name.json" <<'PY' || fail "$name: the write before the kill is not dirty in the exported b0"
import json, sys
m = json.load(open(sys.argv[1]))
start, end = 12 << 20, (12 << 20) + 65536
assert any(e["offset"] <= start and end <= e["offset"] + e["length"] and e["type"] & 1 for e in m), m
PY
}
expect_recovered() {
  local name=$1 b bitmaps=()
  shift
  for b in "$@"; do bitmaps+=(-B "$b"); done
  expect_b0_dirty "$name" "${bitmaps[@]}"
  [[ ! -e $T/$name.qcow2.qnbd-intent ]] || fail "$name: the record was left behind after the clean stop"
  [[ $(qemu-img info "$T/$name.qcow2") != *in-use* ]] || fail "$name: bitmaps still in-use after a clean stop"
  qemu-img check -q "$T/$name.qcow2" || [[ $? == 3 ]] || fail "$name: qemu-img check found corruption"
  echo "$name: recovered"
}
# Untouched, the same crash recovers.
copy good
expect_recovered good
# A read-only serve (an offline backup of the crashed disk) exports what the
# next writable open will store, b0 dirty where the write was, and changes
# nothing: not the image, not the record. Under --force-share a writer may
# still hold the image, so there b0 stays inconsistent, as qemu-nbd has it.
copy ro
cp "$T/ro.qcow2" "$T/ro.before"
expect_b0_dirty ro -r
cmp -s "$T/ro.qcow2" "$T/ro.before" || fail "ro: a read-only serve changed the image"
[[ -e $T/ro.qcow2.qnbd-intent ]] || fail "ro: a read-only serve removed the record"
[[ $("$QNBD" info "$T/ro.qcow2") == *"write-intent record: pending"* ]] || fail "ro: the record is no longer pending"
expect_refused ro -r --force-share
expect_recovered ro
# qnbd bitmap recovers the crashed writer's bitmaps before its edit, as the
# next qnbd serve would (the edit rewrites the directory the record was
# armed for: without that, b0 would stay inconsistent for good).
copy qnbdbitmap
"$QNBD" bitmap --add "$T/qnbdbitmap.qcow2" b2 2>"$T/qnbdbitmap.err" ||
  fail "qnbd bitmap --add on the crashed copy: $(cat "$T/qnbdbitmap.err")"
grep -q "recovered" "$T/qnbdbitmap.err" || fail "qnbd bitmap did not say it recovered: $(cat "$T/qnbdbitmap.err")"
expect_recovered qnbdbitmap b2
# qnbd check -r all on a crash that left only leaks repairs nothing the
# record does not cover, and keeps it.
copy qnbdcheckleaks
"$QNBD" check -q -r all "$T/qnbdcheckleaks.qcow2" || fail "qnbd check -r all on the crashed copy"
expect_recovered qnbdcheckleaks
echo PASS
