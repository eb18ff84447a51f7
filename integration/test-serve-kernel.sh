#!/usr/bin/env bash
# Kernel client: nbd-client -N attaches a qnbd export to /dev/nbdX; data read
# through the block device equals the image, a write lands in the image.
# Needs root and the nbd module; skipped (77) otherwise, e.g. in containers.
source "$(dirname "$0")/lib-serve.sh"
requires nbd-client modprobe cmp
[[ $(id -u) == 0 ]] || { echo "SKIP: $0: needs root"; exit 77; }
modprobe nbd 2>/dev/null || { echo "SKIP: $0: modprobe nbd failed"; exit 77; }
[[ -b /dev/nbd0 ]] || { echo "SKIP: $0: no /dev/nbd0"; exit 77; }
dev=
for d in /dev/nbd{0..15}; do
  [[ -b $d ]] || continue
  if ! nbd-client -c "$d" >/dev/null 2>&1; then dev=$d; break; fi
done
[[ -n $dev ]] || { echo "SKIP: $0: no free nbd device"; exit 77; }

head -c 8M /dev/urandom >"$TMPDIR_TEST/disk.raw"
cp "$TMPDIR_TEST/disk.raw" "$TMPDIR_TEST/orig.raw"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$QNBD" serve -f raw -x disk -b 127.0.0.1 -p "$port" -t --pid-file "$TMPDIR_TEST/k.pid" \
  "$TMPDIR_TEST/disk.raw" 2>"$TMPDIR_TEST/k.log" &
kpid=$!
cleanup_fn "kill -9 $kpid 2>/dev/null"
wait_ready -s "$TMPDIR_TEST/k.pid" $kpid || { cat "$TMPDIR_TEST/k.log" >&2; fail "qnbd serve did not start"; }
nbd-client -N disk 127.0.0.1 "$port" "$dev" -b 4096 || fail "nbd-client attach"
cleanup_fn "nbd-client -d $dev >/dev/null 2>&1"
cmp -n $((8 << 20)) "$dev" "$TMPDIR_TEST/orig.raw" || fail "kernel read differs"
head -c 1M /dev/urandom >"$TMPDIR_TEST/patch"
dd if="$TMPDIR_TEST/patch" of="$dev" bs=1M seek=2 oflag=direct conv=fsync status=none
nbd-client -d "$dev" || fail "nbd-client detach"
kill -TERM $kpid
wait $kpid || fail "server exit status $?"
cmp -n $((1 << 20)) "$TMPDIR_TEST/patch" <(tail -c +$((2 * 1048576 + 1)) "$TMPDIR_TEST/disk.raw") ||
  fail "kernel write not in the image"
echo PASS
