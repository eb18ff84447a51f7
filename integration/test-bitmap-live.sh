#!/usr/bin/env bash
# Live dirty tracking: the same writes (unaligned, zero writes, discards)
# sent over NBD to a writable `qnbd serve` and to `qemu-nbd` (with
# --discard=ignore and =unmap) must leave equal persistent bitmaps after a
# clean SIGTERM shutdown: no in-use flag, qemu-img check clean, the disabled
# bitmap untouched; while serving, qemu:dirty-bitmap shows the writes live.
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3
requires_qnbd

T=$TMPDIR_TEST
norm() { python3 "$INTEGRATION_DIR/map-norm.py" bitmap "$1"; }
writes=(-c 'write 1000 3000' -c 'write -z 5M 100k' -c 'discard 9M 64k' -c 'write 60M 1' -c 'write -z -u 20M 2M'
  -c 'write 67108352 512')

for mode in ignore unmap; do
  rm -f "$T"/q.qcow2 "$T"/m.qcow2
  qemu-img create -q -f qcow2 "$T/q.qcow2" 64M
  qemu-img bitmap --add "$T/q.qcow2" en
  qemu-img bitmap --add -g 512 "$T/q.qcow2" fine
  qemu-img bitmap --add --disable "$T/q.qcow2" off
  cp "$T/q.qcow2" "$T/m.qcow2"
  start_server "$T/q.pid" qemu-nbd -t --discard=$mode -f qcow2 -k "$T/q.sock" --pid-file "$T/q.pid" "$T/q.qcow2" ||
    fail "qemu-nbd did not start"
  qpid=$SERVER_PID
  start_server "$T/m.pid" "$QNBD" serve -t --discard=$mode -B fine -f qcow2 -k "$T/m.sock" --pid-file "$T/m.pid" \
    "$T/m.qcow2" || fail "qnbd serve (writable) did not start"
  mpid=$SERVER_PID
  # Before any write the enabled bitmaps are in use on disk for both
  # servers (qemu marks them when it opens the image for writing). qemu
  # marks the disabled one too; qnbd never changes a disabled bitmap while
  # serving, so it stays consistent on disk (and usable after a crash).
  for s in q m; do
    qemu-img info -U --output=json "$T/$s.qcow2" 2>/dev/null | python3 -c '
import json, sys
flags = {b["name"]: b["flags"] for b in json.load(sys.stdin)["format-specific"]["data"]["bitmaps"]}
ok = "in-use" in flags["en"] and "in-use" in flags["fine"]
if sys.argv[1] == "m": ok = ok and "in-use" not in flags["off"]
sys.exit(0 if ok else 1)' "$s" ||
      fail "$s: enabled bitmaps not in use (or qnbd marked the disabled one) before the first write"
  done
  for s in q m; do
    qemu-io -f raw "${writes[@]}" "nbd+unix:///?socket=$T/$s.sock" >/dev/null || fail "qemu-io over NBD ($s) failed"
  done
  # Live: the exported bitmap already shows the writes, and is in use on disk.
  nbdinfo --json --map=qemu:dirty-bitmap:fine "nbd+unix:///?socket=$T/m.sock" >"$T/live.json"
  [[ $(norm "$T/live.json") == *dirty* ]] || fail "live bitmap shows no dirty run"
  [[ $(qemu-img info -U "$T/m.qcow2") == *in-use* ]] || fail "enabled bitmaps not marked in-use while serving"
  stop_server "$qpid" || fail "qemu-nbd did not stop cleanly"
  stop_server "$mpid" || fail "qnbd serve did not stop cleanly"
  qemu-img check -q "$T/m.qcow2" || fail "discard=$mode: qemu-img check not clean after qnbd serve"
  if [[ $(qemu-img info "$T/m.qcow2") == *in-use* ]]; then fail "discard=$mode: in-use left after a clean stop"; fi
  for b in en fine off; do
    "$QNBD" map --bitmap $b --output=json "$T/q.qcow2" >"$T/q.json"
    "$QNBD" map --bitmap $b --output=json "$T/m.qcow2" >"$T/m.json"
    diff -u <(norm "$T/q.json") <(norm "$T/m.json") || fail "discard=$mode: bitmap $b differs from qemu-nbd's"
    cp "$T/m.json" "$T/stored.$b.json"
  done
  diff -u <(norm "$T/live.json") <(norm "$T/stored.fine.json") >/dev/null ||
    fail "discard=$mode: stored bitmap fine differs from what was served live"
  if grep -q true "$T/stored.off.json"; then fail "disabled bitmap off recorded writes"; fi
done
echo PASS
