#!/usr/bin/env bash
# The control socket (docs/control.md) against hostile and real clients:
# - the socket is mode 0600; malformed JSON, unknown commands, wrong and
#   missing arguments, a line over 1 MiB each get their error code and the
#   connection goes on; a client that sends requests and never reads its
#   replies stalls neither other control clients nor NBD clients; after all
#   of it the server still serves and stops cleanly (exit 0; under the ASan
#   build any sanitizer report fails that);
# - every live bitmap command beside its at-rest twin (`qnbd bitmap`) on a
#   copy of the same image: qemu-img info and qemu-nbd -B agree afterwards.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3

T=$TMPDIR_TEST
CTL=$T/ctl.sock
qemu-img create -q -f qcow2 "$T/live.qcow2" 16M
qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' "$T/live.qcow2" >/dev/null
qemu-img bitmap --add "$T/live.qcow2" old
qemu-io -c 'write -P 3 8M 4k' "$T/live.qcow2" >/dev/null
qemu-img bitmap --add -g 4096 --disable "$T/live.qcow2" off
cp "$T/live.qcow2" "$T/rest.qcow2"

start_serve -f qcow2 --control "$CTL" "$T/live.qcow2"
expect_eq "$(stat -c %a "$CTL")" 600 "control socket mode"

# ---- bad inputs, one connection, replies checked in order
python3 - "$CTL" <<'PY' || fail "bad inputs: wrong replies"
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rb")
def ask(raw, code, rid=None):
    s.sendall(raw if isinstance(raw, bytes) else raw.encode())
    r = json.loads(f.readline())
    got = r.get("error", {}).get("code")
    assert got == code, (raw[:80], r)
    assert r["id"] == rid, (raw[:80], r)
ask(b"{not json\n", "parse-error")
ask(b"\xff\xfe\n", "parse-error")
ask(b"[" * 100000 + b"\n", "parse-error")
ask(b"x" * (1 << 20) + b"yy\n", "parse-error")            # over 1 MiB
ask('{"id":1,"command":"format-disk"}\n', "unknown-command", 1)
ask('{"id":2,"command":"bitmap-add","arguments":{"export":""}}\n', "invalid-argument", 2)
ask('{"id":3,"command":"bitmap-add","arguments":{"export":"","name":"x","granularity":1000}}\n', "invalid-argument", 3)
ask('{"id":4,"command":"bitmap-add","arguments":{"export":"","name":"x","colour":1}}\n', "invalid-argument", 4)
ask('{"id":5,"command":"bitmap-add","arguments":{"export":"nope","name":"x"}}\n', "not-found", 5)
ask('{"id":6,"command":"bitmap-remove","arguments":{"export":"","name":"nope"}}\n', "not-found", 6)
ask('{"id":7,"command":"bitmap-add","arguments":{"export":"","name":"old"}}\n', "exists", 7)
ask('{"id":8,"command":"checkpoint","arguments":{"name":"c","disable":"nope","exports":[""]}}\n', "not-found", 8)
s.sendall(b'{"id":"ok","command":"status"}\n')
r = json.loads(f.readline()); assert r["id"] == "ok" and "result" in r, r
PY
# A refused checkpoint changed nothing.
"$QNBD" ctl -s "$CTL" --output=json status >"$T/st.json" || fail "status failed"
python3 -c 'import json,sys; b=[x["name"] for x in json.load(open(sys.argv[1]))["result"]["exports"][0]["bitmaps"]]; sys.exit(0 if sorted(b)==["off","old"] else 1)' "$T/st.json" ||
  fail "a refused command changed the bitmaps: $(cat "$T/st.json")"

# ---- a client that never reads: floods requests, holds the connection
python3 - "$CTL" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.setblocking(False)
line = b'{"id":1,"command":"status"}\n' * 1000
end = time.time() + 4
while time.time() < end:
    try: s.send(line)
    except BlockingIOError: time.sleep(0.01)
    except OSError: break
