#!/usr/bin/env bash
# A writing `qnbd serve` (writable qcow2 export, a seeded libnbd client doing
# writes, zeroes, trims and flushes) is killed with SIGKILL at random moments,
# 50 times on the same image. After each kill `qemu-img check` must find no
# corruption (leaked clusters are allowed: the allocation that was in flight
# may be lost), and every byte must hold its value at the last flush or one a
# request sent since put there.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io timeout
requires_qnbd
requires_python_nbd

# QNBD_KILL_FORMAT=raw runs the same harness on a raw image (data check
# only): a check of the harness itself.
rounds=${QNBD_KILL_ROUNDS:-50}
fmt=${QNBD_KILL_FORMAT:-qcow2}
img=$TMPDIR_TEST/disk.$fmt
qemu-img create -q -f "$fmt" "$img" 8M
qemu-io -f "$fmt" -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0x6b 3M 512k' "$img"

# A writable export must be offered writable before the rounds start.
probe_sock=$TMPDIR_TEST/probe.sock
"$QNBD" serve -f "$fmt" -k "$probe_sock" --pid-file "$TMPDIR_TEST/probe.pid" "$img" 2>"$TMPDIR_TEST/probe.log" &
probe_pid=$!
cleanup_fn "kill -9 $probe_pid 2>/dev/null"
wait_ready -s "$TMPDIR_TEST/probe.pid" "$probe_pid" || true
writable=no
if [[ -s $TMPDIR_TEST/probe.pid ]] &&
  "$PY" -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); sys.exit(h.is_read_only())' \
    "nbd+unix:///?socket=$probe_sock" 2>/dev/null; then
  writable=yes
fi
kill -TERM "$probe_pid" 2>/dev/null || true
wait "$probe_pid" 2>/dev/null || true
[[ $writable == yes ]] || fail "$fmt: writable serve not available ($(head -c 300 "$TMPDIR_TEST/probe.log" | tr '\n' ' '))"

expect=$TMPDIR_TEST/expect.raw
pending=$TMPDIR_TEST/pending.txt
leaks=0
flushed_rounds=0
for ((round = 1; round <= rounds; round++)); do
  start_serve -f "$fmt" "$img"
  "$PY" "$INTEGRATION_DIR/kill_writer.py" "$SERVE_URI" "$round" "$expect" "$pending" 2>"$TMPDIR_TEST/writer.log" &
  writer=$!
  # A random moment: 50 ms .. 1 s into the workload.
  sleep "$(python3 -c "import random; random.seed($round); print(random.uniform(0.05, 1.0))")"
  if ! serve_alive; then
    wait "$SERVE_PID" 2>/dev/null || sstatus=$?
    cat "$SERVE_LOG" >&2
    fail "round $round: qnbd serve died under the writer (status ${sstatus:-0}) before the kill"
  fi
  kill -KILL "$SERVE_PID"
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=
  wstatus=0
  timeout 60 tail --pid="$writer" -f /dev/null || fail "round $round: writer did not stop"
  wait "$writer" || wstatus=$?
  [[ $wstatus == 0 ]] || { cat "$TMPDIR_TEST/writer.log" "$SERVE_LOG" >&2; fail "round $round: writer failed ($wstatus)"; }

  status=0
  if [[ $fmt == qcow2 ]]; then
    qemu-img check -f qcow2 "$img" >"$TMPDIR_TEST/check.out" 2>&1 || status=$?
  fi
  case $status in
    0) ;;
    3) leaks=$((leaks + 1)) ;;
    *) cat "$TMPDIR_TEST/check.out" >&2; fail "round $round: qemu-img check exit $status after SIGKILL" ;;
  esac
  [[ -s $expect ]] || continue  # killed before the writer connected
  qemu-img convert -f "$fmt" -O raw "$img" "$TMPDIR_TEST/after.raw"
  python3 - "$expect" "$pending" "$TMPDIR_TEST/after.raw" <<'PY' || fail "round $round: flushed data lost"
# Each byte holds its flushed value or the value a request sent since the
# flush puts there (kill_writer.py, PENDING); a trimmed byte may hold
# anything. Zeroes where only writes went, or stale data, fail.
import operator
import sys
want = open(sys.argv[1], "rb").read()
got = open(sys.argv[3], "rb").read()
assert len(got) == len(want), (len(got), len(want))
ok = bytearray(len(want))  # 1: a value this byte may hold
for i in range(0, len(want), 512):
    w, g = want[i:i + 512], got[i:i + 512]
    ok[i:i + 512] = b"\1" * len(g) if w == g else bytes(map(operator.eq, w, g))
for line in open(sys.argv[2]):
    f = line.split()
    off, length, kind = int(f[0]), int(f[1]), f[2]
    for b in range(off - off % 512, off + length, 512):
        lo, hi = max(b, off), min(b + 512, off + length)
        if kind == "t":
            ok[lo:hi] = b"\1" * (hi - lo)
            continue
        # One value per 512-byte block of the image.
        v = 0 if kind == "z" else (int(f[3]) + b // 512) & 0xFF
        if got[lo:hi] == bytes([v]) * (hi - lo):
            ok[lo:hi] = b"\1" * (hi - lo)
            continue
        ok[lo:hi] = bytes(map(operator.or_, ok[lo:hi], map(v.__eq__, got[lo:hi])))
bad = ok.find(0)
if bad >= 0:
    sys.exit(f"byte {bad}: flushed {want[bad]}, reads {got[bad]}, which no request since the flush wrote")
PY
  flushed_rounds=$((flushed_rounds + 1))
  rm -f "$expect" "$pending"
done
echo "test-kill: $rounds SIGKILLs, $flushed_rounds with flushed data verified, $leaks left leaks (allowed), no corruption"
