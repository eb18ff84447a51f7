#!/usr/bin/env bash
# Read-only qcow2 (with a backing file) served by qnbd and by qemu-nbd: the
# same contents, the same base:allocation and qemu:allocation-depth maps, the
# same nbdinfo view.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy python3 cmp

base=$TMPDIR_TEST/base.qcow2
top=$TMPDIR_TEST/top.qcow2
qemu-img create -q -f qcow2 "$base" 16M
qemu-io -f qcow2 -c 'write -P 1 0 2M' -c 'write -P 2 6M 1M' "$base" >/dev/null
qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$top"
qemu-io -f qcow2 -c 'write -P 3 1M 2M' -c 'write -z 6M 512k' -c 'write -P 4 12M 64k' "$top" >/dev/null

qsock=$TMPDIR_TEST/qemu.sock
qemu-nbd -r -t -A -k "$qsock" -f qcow2 "$top" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null"
wait_ready -S "$qsock" $qpid || fail "qemu-nbd did not start"
quri="nbd+unix:///?socket=$qsock"
nbdinfo --map "$quri" >"$TMPDIR_TEST/qemu.map"
nbdinfo --map=qemu:allocation-depth "$quri" >"$TMPDIR_TEST/qemu.depth"
nbdinfo --json "$quri" | python3 -c 'import json,sys; d=json.load(sys.stdin)["exports"][0]; d.pop("uri"); print(json.dumps(d, sort_keys=True))' >"$TMPDIR_TEST/qemu.json"
nbdcopy "$quri" "$TMPDIR_TEST/qemu.raw"
kill $qpid; wait $qpid 2>/dev/null || true

start_serve -r -A -f qcow2 "$top" || fail "cannot serve qcow2"
nbdinfo --map "$SERVE_URI" >"$TMPDIR_TEST/qnbd.map"
nbdinfo --map=qemu:allocation-depth "$SERVE_URI" >"$TMPDIR_TEST/qnbd.depth"
nbdinfo --json "$SERVE_URI" | python3 -c 'import json,sys; d=json.load(sys.stdin)["exports"][0]; d.pop("uri"); print(json.dumps(d, sort_keys=True))' >"$TMPDIR_TEST/qnbd.json"
nbdcopy "$SERVE_URI" "$TMPDIR_TEST/qnbd.raw"
stop_serve

cmp "$TMPDIR_TEST/qemu.raw" "$TMPDIR_TEST/qnbd.raw" || fail "contents differ from qemu-nbd"
diff -u "$TMPDIR_TEST/qemu.json" "$TMPDIR_TEST/qnbd.json" || fail "nbdinfo --json differs"
diff -u "$TMPDIR_TEST/qemu.map" "$TMPDIR_TEST/qnbd.map" || fail "base:allocation map differs"
diff -u "$TMPDIR_TEST/qemu.depth" "$TMPDIR_TEST/qnbd.depth" || fail "allocation-depth map differs"
echo PASS