time.sleep(1)
PY
flood=$!
cleanup_fn "kill $flood 2>/dev/null"
sleep 1
# Meanwhile another control client and an NBD client are served at once.
timeout 5 "$QNBD" ctl -s "$CTL" status >/dev/null || fail "a second control client stalled behind one that never reads"
timeout 5 qemu-io -f raw -c 'write -P 9 12M 64k' -c 'read -P 9 12M 64k' "$SERVE_URI" >/dev/null ||
  fail "NBD I/O stalled while a control client never reads"
wait $flood || true
serve_alive || fail "server died on bad control input"
# The twin gets the same write (qemu-io marks its enabled bitmap 'old' too).
qemu-io -f qcow2 -c 'write -P 9 12M 64k' "$T/rest.qcow2" >/dev/null

# ---- live bitmap commands beside their at-rest twins
ctl() { "$QNBD" ctl -s "$CTL" "$@" >/dev/null || fail "qnbd ctl $* failed"; }
rest() { "$QNBD" bitmap "$@" >/dev/null || fail "qnbd bitmap $* failed"; }
ctl bitmap-add "" n1;                 rest --add "$T/rest.qcow2" n1
ctl bitmap-add -g 512 --disabled "" n2; rest --add -g 512 "$T/rest.qcow2" n2 --disable
ctl bitmap-merge "" n2 old;           rest --merge old "$T/rest.qcow2" n2
ctl bitmap-merge "" n1 off;           rest --merge off "$T/rest.qcow2" n1
ctl bitmap-disable "" old;            rest --disable "$T/rest.qcow2" old
ctl bitmap-enable "" off;             rest --enable "$T/rest.qcow2" off
ctl bitmap-clear "" n1;               rest --clear "$T/rest.qcow2" n1
ctl bitmap-merge "" n1 n2;            rest --merge n2 "$T/rest.qcow2" n1
ctl bitmap-remove "" n2;              rest --remove "$T/rest.qcow2" n2
ctl bitmap-disable "" n1;             rest --disable "$T/rest.qcow2" n1
stop_serve
bitmaps() {
  qemu-img info --output=json "$1" | python3 -c '
import json, sys
for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", []):
    print(b["name"], b["granularity"], " ".join(sorted(b["flags"])))' | sort
}
expect_eq "$(bitmaps "$T/live.qcow2")" "$(bitmaps "$T/rest.qcow2")" "qemu-img info bitmaps, live vs at rest"
qemu-img check -q "$T/live.qcow2" || fail "qemu-img check after live bitmap commands"
for b in n1 old off; do
  for img in live rest; do
    qemu-nbd -r -t -f qcow2 -B "$b" -k "$T/q.sock" --pid-file "$T/q.pid" "$T/$img.qcow2" &
    qpid=$!
    for _ in $(seq 100); do [[ -s $T/q.pid ]] && break; sleep 0.05; done
    nbdinfo --json --map=qemu:dirty-bitmap:$b "nbd+unix:///?socket=$T/q.sock" >"$T/$img.map"
    kill $qpid; wait $qpid 2>/dev/null; rm -f "$T/q.pid"
  done
  # map-norm.py exits non-zero on a malformed or empty map, so a broken
  # dump cannot compare equal to another broken one.
  live_map=$(python3 "$INTEGRATION_DIR/map-norm.py" bitmap "$T/live.map") || fail "qemu-nbd -B $b: bad map of live image"
  rest_map=$(python3 "$INTEGRATION_DIR/map-norm.py" bitmap "$T/rest.map") || fail "qemu-nbd -B $b: bad map of at-rest image"
  [[ -n $live_map ]] || fail "qemu-nbd -B $b: empty map"
  expect_eq "$live_map" "$rest_map" "qemu-nbd -B $b map, live vs at rest"
done
echo "PASS"
