#!/usr/bin/env bash
# A raw image served without a format (probed) must stay raw: a client that
# writes a qcow2 header naming a host file as backing file into its first
# sector gets EPERM, as from qemu-nbd, so the next start does not serve the
# host file. Through the command line and through a --config export without
# "format". Also: an ordinary write to sector 0 still works; the export
# advertises qemu-nbd's 512-byte minimum block; one warning line when a
# writable export was probed; with the format given, the header is just data.
# The same answers as qemu-nbd's to a table of first sectors holding the
# signature of every format QEMU probes (and near misses), and to 2,000
# seeded mutations of them (probe_sectors.py). And opening: a
# file QEMU would probe as a format qnbd does not serve is refused, as the
# top image and as a backing file, unless -f raw says to serve its bytes.
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

# sector_answers URI: the answers of the export to probe_sectors.py's table
# of first sectors (the signature of each format QEMU 7.2 probes, and near
# misses), then to 2,000 seeded mutations of them.
sector_answers() {
  "$PY" "$INTEGRATION_DIR/probe_sectors.py" "$1" table && "$PY" "$INTEGRATION_DIR/probe_sectors.py" "$1" random 27 2000
}

# qemu-nbd, format probed: EPERM, minimum block 512; sector 0 stays writable.
truncate -s 1M "$T/q.raw"
start_server "$T/q.pid" qemu-nbd -t -k "$T/q.sock" --pid-file "$T/q.pid" "$T/q.raw" || fail "qemu-nbd did not start"
quri="nbd+unix:///?socket=$T/q.sock"
q_header=$(try_header "$quri")
q_min=$(minblock "$quri")
q_sector0=$(sector0 "$quri")
q_sectors=$(sector_answers "$quri") || fail "sector table against qemu-nbd"
stop_server "$SERVER_PID" || fail "qemu-nbd did not stop cleanly"
expect_eq "$q_header" EPERM "qemu-nbd's answer to the header write"
# The table must exercise both answers, or comparing with it proves little.
[[ $(grep -c ': EPERM$' <<<"$q_sectors") -ge 500 && $(grep -c ': OK$' <<<"$q_sectors") -ge 500 ]] ||
  fail "qemu-nbd's answers to the sector table are not a mix: $(grep -oE '[A-Z]+$' <<<"$q_sectors" | sort | uniq -c | tr '\n' ' ')"

