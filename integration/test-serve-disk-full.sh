#!/usr/bin/env bash
# A host file system that fills up while clients write, side by side with
# qemu-nbd, and what qnbd does with its bitmaps afterwards.
#
# The image (qcow2, 32 MiB, with the enabled bitmap b0) lives on a tmpfs of
# 8 MiB, so about half the writes find no room. For each server:
#   - every failed request fails with ENOSPC, and the server keeps serving:
#     the same connection goes on, and every acknowledged block reads back;
#   - qemu-img check afterwards finds no corruption, and qnbd's image no
#     leaked cluster either (a failed allocation or bitmap store gives its
#     clusters back).
# Then qnbd only, the disk still full:
#   - `qnbd serve -B b0` starts on the image (it failed before: the recovery
#     of the bitmaps could not store them and refused the open) and
#     exports b0 dirty on every block a request touched;
# and once there is room again, a plain start and stop of qnbd stores b0
# consistent, and qemu-nbd -B b0 sees the same: no full backup needed.
# qemu-nbd's own image has lost b0 at that point ("Lost persistent bitmaps"),
# which the test only prints.
#
# Needs a tmpfs it can mount (root, outside most containers): skipped (77)
# otherwise.
source "$(dirname "$0")/lib-serve.sh"
requires_qnbd
requires qemu-nbd qemu-img
requires_python_nbd

[[ $(id -u) == 0 ]] || { echo "SKIP: $0: needs root to mount a small tmpfs"; exit 77; }
mnt=$TMPDIR_TEST/full
mkdir -p "$mnt"
if ! mount -t tmpfs -o size=8m tmpfs "$mnt" 2>/dev/null; then
  echo "SKIP: $0: cannot mount a tmpfs here"
  exit 77
fi
cleanup_fn umount -l "$mnt"

PYF=("$PY" "$INTEGRATION_DIR/disk_full.py")
OPS=${DISK_FULL_OPS:-240}
SEED=${DISK_FULL_SEED:-1}
URI="nbd+unix:///?socket=$TMPDIR_TEST/s.sock"
img=$mnt/disk.qcow2

fresh_image() {
  rm -rf "${mnt:?}"/*
  qemu-img create -q -f qcow2 "$img" 32M
  qemu-img bitmap --add "$img" b0
}

# check_errors TOOL STATS: at least one request failed, all with ENOSPC,
# and some succeeded.
check_errors() {
  local tool=$1 stats=$2
  "$PY" - "$tool" "$stats" <<'EOF'
import json, sys
tool, s = sys.argv[1], json.loads(sys.argv[2])
errs = s["errors"]
if not errs:
    sys.exit(f"{tool}: no request failed: the disk never filled")
if set(errs) != {"ENOSPC"}:
    sys.exit(f"{tool}: failures other than ENOSPC: {errs}")
if s["ok"] < 20:
    sys.exit(f"{tool}: only {s['ok']} requests succeeded")
EOF
}

# stop_qnbd PID: SIGTERM; exit 0, or 1 when storing the bitmaps at close
# found no room (said in the log, and the write-intent record then stays).
stop_qnbd() {
  local pid=$1 status=0
  kill -TERM "$pid"
  wait "$pid" || status=$?
  unset "_live_servers[$pid]"
  if ((status == 1)); then
    grep -q "closing export.*No space left on device" "$TMPDIR_TEST/server.log" ||
      fail "qnbd exited 1 after SIGTERM, not for a full disk: $(tail -n 3 "$TMPDIR_TEST/server.log")"
    [[ -f $img.qnbd-intent ]] || fail "qnbd could not store b0 and left no write-intent record"
  elif ((status != 0)); then
    fail "qnbd exited with status $status after SIGTERM"
  fi
}

for tool in qemu-nbd qnbd; do
  fresh_image
  : >"$TMPDIR_TEST/server.log"
  start_tool "$tool" -f qcow2 "$img"
  pid=$SERVER_PID
  stats=$("${PYF[@]}" fill "$URI" "$SEED" "$OPS" "$TMPDIR_TEST/model.$tool") || fail "$tool: the client failed: $stats"
  echo "$tool: $stats"
  check_errors "$tool" "$stats"
  "${PYF[@]}" verify "$URI" "$TMPDIR_TEST/model.$tool" || fail "$tool: acknowledged data lost on a full disk"
  if [[ $tool == qemu-nbd ]]; then
    stop_server "$pid" || fail "qemu-nbd did not stop cleanly"
  else
    stop_qnbd "$pid"
  fi
  st=0
  qemu-img check -q "$img" >"$TMPDIR_TEST/check.$tool" 2>&1 || st=$?
  if [[ $tool == qnbd ]]; then
    ((st == 0)) || fail "qnbd: qemu-img check exit $st after a full disk: $(head -n 5 "$TMPDIR_TEST/check.$tool")"
  else
    ((st == 0 || st == 3)) || fail "qemu-nbd: qemu-img check exit $st: $(head -n 5 "$TMPDIR_TEST/check.$tool")"
    echo "qemu-nbd: b0 afterwards: $(qemu-img info "$img" | grep -c in-use) in-use flag(s)"
  fi
done

# qnbd again on the full disk: it must start, serve what was acknowledged,
# and export b0 with every touched block dirty.
: >"$TMPDIR_TEST/server.log"
start_tool qnbd -f qcow2 -B b0 "$img"
pid=$SERVER_PID
"${PYF[@]}" verify "$URI" "$TMPDIR_TEST/model.qnbd" || fail "qnbd: data lost across the restart on a full disk"
"${PYF[@]}" dirty "$URI" b0 "$TMPDIR_TEST/model.qnbd" || fail "qnbd: b0 lost a change on a full disk"
stop_qnbd "$pid"

# Room again: a start and stop stores b0; qemu-nbd exports it, complete.
mount -o remount,size=64m "$mnt" || fail "cannot grow the tmpfs"
: >"$TMPDIR_TEST/server.log"
start_tool qnbd -f qcow2 "$img"
stop_server "$SERVER_PID" || fail "qnbd did not store b0 once there was room: $(tail -n 3 "$TMPDIR_TEST/server.log")"
[[ ! -e $img.qnbd-intent ]] || fail "the write-intent record is still there after a clean store"
qemu-img check -q "$img" || fail "qemu-img check after the store"
if qemu-img info "$img" | grep -q in-use; then fail "b0 is still in-use after qnbd stored it"; fi
start_tool qemu-nbd -r -f qcow2 -B b0 "$img"
"${PYF[@]}" dirty "$URI" b0 "$TMPDIR_TEST/model.qnbd" || fail "qemu-nbd: b0 as stored by qnbd lost a change"
stop_server "$SERVER_PID" || fail "qemu-nbd did not stop cleanly"
echo "PASS: $0"
