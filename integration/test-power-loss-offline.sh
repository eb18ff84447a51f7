#!/usr/bin/env bash
# Power loss inside qnbd's offline commands: each `qnbd bitmap` edit (add,
# add --disable, remove, clear, enable, disable, merge) and `qnbd check -r
# leaks` / `-r all` on a leaky image, on 64 KiB and 4 KiB clusters, runs
# under the write-log shim of test-serve-power-loss.sh; at every record of
# its log (twice, torn differently) power_loss_offline.py rebuilds what a
# disk could hold and asks for a clean qemu-img check (leaks allowed), the
# guest data unchanged, and the bitmaps (qemu-img info's list, qemu-nbd
# -B's extents) exactly as before the command or as after it: an edit is
# atomic at a power loss. (qemu-img bitmap is not: run under the same
# judge, `qemu-img bitmap --add` lost every bitmap at its second record.)
# And edits (add, remove, disable) of an image a killed `qnbd serve` left
# with its write-intent record pending, which `qnbd bitmap` recovers
# first: each crash state, recovered by the next writable `qnbd serve`,
# must hold the bitmaps of the image recovered alone or recovered and
# edited, none in use, each one the writer had enabled marking its writes
# (an edit that retired the record unrecovered fails here).
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo cc
requires_qnbd
requires_python_nbd
here=$(cd "$(dirname "$0")" && pwd)
T=$TMPDIR_TEST

cc -shared -fPIC -O2 -o "$T/wlog.so" "$here/write_log_shim.c" -ldl || fail "cannot build the shim"
"$PY" "$here/power_loss_offline.py" "$QNBD" "$T/wlog.so" "$T/work" 1 2 >"$T/out" 2>&1 ||
  fail "$(cat "$T/out")"
cat "$T/out"
echo PASS
