#!/usr/bin/env bash
# A raw image served without a format (probed) must stay raw: a client that
# writes a qcow2 header naming a host file as backing file into its first
# sector gets EPERM, as from qemu-nbd, so the next start does not serve the
# host file. Through the command line and through a --config export without
# "format". Also: an ordinary write to sector 0 still works; the export
# advertises qemu-nbd's 512-byte minimum block; one warning line when a
# writable export was probed; with the format given, the header is just data.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-nbd nbdinfo python3
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
printf 'SECRET\n' >"$T/s.txt"
truncate -s 1M "$T/s.txt"
qemu-img create -q -f qcow2 -b "$T/s.txt" -F raw "$T/e.qcow2" 1M

# try_header URI: write e.qcow2's header into sector 0; print the errno name
# (OK on success).
try_header() {
  "$PY" - "$1" "$T/e.qcow2" <<'PY'
import errno, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
b = open(sys.argv[2], "rb").read()
try:
    h.pwrite(b + bytes(-len(b) % 512), 0)
    print("OK")
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.errnum))
PY
}
# sector0 URI: an ordinary write to sector 0 and its read-back; print OK.
sector0() {
  "$PY" - "$1" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
d = b"boot" + bytes(range(256)) * 2
h.pwrite(d[:512], 0)
assert h.pread(512, 0) == d[:512]
print("OK")
PY
}
# first7 URI: the first 7 bytes the export serves.
first7() {
  "$PY" -c 'import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); print(bytes(h.pread(512, 0)[:7]))' "$1"
}
minblock() {
  nbdinfo --json "$1" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["exports"][0]["block_size_minimum"])'
}

# qemu-nbd, format probed: EPERM, minimum block 512; sector 0 stays writable.
truncate -s 1M "$T/q.raw"
start_server "$T/q.pid" qemu-nbd -t -k "$T/q.sock" --pid-file "$T/q.pid" "$T/q.raw" || fail "qemu-nbd did not start"
quri="nbd+unix:///?socket=$T/q.sock"
q_header=$(try_header "$quri")
q_min=$(minblock "$quri")
q_sector0=$(sector0 "$quri")
stop_server "$SERVER_PID" || fail "qemu-nbd did not stop cleanly"
expect_eq "$q_header" EPERM "qemu-nbd's answer to the header write"

# probe_case WHAT ARGS...: the same against qnbd serve ARGS (a probed raw
# export), then a restart that must still serve the image as raw.
probe_case() {
  local what=$1
  shift
  truncate -s 0 "$T/v.raw"
  truncate -s 1M "$T/v.raw"
  start_serve "$@"
  expect_eq "$(try_header "$SERVE_URI")" "$q_header" "$what: answer to the header write"
  expect_eq "$(minblock "$SERVE_URI")" "$q_min" "$what: minimum block size"
  # Writes over a raw socket, by a client that did not ask for block sizes
  # (so may send unaligned requests): the magic assembled in two pieces is
  # refused too. qnbd checks the magic alone (its probe), stricter than
  # qemu's qcow2 probe that also wants a version >= 2.
  PYTHONPATH=$INTEGRATION_DIR "$PY" - "$SERVE_SOCK" <<'PY' || fail "$what: unaligned magic pieces"
import sys, nbdwire
s, _, _, _ = nbdwire.connect(sys.argv[1], False, [])
nbdwire.send(s, False, 1, 0, 2, payload=b"QF")
assert nbdwire.status(s, False) == 0
nbdwire.send(s, False, 1, 2, 2, payload=b"I\xfb")
assert nbdwire.status(s, False) == 1, "NBD_EPERM expected"
nbdwire.send(s, False, 1, 1, 3, payload=b"xI\xfb")
assert nbdwire.status(s, False) == 0, "a write that does not complete the magic"
PY
  expect_eq "$(sector0 "$SERVE_URI")" "$q_sector0" "$what: ordinary write to sector 0"
  stop_serve
  [[ $(grep -c 'probed as raw' "$SERVE_LOG") == 1 ]] || { cat "$SERVE_LOG" >&2; fail "$what: no probe warning line"; }
  # The header write left no trace: restarted the same way, still raw.
  start_serve "$@"
  expect_eq "$(first7 "$SERVE_URI")" "b'boot\\x00\\x01\\x02'" "$what: first bytes after a restart"
  stop_serve
}
probe_case "command line" "$T/v.raw"
cat >"$T/cfg.json" <<JSON
{ "exports": [ { "name": "", "image": "$T/v.raw" } ],
  "listeners": [ { "type": "unix", "path": "$T/unused.sock" } ] }
JSON
probe_case "config file" --config "$T/cfg.json"

# No warning for a read-only probed export (it still asks for 512-byte blocks).
start_serve -r "$T/v.raw"
expect_eq "$(minblock "$SERVE_URI")" 512 "read-only probed: minimum block size"
stop_serve
if grep -q 'probed as raw' "$SERVE_LOG"; then fail "warning for a read-only export"; fi

# With the format given (command line or config), as qemu-nbd -f raw: the
# header is data, the minimum block is 1, no warning.
start_server "$T/q.pid" qemu-nbd -t -f raw -k "$T/q.sock" --pid-file "$T/q.pid" "$T/q.raw" ||
  fail "qemu-nbd -f raw did not start"
qf_header=$(try_header "$quri")
qf_min=$(minblock "$quri")
stop_server "$SERVER_PID" || fail "qemu-nbd did not stop cleanly"
expect_eq "$qf_header" OK "qemu-nbd -f raw: header write"
start_serve -f raw "$T/v.raw"
expect_eq "$(try_header "$SERVE_URI")" "$qf_header" "-f raw: header write"
expect_eq "$(minblock "$SERVE_URI")" "$qf_min" "-f raw: minimum block size"
stop_serve
if grep -q 'probed as raw' "$SERVE_LOG"; then fail "warning with -f raw"; fi
cat >"$T/cfg-raw.json" <<JSON
{ "exports": [ { "name": "", "image": "$T/v.raw", "format": "raw" } ],
  "listeners": [ { "type": "unix", "path": "$T/unused.sock" } ] }
JSON
start_serve --config "$T/cfg-raw.json"
expect_eq "$(try_header "$SERVE_URI")" OK "config format raw: header write"
stop_serve
echo PASS
