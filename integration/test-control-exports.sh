#!/usr/bin/env bash
# Hot add and remove of exports through the control socket
# (docs/control.md "export-add", "export-remove"), while a libnbd client
# keeps writing and verifying export `a` throughout:
# - export-add b (qcow2 with an enabled bitmap, -B it) by absolute path:
#   nbdcopy reads what qemu-img reads, and its qemu:dirty-bitmap map is
#   qemu-nbd -B's on a copy; status lists it with its connections;
# - export-remove b while a client holds a connection to it: busy, nothing
#   changes; with --force that client's connection ends, and then the image
#   is closed: qemu-img info shows the bitmap without in-use, qemu-img
#   check is clean, qemu-io opens it for writing; re-adding b serves that;
# - export-add c by a path relative to the server's working directory
#   (not ctl's); duplicates, a missing image, a bad format, an unknown
#   bitmap, an image already served, removing what is not there: each its
#   error code, and the server keeps serving (the writer never fails; the
#   server exits 0 on SIGTERM).
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy
requires_python_nbd

T=$TMPDIR_TEST
CTL=$T/ctl.sock
mkdir "$T/sub"
qemu-img create -q -f qcow2 "$T/a.qcow2" 16M
qemu-img create -q -f qcow2 "$T/b.qcow2" 16M
qemu-io -c 'write -P 5 0 1M' -c 'write -P 6 6M 128k' "$T/b.qcow2" >/dev/null
qemu-img bitmap --add "$T/b.qcow2" bm
qemu-io -c 'write -P 7 3M 64k' -c 'write -P 8 9M 4k' "$T/b.qcow2" >/dev/null
qemu-img bitmap --add "$T/b.qcow2" other
cp "$T/b.qcow2" "$T/b0.qcow2"  # the twin qemu-nbd reads
qemu-img convert -O raw "$T/b.qcow2" "$T/b.ref"
qemu-img create -q -f raw "$T/sub/c.raw" 4M
qemu-io -f raw -c 'write -P 9 0 4M' "$T/sub/c.raw" >/dev/null
printf 'not an image' >"$T/notqcow2"

# The server's working directory is $T: relative IMAGE paths mean $T/...
cd "$T"
start_serve -e 0 -x a -f qcow2 --control "$CTL" "$T/a.qcow2"
cd /

# ctl_code ARGS...: the error code of a refused command ("ok" if it worked).
ctl_code() {
  local out
  out=$("$QNBD" ctl -s "$CTL" --output=json "$@" 2>/dev/null) || true
  "$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["error"]["code"] if "error" in r else "ok")' "$out"
}
uri() { echo "nbd+unix:///$1?socket=$SERVE_SOCK"; }

# ---- the writer on a: seeded writes, each read back, until told to stop
"$PY" - "$(uri a)" "$T/writer" <<'PY' &
import nbd, os, random, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rng = random.Random(7); n = 0
while not os.path.exists(sys.argv[2] + ".stop"):
    off = rng.randrange(0, 16 << 20, 4096); buf = bytes([n % 251 + 1]) * 4096
    h.pwrite(buf, off)
    if h.pread(4096, off) != buf: sys.exit("read back differs at %d" % off)
    n += 1
    if n % 50 == 0:
        with open(sys.argv[2] + ".tmp", "w") as f: f.write(str(n))
        os.replace(sys.argv[2] + ".tmp", sys.argv[2])
h.shutdown()
PY
writer=$!
cleanup_fn "kill $writer 2>/dev/null"
progress() { cat "$T/writer" 2>/dev/null || echo 0; }
# writer_moves WHAT: the writer completes more requests from now on.
writer_moves() {
  local before i
  before=$(progress)
  for i in $(seq 200); do
    (($(progress) > before)) && return 0
    kill -0 $writer 2>/dev/null || fail "the writer on a died ($1)"
    sleep 0.05
  done
  fail "the writer on a made no progress ($1)"
}
writer_moves "start"

# ---- export-add b by absolute path, with its bitmap
expect_eq "$(ctl_code export-add b "$T/b.qcow2" -f qcow2 -B bm)" ok "export-add b"
nbdcopy "$(uri b)" "$T/b.got"
cmp "$T/b.ref" "$T/b.got" || fail "export b reads other data than qemu-img"
nbdinfo --json --map=qemu:dirty-bitmap:bm "$(uri b)" >"$T/live.map"
qemu-nbd -r -t -f qcow2 -B bm -k "$T/q.sock" --pid-file "$T/q.pid" "$T/b0.qcow2" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null"
for _ in $(seq 200); do [[ -s $T/q.pid ]] && break; sleep 0.05; done
nbdinfo --json --map=qemu:dirty-bitmap:bm "nbd+unix:///?socket=$T/q.sock" >"$T/ref.map"
kill $qpid; wait $qpid 2>/dev/null || true
expect_eq "$("$PY" "$INTEGRATION_DIR/map-norm.py" bitmap "$T/live.map")" \
  "$("$PY" "$INTEGRATION_DIR/map-norm.py" bitmap "$T/ref.map")" "qemu:dirty-bitmap:bm of b, qnbd vs qemu-nbd"
writer_moves "after export-add"

# ---- a client holds a connection to b, reading
"$PY" - "$(uri b)" "$T/holder" <<'PY' &
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
open(sys.argv[2], "w").write("connected")
end = time.time() + 30
try:
    while time.time() < end:
        h.pread(65536, 0); time.sleep(0.01)
