#!/usr/bin/env bash
# qemu:dirty-bitmap:NAME served by qnbd -B must match qemu-nbd -B exactly
# (nbdinfo --map output) for a default- and a 1 MiB-granularity bitmap, and
# the server must start with both exported and list their contexts.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo

img=$TMPDIR_TEST/bm.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-img bitmap --add "$img" b0
qemu-img bitmap --add -g 1M "$img" coarse
qemu-io -f qcow2 -c 'write -P 1 1M 64k' -c 'write -P 2 5M 1M' -c 'write -P 3 15M 4k' "$img" >/dev/null

qsock=$TMPDIR_TEST/qemu.sock
qemu-nbd -r -t -B b0 -B coarse -k "$qsock" -f qcow2 "$img" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null"
wait_ready -S "$qsock" $qpid || fail "qemu-nbd did not start"
for b in b0 coarse; do
  nbdinfo --map=qemu:dirty-bitmap:$b "nbd+unix:///?socket=$qsock" >"$TMPDIR_TEST/qemu.$b"
done
kill $qpid; wait $qpid 2>/dev/null || true

# The server must start with both bitmaps exported.
"$QNBD" serve -r -B b0 -B coarse -f qcow2 -k "$TMPDIR_TEST/probe.sock" --pid-file "$TMPDIR_TEST/probe.pid" \
  "$img" 2>"$TMPDIR_TEST/probe.log" &
ppid=$!
cleanup_fn "kill -9 $ppid 2>/dev/null"
wait_ready -s "$TMPDIR_TEST/probe.pid" $ppid || true
if ! kill -0 $ppid 2>/dev/null; then
  cat "$TMPDIR_TEST/probe.log" >&2
  fail "qnbd serve -B failed"
fi
kill $ppid; wait $ppid 2>/dev/null || true

start_serve -r -B b0 -B coarse -f qcow2 "$img"
for b in b0 coarse; do
  nbdinfo --map=qemu:dirty-bitmap:$b "$SERVE_URI" >"$TMPDIR_TEST/qnbd.$b"
  diff -u "$TMPDIR_TEST/qemu.$b" "$TMPDIR_TEST/qnbd.$b" || fail "bitmap $b map differs from qemu-nbd"
done
nbdinfo --json "$SERVE_URI" | grep -q 'qemu:dirty-bitmap:coarse' || fail "context not listed"
stop_serve
echo PASS
