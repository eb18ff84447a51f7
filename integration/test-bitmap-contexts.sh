#!/usr/bin/env bash
# qemu:dirty-bitmap:NAME as a backup tool meets it, side by side with
# qemu-nbd: NBD_OPT_LIST_META_CONTEXT answers to the "qemu:" and
# "qemu:dirty-bitmap:" queries and to exact names; one BLOCK_STATUS
# carrying base:allocation, qemu:allocation-depth and two bitmaps, with and
# without REQ_ONE, at many offsets: every reply equals qemu-nbd's. Then the
# same bitmaps offered through a --config file's `bitmaps` list.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo
requires_qnbd
requires_python_nbd

img=$TMPDIR_TEST/disk.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -P 1 0 1M' "$img" >/dev/null
qemu-img bitmap --add "$img" b0
qemu-img bitmap --add -g 4k "$img" fine
qemu-io -f qcow2 -c 'write -P 2 3M 100k' -c 'write -z 9M 1M' -c 'write -P 3 17M 5000' \
  -c 'discard 0 64k' -c 'write -P 4 63M 1M' "$img" >/dev/null
qemu-img bitmap --add --disable "$img" cold

qsock=$TMPDIR_TEST/qemu.sock
qemu-nbd -r -t -A -B b0 -B fine -k "$qsock" -f qcow2 "$img" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null"
wait_ready -S "$qsock" $qpid || fail "qemu-nbd did not start"
start_serve -r -A -B b0 -B fine -f qcow2 "$img"

# probe URI OUT: every answer this test compares, as JSON.
probe() {
  "$PY" - "$1" "$2" <<'PY' || fail "probe of $1 failed"
import json, nbd, sys
uri, out = sys.argv[1], sys.argv[2]
res = {}
def listing(queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    got = []
    h.opt_list_meta_context(lambda name: got.append(name) or 0)
    h.opt_abort()
    return got  # in the server's order: qemu-nbd lists -B bitmaps last first
for qs in (["qemu:"], ["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:fine"], ["qemu:dirty-bitmap:nope"],
           ["base:"], ["qemu:dirty-bitmap:cold"], []):
    res["list " + ",".join(qs)] = listing(qs)
h = nbd.NBD()
ctxs = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:fine"]
for c in ctxs:
    h.add_meta_context(c)
h.add_meta_context("qemu:dirty-bitmap:nope")  # not offered: simply not negotiated
h.connect_uri(uri)
res["negotiated"] = [c for c in ctxs + ["qemu:dirty-bitmap:nope"] if h.can_meta_context(c)]
size = h.get_size()
for off in (0, 4096, 65536, 3 << 20, (3 << 20) + 100000, 9 << 20, (17 << 20) + 4000, 40 << 20, size - 4096):
    for flags in (0, nbd.CMD_FLAG_REQ_ONE):
        got = {}
        order = []
        def cb(meta, offset, entries, err):
            got.setdefault(meta, []).append([offset, list(entries)])
            order.append(meta)
            return 0
        h.block_status(min(8 << 20, size - off), off, cb, flags)
        res[f"status {off} {flags}"] = got
        res[f"chunk order {off} {flags}"] = order
json.dump(res, open(out, "w"), indent=1, sort_keys=True)
print(len(res), "answers")
PY
}
probe "nbd+unix:///?socket=$qsock" "$TMPDIR_TEST/qemu.json"
probe "$SERVE_URI" "$TMPDIR_TEST/qnbd.json"
diff -u "$TMPDIR_TEST/qemu.json" "$TMPDIR_TEST/qnbd.json" || fail "answers differ from qemu-nbd's"
# The answers must hold something to compare: both bitmaps listed and dirty
# extents reported.
grep -q '"qemu:dirty-bitmap:fine"' "$TMPDIR_TEST/qnbd.json" || fail "bitmap context not listed"
stop_serve
kill $qpid; wait $qpid 2>/dev/null || true

# The same bitmaps through a config file's per-export `bitmaps` list, whose
# order is kept (as QMP's block-export-add keeps it): given as qemu-nbd's
# command line above ends up ordering them.
cat >"$TMPDIR_TEST/qnbd.json.conf" <<JSON
{
  "exports": [ { "name": "", "image": "$img", "format": "qcow2", "read_only": true,
                 "allocation_depth": true, "bitmaps": ["fine", "b0"] } ],
  "listeners": [ { "type": "unix", "path": "$TMPDIR_TEST/cfg.sock" } ]
}
JSON
"$QNBD" serve -t --config "$TMPDIR_TEST/qnbd.json.conf" --pid-file "$TMPDIR_TEST/cfg.pid" 2>"$TMPDIR_TEST/cfg.log" &
cpid=$!
cleanup_fn "kill -9 $cpid 2>/dev/null"
wait_ready -s "$TMPDIR_TEST/cfg.pid" $cpid || true
[[ -s $TMPDIR_TEST/cfg.pid ]] || { cat "$TMPDIR_TEST/cfg.log" >&2; fail "config server did not start"; }
probe "nbd+unix:///?socket=$TMPDIR_TEST/cfg.sock" "$TMPDIR_TEST/cfg.json"
diff -u "$TMPDIR_TEST/qemu.json" "$TMPDIR_TEST/cfg.json" || fail "config-file export answers differ from qemu-nbd's"
kill -TERM $cpid
wait $cpid || fail "config server exit status $?"
echo PASS
