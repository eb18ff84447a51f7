#!/usr/bin/env bash
# Point-in-time views (issue: backup views): two overlapping views of one
# export are each exact; a view whose scratch cap (--view-scratch-max) is
# hit fails (EIO to its reader, `status` says why) while the writer goes
# on and the other view stays exact; view-end with a reader connected
# (view_cases.py). Then a SIGKILL with live views: the scratch files were
# never visible in the scratch directory, a stale one of a crashed
# fallback is removed at the next start, and the image passes qemu-img
# check.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io python3
requires_python_nbd

T=$TMPDIR_TEST
qemu-img create -q -f qcow2 "$T/a.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' "$T/a.qcow2" >/dev/null
start_serve -e 8 --control "$T/ctl.sock" --view-scratch-max 1048576 -x a "$T/a.qcow2"
"$PY" "$INTEGRATION_DIR/view_cases.py" "$QNBD" "$T/ctl.sock" "$SERVE_SOCK" || fail "view cases"
stop_serve

# SIGKILL with live views.
mkdir "$T/scratch"
start_serve --control "$T/ctl.sock" --view-scratch-dir "$T/scratch" -x a "$T/a.qcow2"
"$QNBD" ctl -s "$T/ctl.sock" checkpoint --name k1 --view a >/dev/null || fail "checkpoint k1"
"$QNBD" ctl -s "$T/ctl.sock" checkpoint --name k2 --disable k1 --view a >/dev/null || fail "checkpoint k2"
qemu-io -f raw -c 'write -P 0x66 0 2M' "$SERVE_URI" >/dev/null || fail "write"
used=$("$QNBD" ctl -s "$T/ctl.sock" --output=json status |
       python3 -c 'import json,sys; print(sum(v["scratch_bytes"] for e in json.load(sys.stdin)["result"]["exports"] for v in e["views"]))')
expect_eq "$used" 4194304 "scratch in use by the two views"
# The scratch lives in the directory, open but nameless.
n=$(ls -l /proc/"$SERVE_PID"/fd | grep -c "$T/scratch") || true
[[ $n -ge 2 ]] || fail "expected the views' scratch files open in $T/scratch, found $n"
[[ -z $(ls -A "$T/scratch") ]] || fail "scratch files are visible: $(ls -A "$T/scratch")"
kill -KILL "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=
# What a crash of the named-file fallback between create and unlink leaves.
read -r dev ino < <(stat -c '%d %i' "$T/a.qcow2")
stale=$(printf '%s/a.qcow2.qnbd-view-%x-%x-Xy12Ab.scratch' "$T/scratch" "$dev" "$ino")
echo junk >"$stale"
echo keep >"$T/scratch/other.scratch"
start_serve --control "$T/ctl.sock" --view-scratch-dir "$T/scratch" -x a "$T/a.qcow2"
[[ ! -e $stale ]] || fail "the stale scratch file was not removed at start"
[[ -e $T/scratch/other.scratch ]] || fail "a file that is not this image's scratch was removed"
"$QNBD" ctl -s "$T/ctl.sock" --output=json status | grep -q '"views":\[\]' || fail "views survived the restart"
stop_serve
qemu-img check -q "$T/a.qcow2" || fail "qemu-img check after the crash"
qemu-io -f qcow2 -r -c 'read -P 0x66 0 2M' "$T/a.qcow2" >/dev/null || fail "the writes before the crash are lost"
echo "PASS"