except nbd.Error as e:
    open(sys.argv[2], "w").write("ended")
    sys.exit(0)
sys.exit("the connection to b was never closed")
PY
holder=$!
cleanup_fn "kill $holder 2>/dev/null"
for _ in $(seq 200); do [[ -s $T/holder ]] && break; sleep 0.05; done
expect_eq "$(cat "$T/holder")" connected "holder connected to b"

"$QNBD" ctl -s "$CTL" --output=json status >"$T/st.json" || fail "status failed"
expect_eq "$("$PY" -c 'import json,sys
r = json.load(open(sys.argv[1]))["result"]["exports"]
print(" ".join("%s:%s:%d:%s" % (e["name"], e["format"], e["connections"], ",".join(b["name"] for b in e["bitmaps"]))
               for e in r))' "$T/st.json")" "a:qcow2:1: b:qcow2:1:bm,other" "status with b added and held"
expect_eq "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["result"]["exports"][1]["image"])' \
  "$T/st.json")" "$T/b.qcow2" "status: image of b"

expect_eq "$(ctl_code export-remove b)" busy "export-remove b with a client connected"
kill -0 $holder 2>/dev/null || fail "a refused export-remove ended the holder's connection"
expect_eq "$(ctl_code export-add b "$T/b.qcow2")" exists "export-add b again"
expect_eq "$(ctl_code export-add a "$T/sub/c.raw")" exists "export-add a (the startup export's name)"

# ---- forced removal: the holder's connection ends, a keeps working
expect_eq "$(ctl_code export-remove --force b)" ok "export-remove --force b"
wait $holder || fail "the holder's connection to b did not end cleanly"
expect_eq "$(cat "$T/holder")" ended "the holder's connection ended"
nbdinfo "$(uri b)" >/dev/null 2>&1 && fail "export b is still served after export-remove"
writer_moves "after export-remove --force b"
# The image is closed: the bitmap stored (not in use), the lock released.
qemu-img info --output=json "$T/b.qcow2" >"$T/info.json"
expect_eq "$("$PY" -c 'import json,sys
for b in json.load(open(sys.argv[1]))["format-specific"]["data"]["bitmaps"]:
    print(b["name"], ",".join(sorted(b["flags"])))' "$T/info.json" | sort | tr '\n' ' ')" \
  "bm auto other auto " "b's bitmaps after the removal (qemu-img info)"
qemu-img check -q "$T/b.qcow2" || fail "qemu-img check of b after the removal"
qemu-io -f qcow2 -c 'write -P 10 12M 64k' "$T/b.qcow2" >/dev/null || fail "qemu-io cannot open b for writing"
qemu-img convert -O raw "$T/b.qcow2" "$T/b.ref"

# ---- re-add b; add c by a path relative to the server's directory
expect_eq "$(ctl_code export-add b "$T/b.qcow2" -B bm)" ok "export-add b again after its removal"
nbdcopy "$(uri b)" "$T/b.got"
cmp "$T/b.ref" "$T/b.got" || fail "re-added export b reads other data than qemu-img"
expect_eq "$(ctl_code export-add c sub/c.raw -r)" ok "export-add c by a relative path"
nbdcopy "$(uri c)" "$T/c.got"
cmp "$T/sub/c.raw" "$T/c.got" || fail "export c reads other data than the file"

# ---- bad arguments: each its code, the server serves on
cd "$T/sub"  # c.raw is here, but paths resolve against the server's directory
expect_eq "$(ctl_code export-add x c.raw)" not-found "relative path resolved against ctl's directory"
cd /
expect_eq "$(ctl_code export-add x "$T/missing.qcow2")" not-found "missing image"
expect_eq "$(ctl_code export-add x "$T/notqcow2" -f qcow2)" invalid-argument "-f qcow2 on a file that is not qcow2"
expect_eq "$(ctl_code export-add x "$T/b0.qcow2" -f vmdk)" invalid-argument "unknown format"
expect_eq "$(ctl_code export-add x "$T/b0.qcow2" -B nope)" not-found "unknown bitmap"
expect_eq "$(ctl_code export-add x "$T/b0.qcow2" -f raw -B bm)" not-found "-B on a raw export (raw has no bitmaps)"
expect_eq "$(ctl_code export-add x "$T/a.qcow2")" busy "an image another export holds"
expect_eq "$(ctl_code export-add x "$T")" invalid-argument "a directory"
expect_eq "$(ctl_code export-remove x)" not-found "export-remove of an export that is not there"
# A refused export-add left nothing behind: b0 is not locked, x is not listed.
qemu-io -f qcow2 -c 'read 0 4k' "$T/b0.qcow2" >/dev/null || fail "a refused export-add left b0 locked"
nbdinfo --list "nbd+unix://?socket=$SERVE_SOCK" --json >"$T/list.json"
expect_eq "$("$PY" -c 'import json,sys; print(" ".join(e["export-name"] for e in json.load(open(sys.argv[1]))["exports"]))' \
  "$T/list.json")" "a b c" "exports listed after the refusals"
expect_eq "$(ctl_code export-remove c)" ok "export-remove c (no clients)"
writer_moves "after the refusals"

touch "$T/writer.stop"
wait $writer || fail "the writer on a failed"
stop_serve
echo "PASS"