# probe_case WHAT ARGS...: the same against qnbd serve ARGS (a probed raw
# export), then a restart that must still serve the image as raw.
probe_case() {
  local what=$1
  shift
  truncate -s 0 "$T/v.raw"
  truncate -s 1M "$T/v.raw"
  start_serve "$@"
  expect_eq "$(try_header "$SERVE_URI")" "$q_header" "$what: answer to the header write"
  local answers
  answers=$(sector_answers "$SERVE_URI") || fail "$what: sector table against qnbd"
  [[ $answers == "$q_sectors" ]] ||
    fail "$what: answers to the sector table differ (qnbd <, qemu-nbd >): $(diff <(echo "$answers") <(echo "$q_sectors") | head -20)"
  expect_eq "$(minblock "$SERVE_URI")" "$q_min" "$what: minimum block size"
  # Writes over a raw socket, by a client that did not ask for block sizes
  # (so may send unaligned requests): a qcow2 header assembled in pieces
  # is refused at the piece that completes it (qemu's block layer would
  # have read-modify-written the whole sector and probed that). The magic
  # with version 0 probes as raw in QEMU, so it is allowed.
  PYTHONPATH=$INTEGRATION_DIR "$PY" - "$SERVE_SOCK" <<'PY' || fail "$what: unaligned magic pieces"
import sys, nbdwire
s, _, _, _ = nbdwire.connect(sys.argv[1], False, [])
nbdwire.send(s, False, 1, 0, 2, payload=b"QF")
assert nbdwire.status(s, False) == 0
nbdwire.send(s, False, 1, 2, 2, payload=b"I\xfb")
assert nbdwire.status(s, False) == 0, "the magic with version 0 is raw to QEMU"
nbdwire.send(s, False, 1, 4, 4, payload=b"\0\0\0\3")
assert nbdwire.status(s, False) == 1, "NBD_EPERM expected for the version that completes a qcow2 header"
nbdwire.send(s, False, 1, 1, 3, payload=b"xI\xfb")
assert nbdwire.status(s, False) == 0, "a write that breaks the magic"
nbdwire.send(s, False, 1, 4, 4, payload=b"\0\0\0\3")
assert nbdwire.status(s, False) == 0, "the version without the magic"
nbdwire.send(s, False, 1, 1, 1, payload=b"F")
assert nbdwire.status(s, False) == 1, "NBD_EPERM expected for the byte that completes the magic"
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

# Opening without a format: a file QEMU would open as another format is
# refused in one line naming that format (qnbd would otherwise serve the
# container's bytes as the disk), as the top image and as a backing file
# named without its format; with -f raw it is served as bytes. Each image
# is made by qemu-img, and `qemu-img info` says which format QEMU probes.
mkdir -p "$T/fmt"
for fmt in vmdk vdi vpc vhdx qed qcow parallels luks; do
  img=$T/fmt/d.$fmt
  opts=()
  # shellcheck disable=SC2054 # the commas belong to --object's argument
  [[ $fmt == luks ]] && opts=(--object secret,id=s0,data=pw -o key-secret=s0)
  qemu-img create -q -f "$fmt" "${opts[@]}" "$img" 1M || fail "qemu-img cannot make a $fmt image"
  probed=$(qemu-img info --output=json "$img" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["format"])')
  expect_eq "$probed" "$fmt" "qemu-img info's probe of the $fmt image"
  run_checked 20 "$QNBD" serve -r -k "$T/fmt/s.sock" "$img"
  [[ $RUN_KIND == error && $(wc -l <"$RUN_STDERR") == 1 ]] ||
    { cat "$RUN_STDERR" >&2; fail "$fmt: serve without a format: $RUN_KIND, want one error line"; }
  grep -q "probes as $fmt, a format qnbd does not serve" "$RUN_STDERR" ||
    { cat "$RUN_STDERR" >&2; fail "$fmt: the refusal does not name the format"; }
  # qemu-img 7.2 makes no overlay without a backing format, so name it and
  # then turn that header extension into an unknown one (ignored by every
  # reader, qcow2.txt "Header extensions"): the backing file is probed.
  qemu-img create -q -f qcow2 -b "$img" -F "$fmt" -u "$T/fmt/top.qcow2" 1M
  "$PY" - "$T/fmt/top.qcow2" <<'PY' || fail "cannot drop the backing format"
import struct, sys
with open(sys.argv[1], "r+b") as f:
    head = f.read(4096)
    off = struct.unpack(">I", head[100:104])[0]  # header_length: the extensions follow
    while True:
        kind, length = struct.unpack(">II", head[off:off + 8])
        if kind == 0:
            sys.exit("no backing format extension")
        if kind == 0xE2792ACA:
            f.seek(off)
            f.write(struct.pack(">I", 0x7F0000AA))
            break
        off += 8 + (length + 7) // 8 * 8
PY
  run_checked 20 "$QNBD" info "$T/fmt/top.qcow2"
  if [[ $RUN_KIND != error ]] || ! grep -q "could not open backing file: .*probes as $fmt" "$RUN_STDERR"; then
    cat "$RUN_STDERR" "$RUN_STDOUT" >&2
    fail "$fmt: a backing file probed as $fmt was not refused"
  fi
done
# Served with -f raw, the vmdk file is its bytes.
start_serve -r -f raw "$T/fmt/d.vmdk"
expect_eq "$(first7 "$SERVE_URI")" "b'KDMV\\x01\\x00\\x00'" "-f raw: the vmdk file's first bytes"
stop_serve
# dmg: QEMU guesses it from the file name alone; qemu-img fails to open a
# raw file named so, and qnbd refuses it naming dmg.
truncate -s 1M "$T/fmt/d.dmg"
qemu-img info "$T/fmt/d.dmg" >/dev/null 2>&1 && fail "qemu-img opened a raw file named .dmg"
run_checked 20 "$QNBD" serve -r -k "$T/fmt/s.sock" "$T/fmt/d.dmg"
if [[ $RUN_KIND != error ]] || ! grep -q "probes as dmg" "$RUN_STDERR"; then
  cat "$RUN_STDERR" >&2
  fail "a raw file named .dmg: $RUN_KIND"
fi
# The qcow2 magic with version 0 is raw to QEMU, and so to qnbd.
printf 'QFI\373\0\0\0\0' >"$T/fmt/v0.img"
truncate -s 1M "$T/fmt/v0.img"
expect_eq "$(qemu-img info --output=json "$T/fmt/v0.img" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["format"])')" \
  raw "qemu-img info's probe of a version 0 qcow2 magic"
start_serve -r "$T/fmt/v0.img"
expect_eq "$(first7 "$SERVE_URI")" "b'QFI\\xfb\\x00\\x00\\x00'" "a version 0 qcow2 magic served as raw"
stop_serve
echo PASS
