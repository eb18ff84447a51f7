#!/usr/bin/env bash
# qnbd serve on a raw image, checked with the real clients: nbdinfo (flags and
# sizes identical to qemu-nbd's on the same image), nbdcopy round trips,
# qemu-io over NBD, and a clean SIGTERM exit.
source "$(dirname "$0")/lib-serve.sh"
requires nbdinfo nbdcopy qemu-io qemu-nbd python3 cmp

img=$TMPDIR_TEST/disk.img
head -c 4M /dev/urandom >"$img"
truncate -s 32M "$img"
head -c 1M /dev/urandom | dd of="$img" bs=1M seek=20 conv=notrunc status=none

# Same image through qemu-nbd, as the reference for what clients see.
qsock=$TMPDIR_TEST/qemu.sock
qemu-nbd -t -k "$qsock" -f raw -x disk -D "a test disk" "$img" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null"
wait_ready -S "$qsock" $qpid || fail "qemu-nbd did not start"
nbdinfo --json "nbd+unix:///disk?socket=$qsock" | python3 -c 'import json,sys; d=json.load(sys.stdin)["exports"][0]; d.pop("uri"); print(json.dumps(d, sort_keys=True))' >"$TMPDIR_TEST/qemu.json"
nbdinfo --map "nbd+unix:///disk?socket=$qsock" >"$TMPDIR_TEST/qemu.map"
kill $qpid; wait $qpid 2>/dev/null || true

start_serve -f raw -x disk -D "a test disk" "$img"
nbdinfo --json "$SERVE_URI" | python3 -c 'import json,sys; d=json.load(sys.stdin)["exports"][0]; d.pop("uri"); print(json.dumps(d, sort_keys=True))' >"$TMPDIR_TEST/qnbd.json"
diff -u "$TMPDIR_TEST/qemu.json" "$TMPDIR_TEST/qnbd.json" || fail "nbdinfo --json differs from qemu-nbd"
nbdinfo --map "$SERVE_URI" >"$TMPDIR_TEST/qnbd.map"
diff -u "$TMPDIR_TEST/qemu.map" "$TMPDIR_TEST/qnbd.map" || fail "nbdinfo --map differs from qemu-nbd"

# --list shows the export with its description.
nbdinfo --list --json "nbd+unix:///?socket=$SERVE_SOCK" >"$TMPDIR_TEST/list.json"
python3 - "$TMPDIR_TEST/list.json" <<'PY' || fail "nbdinfo --list"
import json, sys
d = json.load(open(sys.argv[1]))
names = [(e["export-name"], e.get("description")) for e in d["exports"]]
assert names == [("disk", "a test disk")], names
PY

# Read everything back.
nbdcopy "$SERVE_URI" "$TMPDIR_TEST/copy.img"
cmp "$img" "$TMPDIR_TEST/copy.img" || fail "nbdcopy read differs"

# Write a new image through the server and compare.
head -c 32M /dev/urandom >"$TMPDIR_TEST/new.img"
nbdcopy "$TMPDIR_TEST/new.img" "$SERVE_URI"
cmp "$TMPDIR_TEST/new.img" "$img" || fail "nbdcopy write differs"

# qemu-io: pattern writes, zeroes, discard, flush; verify through NBD.
qemu-io -f raw "$SERVE_URI" \
  -c 'write -P 0xa5 0 1M' -c 'write -z 1M 1M' -c 'write -P 0x11 -f 2M 64k' -c 'discard 4M 1M' -c flush \
  -c 'read -P 0xa5 0 1M' -c 'read -P 0 1M 1M' -c 'read -P 0x11 2M 64k' >"$TMPDIR_TEST/qio.out" \
  || fail "qemu-io over NBD failed"
grep -q 'Pattern verification failed' "$TMPDIR_TEST/qio.out" && fail "qemu-io pattern mismatch"
stop_serve
# And on the file itself after the server exited.
qemu-io -f raw -c 'read -P 0xa5 0 1M' -c 'read -P 0 1M 1M' -c 'read -P 0x11 2M 64k' "$img" \
  >"$TMPDIR_TEST/qio2.out"
grep -q 'Pattern verification failed' "$TMPDIR_TEST/qio2.out" && fail "data not on disk after exit"

# Read-only export refuses writes.
start_serve -r -f raw "$img"
if qemu-io -f raw "$SERVE_URI" -c 'write 0 4k' 2>/dev/null | grep -q wrote; then fail "write on -r export"; fi
stop_serve
echo PASS
