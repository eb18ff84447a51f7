#!/usr/bin/env bash
# qnbd serve --config with several exports on TCP 127.0.0.1: nbd-client -l
# lists every export name, and nbdinfo --list --json shows the names, sizes,
# flags, block sizes and contexts each export was configured with; the fields
# qemu-nbd also reports are compared with qemu-nbd serving the same image
# with the same settings.
source "$(dirname "$0")/lib-serve.sh"
requires nbdinfo nbd-client qemu-nbd qemu-img python3

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

qemu-img create -q -f raw "$TMPDIR_TEST/a.raw" 3M
qemu-img create -q -f qcow2 "$TMPDIR_TEST/b.qcow2" 64M
qemu-img create -q -f raw "$TMPDIR_TEST/c.raw" 1G
port=$(free_port)
cat >"$TMPDIR_TEST/qnbd.json" <<JSON
{
  "exports": [
    { "name": "alpha", "image": "a.raw", "format": "raw", "description": "first disk" },
    { "name": "beta", "image": "b.qcow2", "format": "qcow2", "read_only": true, "allocation_depth": true },
    { "name": "gamma", "image": "c.raw", "format": "raw", "discard": "unmap" }
  ],
  "listeners": [ { "type": "tcp", "host": "127.0.0.1", "port": $port } ]
}
JSON
"$QNBD" serve --config "$TMPDIR_TEST/qnbd.json" --pid-file "$TMPDIR_TEST/cfg.pid" 2>"$TMPDIR_TEST/cfg.log" &
cpid=$!
cleanup_fn "kill -9 $cpid 2>/dev/null"
st=0
wait_ready -s "$TMPDIR_TEST/cfg.pid" $cpid || st=$?
((st != 2)) || { cat "$TMPDIR_TEST/cfg.log"; fail "config server exited"; }
((st == 0)) || fail "config server did not start"

# nbd-client's own list (NBD_OPT_LIST): one "name[: description]" per line,
# in file order.
nbd-client -l 127.0.0.1 "$port" >"$TMPDIR_TEST/nbd-client.list" 2>&1 ||
  { cat "$TMPDIR_TEST/nbd-client.list"; fail "nbd-client -l failed"; }
names=$(grep -E '^(alpha|beta|gamma)' "$TMPDIR_TEST/nbd-client.list" | sed 's/:.*//' | tr '\n' ' ')
expect_eq "$names" "alpha beta gamma " "nbd-client -l names"

nbdinfo --list --json "nbd://127.0.0.1:$port" >"$TMPDIR_TEST/list.json"

# The same exports from qemu-nbd, one server each (qemu-nbd has one export
# per process); --discard=unmap is what lets qemu-nbd advertise TRIM as
# effective, so gamma's twin gets it as well.
qemu_json() {
  local name=$1 sock=$TMPDIR_TEST/q-$1.sock
  shift
  start_server "$TMPDIR_TEST/q-$name.pid" qemu-nbd -t -k "$sock" --pid-file "$TMPDIR_TEST/q-$name.pid" -x "$name" "$@"
  nbdinfo --json "nbd+unix:///$name?socket=$sock" >"$TMPDIR_TEST/q-$name.json"
  kill "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
}
qemu_json alpha -f raw -D "first disk" "$TMPDIR_TEST/a.raw"
qemu_json beta -f qcow2 -r -A "$TMPDIR_TEST/b.qcow2"
qemu_json gamma -f raw --discard=unmap "$TMPDIR_TEST/c.raw"

python3 - "$TMPDIR_TEST" <<'PY' || fail "export list differs from expectations"
import json, os, sys
d = sys.argv[1]
got = {e["export-name"]: e for e in json.load(open(os.path.join(d, "list.json")))["exports"]}
assert list(got) == ["alpha", "beta", "gamma"], list(got)
expect = {
    "alpha": dict(size=3 << 20, ro=False, desc="first disk", ctx=["base:allocation"]),
    "beta": dict(size=64 << 20, ro=True, desc=None, ctx=["base:allocation", "qemu:allocation-depth"]),
    "gamma": dict(size=1 << 30, ro=False, desc=None, ctx=["base:allocation"]),
}
errors = []
for name, x in expect.items():
    e = got[name]
    if e["export-size"] != x["size"]: errors.append(f"{name}: size {e['export-size']}")
    if e["is_read_only"] != x["ro"]: errors.append(f"{name}: read-only {e['is_read_only']}")
    if e.get("description") != x["desc"]: errors.append(f"{name}: description {e.get('description')!r}")
    if e["contexts"] != x["ctx"]: errors.append(f"{name}: contexts {e['contexts']}")
    # Only writable exports zero and trim; FLUSH and FUA are advertised on
    # every export (as qemu-nbd does).
    for f, want in (("can_zero", not x["ro"]), ("can_trim", not x["ro"]), ("can_flush", True), ("can_fua", True)):
        if e.get(f) != want:
            errors.append(f"{name}: {f} {e.get(f)}")
    mn, pref, mx = e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]
    # proto.md "Size constraints": powers of two, min <= pref <= max, min <= 64 KiB.
    for v in (mn, pref):
        if v & (v - 1): errors.append(f"{name}: block size {v} not a power of two")
    if not (1 <= mn <= 65536 and mn <= pref <= mx): errors.append(f"{name}: block sizes {mn} {pref} {mx}")
    # Against qemu-nbd serving the same image with the same settings.
    q = json.load(open(os.path.join(d, f"q-{name}.json")))["exports"][0]
    for f in ("export-size", "is_read_only", "can_flush", "can_fua", "can_zero", "can_trim", "can_fast_zero",
              "can_df", "can_cache", "is_rotational", "block_size_minimum", "block_size_preferred",
              "block_size_maximum", "contexts", "description"):
        if e.get(f) != q.get(f):
            errors.append(f"{name}: {f}: qnbd {e.get(f)!r} qemu-nbd {q.get(f)!r}")
if errors:
    print("\n".join(errors))
    sys.exit(1)
PY

kill -TERM $cpid
wait $cpid || fail "config server exit status $?"
echo PASS
