#!/usr/bin/env bash
# qnbd serve -s/--snapshot beside qemu-nbd -s: writes go to a temporary
# qcow2 overlay, the image is never written. On a qcow2 with a raw backing
# file and on a raw image, the same writes, zeroes and trims through
# libnbd must read back the same (nbdcopy) with the same base:allocation
# map as from qemu-nbd -s; afterwards both images are byte for byte what
# they were; the overlay lives in $TMPDIR (set to a directory of the
# test's own) and nothing is left there, during or after the run, even
# after a SIGKILL; while served, a qcow2 image is locked against writers,
# as qemu locks a qcow2 backing file. -s -r serves read-only; -s -l is refused, as
# qemu-nbd refuses it (its overlay has no snapshots). The config key
# snapshot does what -s does.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy md5sum
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
mkdir -p "$T/tmp"
export TMPDIR=$T/tmp

truncate -s 8M "$T/base.raw"
qemu-io -f raw -c 'write -P 0x0b 0 8M' "$T/base.raw" >/dev/null
qemu-img create -q -f qcow2 -b "$T/base.raw" -F raw "$T/img.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 0x11 1M 1M' -c 'write -z 4M 1M' "$T/img.qcow2" >/dev/null
truncate -s 6M "$T/img.raw"
qemu-io -f raw -c 'write -P 0x22 0 3M' "$T/img.raw" >/dev/null

workload() {
  "$PY" - "$1" <<'PY' || fail "workload on $1 failed"
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rnd = random.Random(7)
for i in range(60):
    off = rnd.randrange(0, size - 4096) // 512 * 512
    ln = min(size - off, rnd.choice([512, 4096, 65536, 300000]) // 512 * 512)
    op = rnd.random()
    if op < 0.6:
        h.pwrite(bytes([i + 1]) * ln, off)
    elif op < 0.8:
        h.zero(ln, off)
    else:
        h.trim(ln, off)
h.flush()
PY
}

# run_case IMAGE FMT: both servers with -s on the same image, one after the
# other (each takes the image's backing-file lock, which lets readers in).
run_case() {
  local img=$1 fmt=$2 before
  before=$(md5sum <"$img")
  start_server "$T/q.pid" qemu-nbd -t -s -f "$fmt" -k "$T/q.sock" --pid-file "$T/q.pid" "$img" ||
    fail "$fmt: qemu-nbd -s did not start"
  local qpid=$SERVER_PID quri="nbd+unix:///?socket=$T/q.sock"
  workload "$quri"
  nbdcopy "$quri" "$T/$fmt.qemu.raw"
  nbdinfo --map "$quri" >"$T/$fmt.qemu.map"
  stop_server "$qpid" || fail "$fmt: qemu-nbd did not stop cleanly"

  start_serve -s -f "$fmt" "$img"
  [[ -z $(ls -A "$T/tmp") ]] || fail "$fmt: the overlay is visible in \$TMPDIR while served: $(ls -A "$T/tmp")"
  # (QEMU's raw backing files let writers in: qemu-nbd -s on raw does)
  if [[ $fmt == qcow2 ]]; then
    qemu-io -f "$fmt" -c 'write 0 4k' "$img" >"$T/io.out" 2>&1 &&
      fail "$fmt: qemu-io wrote the image while qnbd serve -s used it"
    grep -q 'Failed to get "write" lock' "$T/io.out" || { cat "$T/io.out" >&2; fail "$fmt: no write lock refusal"; }
  fi
  workload "$SERVE_URI"
  nbdcopy "$SERVE_URI" "$T/$fmt.qnbd.raw"
  nbdinfo --map "$SERVE_URI" >"$T/$fmt.qnbd.map"
  nbdinfo --json "$SERVE_URI" | grep -q '"is_read_only": false' || fail "$fmt: -s export is read-only"
  stop_serve

  cmp "$T/$fmt.qemu.raw" "$T/$fmt.qnbd.raw" || fail "$fmt: data differs from qemu-nbd -s"
  qemu-img convert -O raw -f "$fmt" "$img" "$T/$fmt.orig.raw" || fail "$fmt: qemu-img convert failed"
  cmp -s "$T/$fmt.qnbd.raw" "$T/$fmt.orig.raw" && fail "$fmt: the workload changed nothing"
  diff -u "$T/$fmt.qemu.map" "$T/$fmt.qnbd.map" >&2 || fail "$fmt: base:allocation differs from qemu-nbd -s"
  expect_eq "$(md5sum <"$img")" "$before" "$fmt: image bytes after the run"
  [[ -z $(ls -A "$T/tmp") ]] || fail "$fmt: left in \$TMPDIR: $(ls -A "$T/tmp")"
  echo "$fmt: same data and map as qemu-nbd -s, image unchanged, nothing left in \$TMPDIR"
}

run_case "$T/img.qcow2" qcow2
run_case "$T/img.raw" raw

# SIGKILL leaves nothing behind either.
start_serve -s -f qcow2 "$T/img.qcow2"
workload "$SERVE_URI"
kill -9 "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=
[[ -z $(ls -A "$T/tmp") ]] || fail "left in \$TMPDIR after SIGKILL: $(ls -A "$T/tmp")"

# The config key does what -s does.
before=$(md5sum <"$T/img.qcow2")
cat >"$T/cfg.json" <<EOF
{"exports": [{"name": "", "image": "$T/img.qcow2", "format": "qcow2", "snapshot": true}]}
EOF
start_serve --config "$T/cfg.json"
workload "$SERVE_URI"
nbdcopy "$SERVE_URI" "$T/cfg.raw"
stop_serve
cmp "$T/cfg.raw" "$T/qcow2.qnbd.raw" || fail "config snapshot: data differs from -s"
expect_eq "$(md5sum <"$T/img.qcow2")" "$before" "config snapshot: image bytes after the run"

# -s -r: read-only; -s -l: refused with qemu-nbd's message.
start_serve -s -r -f qcow2 "$T/img.qcow2"
nbdinfo --json "$SERVE_URI" | grep -q '"is_read_only": true' || fail "-s -r export is writable"
stop_serve
timeout 10 qemu-nbd -s -l s1 -k "$T/x.sock" "$T/img.qcow2" 2>"$T/q.err" && fail "qemu-nbd -s -l served"
run_checked 10 "$QNBD" serve -s -l s1 -k "$T/x.sock" "$T/img.qcow2"
[[ $RUN_KIND == error ]] || fail "qnbd serve -s -l: $RUN_KIND"
grep -q "Can't find snapshot" "$T/q.err" || fail "qemu-nbd -s -l: $(cat "$T/q.err")"
grep -q "Can't find snapshot" "$RUN_STDERR" || fail "qnbd serve -s -l: $(cat "$RUN_STDERR")"
echo PASS
