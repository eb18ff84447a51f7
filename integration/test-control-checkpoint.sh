#!/usr/bin/env bash
# Checkpoints taken live over two exports (issue: control socket): two
# libnbd connections per export write seeded data while 20 checkpoints are
# taken with `qnbd ctl checkpoint --name cI --disable cI-1` (the control
# socket comes from the config file's `control` key). Afterwards, from a
# read-only restart (nbdinfo --map=qemu:dirty-bitmap:cI) and from qemu-nbd
# -B on the same images: every acknowledged request is in exactly one
# checkpoint bitmap, on the right side of every checkpoint call, and the
# bitmaps hold nothing else (check_checkpoints.py); qemu-nbd agrees; the
# images pass qemu-img check.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-nbd nbdinfo python3
requires_python_nbd

T=$TMPDIR_TEST
for d in a b; do qemu-img create -q -f qcow2 "$T/$d.qcow2" 32M; done
cat >"$T/server.json" <<JSON
{"exports": [{"name": "a", "image": "$T/a.qcow2", "format": "qcow2"},
             {"name": "b", "image": "$T/b.qcow2", "format": "qcow2"}],
 "control": "$T/ctl.sock"}
JSON
start_serve --config "$T/server.json"
"$QNBD" ctl -s "$T/ctl.sock" checkpoint --name c0 -g 4096 a b >/dev/null || fail "first checkpoint failed"
"$PY" "$INTEGRATION_DIR/checkpoint_writer.py" "$QNBD" "$T/ctl.sock" "$SERVE_SOCK" "$T/log.json" a b ||
  fail "writer or checkpoints failed"
stop_serve

maps=()
for i in $(seq 0 20); do maps+=(-B "c$i"); done
for d in a b; do
  start_serve -r -f qcow2 -x "$d" "${maps[@]}" "$T/$d.qcow2"
  for i in $(seq 0 20); do
    nbdinfo --json --map=qemu:dirty-bitmap:c$i "$SERVE_URI" >"$T/$d.c$i.json" || fail "nbdinfo $d c$i"
  done
  stop_serve
  qemu-nbd -r -t -f qcow2 -x "$d" "${maps[@]}" -k "$T/q.sock" --pid-file "$T/q.pid" "$T/$d.qcow2" &
  qpid=$!
  cleanup_fn "kill $qpid 2>/dev/null"
  for _ in $(seq 200); do [[ -s $T/q.pid ]] && break; sleep 0.05; done
  for i in $(seq 0 20); do
    nbdinfo --json --map=qemu:dirty-bitmap:c$i "nbd+unix:///$d?socket=$T/q.sock" >"$T/$d.q$i.json" || fail "qemu-nbd $d c$i"
  done
  kill $qpid; wait $qpid 2>/dev/null; rm -f "$T/q.pid"
  qemu-img check -q "$T/$d.qcow2" || fail "qemu-img check $d"
done
# qemu-nbd -B reads the same bitmaps as the qnbd restart.
python3 - "$T" <<'PY' || fail "qemu-nbd -B and qnbd disagree on a checkpoint bitmap"
import json, sys
def runs(path):
    out = []
    for e in json.load(open(path)):
        d = e["type"] & 1
        if out and out[-1][1] == d: out[-1][0] += e["length"]
        else: out.append([e["length"], d])
    return out
bad = [f"{d} c{i}" for d in "ab" for i in range(21)
       if runs(f"{sys.argv[1]}/{d}.q{i}.json") != runs(f"{sys.argv[1]}/{d}.c{i}.json")]
sys.exit(f"differ: {bad}" if bad else 0)
PY
python3 "$INTEGRATION_DIR/check_checkpoints.py" "$T/log.json" "$T" a b || fail "checkpoint bitmaps do not match the writes"
echo "PASS"
