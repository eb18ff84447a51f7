#!/usr/bin/env bash
# A live backup cycle through point-in-time views (issue: backup views):
# two exports written continuously by a seeded libnbd writer over two
# connections each; a full backup through the first views (c0) with
# nbdcopy, then 10 rounds (VIEW_ROUNDS) of `checkpoint --view` + incremental pull of
# qemu:dirty-bitmap:PREV from EXPORT@NEW + view-end. Each round's backup
# equals the disk at that checkpoint as the writer's log says
# (view_backup.py), and the images pass qemu-img check at the end.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img nbdcopy python3
requires_python_nbd

T=$TMPDIR_TEST
for d in a b; do qemu-img create -q -f qcow2 "$T/$d.qcow2" 16M; done
cat >"$T/server.json" <<JSON
{"exports": [{"name": "a", "image": "$T/a.qcow2", "format": "qcow2"},
             {"name": "b", "image": "$T/b.qcow2", "format": "qcow2"}],
 "control": "$T/ctl.sock"}
JSON
start_serve --config "$T/server.json"
"$PY" "$INTEGRATION_DIR/view_backup.py" "$QNBD" "$T/ctl.sock" "$SERVE_SOCK" "$T" "${VIEW_ROUNDS:-10}" a b ||
  fail "a backup through the views differs from the disk at its checkpoint"
"$QNBD" ctl -s "$T/ctl.sock" --output=json status | grep -q '"views":\[\]' || fail "views left after view-end"
stop_serve
for d in a b; do qemu-img check -q "$T/$d.qcow2" || fail "qemu-img check $d"; done
echo "PASS"
