#!/usr/bin/env bash
# Option data size: a libnbd client that adds 3,000 meta contexts (a
# SET_META_CONTEXT and a LIST_META_CONTEXT of about 72 KB each) gets the
# same answers from qnbd as from qemu-nbd, then opens the export and reads
# block status. Over a raw socket: an option above qnbd's 1 MiB cap gets
# NBD_REP_ERR_TOO_BIG and the handshake goes on (qemu-nbd processes data up
# to 32 MiB); a length above 32 MiB makes both servers drop the connection
# at once, before any of the data is sent.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd python3
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
img=$T/disk.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-img bitmap --add "$img" b0
qemu-img bitmap --add "$img" b1
qemu-io -f qcow2 -c 'write -P 1 1M 64k' -c 'write -z 4M 1M' "$img" >/dev/null

start_server "$T/q.pid" qemu-nbd -r -t -A -B b0 -B b1 -f qcow2 -k "$T/q.sock" --pid-file "$T/q.pid" "$img" ||
  fail "qemu-nbd did not start"
start_serve -r -A -B b0 -B b1 -f qcow2 "$img"

# many URI OUT: list and select 3,000 contexts, open, block status.
many() {
  "$PY" - "$1" "$2" <<'PY' || fail "3,000-context session with $1 failed"
import json, nbd, sys
uri, out = sys.argv[1], sys.argv[2]
names = ["x-other:context-%04d" % i for i in range(2996)]
names += ["qemu:dirty-bitmap:b1", "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:nope"]
assert len(names) == 3000 and sum(4 + len(n) for n in names) > 64 << 10
h = nbd.NBD()
h.set_opt_mode(True)
for n in names:
    h.add_meta_context(n)
h.connect_uri(uri)
res = {}
got = []
h.opt_list_meta_context(lambda name: got.append(name) or 0)
res["listed"] = sorted(got)
h.opt_go()
res["negotiated"] = [n for n in names if h.can_meta_context(n)]
ext = {}
def cb(meta, offset, entries, err):
    ext.setdefault(meta, []).append(list(entries))
    return 0
h.block_status(16 << 20, 0, cb)
res["status"] = ext
res["data"] = bytes(h.pread(16, 1 << 20)).hex()
json.dump(res, open(out, "w"), indent=1, sort_keys=True)
PY
}
many "nbd+unix:///?socket=$T/q.sock" "$T/qemu.json"
many "$SERVE_URI" "$T/qnbd.json"
diff -u "$T/qemu.json" "$T/qnbd.json" || fail "answers with 3,000 contexts differ from qemu-nbd's"
grep -q '"qemu:dirty-bitmap:b1"' "$T/qnbd.json" || fail "the bitmap context was not selected"

# big SOCK: a 2 MiB SET_META_CONTEXT, then GO; prints the first reply type.
# Then a 33 MiB option header alone: prints "closed" if the server drops
# the connection without waiting for the data.
big() {
  PYTHONPATH=$INTEGRATION_DIR python3 - "$1" <<'PY' || fail "raw-socket session with $1 failed"
import socket, struct, sys, nbdwire
sock = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
nbdwire.recvall(s, 18)
s.sendall(struct.pack(">I", 3))
assert nbdwire.option(s, 8)[-1][0] == 1  # STRUCTURED_REPLY
queries = [b"x-other:" + b"q" * 1000] * 2100
r = nbdwire.option(s, 10, nbdwire.meta(b"", queries))
print(hex(r[-1][0]))
r = nbdwire.option(s, 7, struct.pack(">IH", 0, 0))
assert r[-1][0] == 1, r
s.close()
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
nbdwire.recvall(s, 18)
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbdwire.IHAVEOPT, 10, (33 << 20)))
s.settimeout(10)
print("closed" if s.recv(1) == b"" else "open")
PY
}
qbig=$(big "$T/q.sock")
nbig=$(big "$SERVE_SOCK")
stop_server "$SERVER_PID" || fail "qemu-nbd did not stop cleanly"
stop_serve
expect_eq "$qbig" "0x1
closed" "qemu-nbd: 2 MiB option, 33 MiB option"
expect_eq "$nbig" "0x80000009
closed" "qnbd: 2 MiB option (TOO_BIG), 33 MiB option"
echo PASS
