#!/usr/bin/env bash
# qnbd serve -l/--load-snapshot beside qemu-nbd -l: an internal snapshot of
# a qcow2 image served read-only. Two snapshots (the second taken after the
# disk grew), then more writes to the active layer; the image has a raw
# backing file, so unallocated clusters read through to it. For each way
# of naming a snapshot (bare name, bare id, snapshot.id=, snapshot.name=,
# both) both servers must serve the same bytes (nbdcopy), the same
# base:allocation map and the same size and read-only flag, and the bytes
# must be the snapshot's (qemu-img convert -l), not the active layer's.
# Names qemu-nbd cannot find (a wrong pair, an unknown name, an empty
# argument), an unknown key and a raw image are refused by both; a
# snapshot whose L1 table lies past the end of the file by qnbd with one
# line (qemu-nbd reads it as zeroes). -l makes
# the export read-only (a write gets EPERM from both); the config key
# load_snapshot does what -l does.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
img=$T/s.qcow2
truncate -s 8M "$T/base.raw"
qemu-io -f raw -c 'write -P 0x0b 0 8M' "$T/base.raw" >/dev/null
qemu-img create -q -f qcow2 -b "$T/base.raw" -F raw "$img" 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' "$img" >/dev/null
qemu-img snapshot -c s1 "$img"
qemu-io -f qcow2 -c 'write -P 0x22 512k 1M' -c 'write -z 3M 64k' "$img" >/dev/null
qemu-img resize -q "$img" 8M
qemu-io -f qcow2 -c 'write -P 0x33 6M 64k' "$img" >/dev/null
qemu-img snapshot -c 2 "$img"  # a snapshot whose name is another's id
qemu-io -f qcow2 -c 'write -P 0x44 0 64k' -c 'write -P 0x55 5M 1M' "$img" >/dev/null
qemu-img convert -O raw -l snapshot.name=s1 "$img" "$T/s1.raw"
qemu-img convert -O raw -l snapshot.id=2 "$img" "$T/id2.raw"
qemu-img convert -O raw "$img" "$T/active.raw"
cmp -s "$T/s1.raw" "$T/active.raw" && fail "setup: snapshot s1 reads as the active layer"

# serve_one TOOL ARG OUT: serve the image with -l ARG; OUT.{raw,map,info}
# when it serves (returns 0), OUT.err when refused (returns 1).
serve_one() {
  local tool=$1 arg=$2 out=$3
  rm -f "$T/l.sock" "$T/l.pid" "$out".*
  if [[ $tool == qemu-nbd ]]; then
    qemu-nbd -t -k "$T/l.sock" --pid-file "$T/l.pid" -l "$arg" "$img" 2>"$out.err" &
  else
    "$QNBD" serve -t -k "$T/l.sock" --pid-file "$T/l.pid" -l "$arg" "$img" 2>"$out.err" &
  fi
  local pid=$! st=0
  wait_ready -s "$T/l.pid" "$pid" || st=$?
  if ((st != 0)); then
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 1
  fi
  local uri="nbd+unix:///?socket=$T/l.sock"
  nbdcopy "$uri" "$out.raw" || fail "$tool -l '$arg': nbdcopy failed"
  nbdinfo --map "$uri" >"$out.map"
  nbdinfo --json "$uri" | grep -E '"(is_read_only|export-size)"' >"$out.info"
  "$PY" - "$uri" >"$out.write" <<'PY'
import errno, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 512, 0)
    print("write ok")
except nbd.Error as e:
    print("write", errno.errorcode.get(e.errnum, e.errnum))
PY
  kill -TERM "$pid"
  wait "$pid" || fail "$tool -l '$arg': exit status $? after SIGTERM"
  return 0
}

# check_arg ARG EXPECTED_RAW: both serve the snapshot EXPECTED_RAW alike.
check_arg() {
  local arg=$1 expected=$2
  serve_one qemu-nbd "$arg" "$T/q" || { cat "$T/q.err" >&2; fail "qemu-nbd -l '$arg' refused"; }
  serve_one qnbd "$arg" "$T/n" || { cat "$T/n.err" >&2; fail "qnbd serve -l '$arg' refused"; }
  cmp "$T/q.raw" "$T/n.raw" || fail "-l '$arg': data differs from qemu-nbd's"
  cmp -s "$T/n.raw" "$expected" || fail "-l '$arg': not the snapshot's data"
  diff -u "$T/q.map" "$T/n.map" >&2 || fail "-l '$arg': base:allocation differs from qemu-nbd's"
  diff -u "$T/q.info" "$T/n.info" >&2 || fail "-l '$arg': size or read-only flag differs"
  diff -u "$T/q.write" "$T/n.write" >&2 || fail "-l '$arg': a write is answered differently"
  grep -q '"is_read_only": true' "$T/n.info" || fail "-l '$arg': export is not read-only"
  echo "-l '$arg': same data, map, size, read-only; $(cat "$T/n.write")"
}

# check_refused ARG [PHRASE]: both refuse; qnbd with qemu-nbd's message (or
# the part of it that is PHRASE: qemu names the device, qnbd the file).
check_refused() {
  local arg=$1 msg=${2:-}
  serve_one qemu-nbd "$arg" "$T/q" && fail "qemu-nbd -l '$arg' served (test expects a refusal)"
  serve_one qnbd "$arg" "$T/n" && fail "qnbd serve -l '$arg' served; qemu-nbd refuses"
  if [[ -n $msg ]]; then
    grep -qF -- "$msg" "$T/q.err" || { cat "$T/q.err" >&2; fail "-l '$arg': qemu-nbd's refusal lacks '$msg'"; }
  else
    msg=$(sed -n 's/^qemu-nbd: //p' "$T/q.err" | head -n 1)
  fi
  grep -qF -- "$msg" "$T/n.err" || { cat "$T/n.err" >&2; fail "-l '$arg': qnbd's refusal lacks '$msg'"; }
  echo "-l '$arg': refused by both ($msg)"
}

check_arg s1 "$T/s1.raw"
check_arg 1 "$T/s1.raw"
check_arg 2 "$T/id2.raw"
check_arg snapshot.name=s1 "$T/s1.raw"
check_arg snapshot.id=2 "$T/id2.raw"
check_arg snapshot.name=2 "$T/id2.raw"
check_arg snapshot.id=1,snapshot.name=s1 "$T/s1.raw"
check_refused snapshot.id=2,snapshot.name=s1
check_refused nope
check_refused ""
check_refused snapshot.foo=1

# A raw image has no internal snapshots.
img=$T/base.raw
check_refused s1 "does not support temporarily loading internal snapshots"
img=$T/s.qcow2

# A hostile snapshot table: snapshot s1's L1 table moved past the end of
# the file. Both refuse to serve it with one line; qnbd keeps no server.
cp "$img" "$T/bad.qcow2"
"$PY" - "$T/bad.qcow2" <<'PY'
import struct, sys
f = open(sys.argv[1], "r+b")
hdr = f.read(72)
snap_off = struct.unpack(">Q", hdr[64:72])[0]
f.seek(0, 2)
end = f.tell()
f.seek(snap_off)
f.write(struct.pack(">Q", (end + (1 << 20)) & ~0xffff))
PY
# (qemu-nbd 7.2 serves it, reading the missing table as zeroes; qnbd
# refuses an L1 table it cannot read, as for the active one.)
img=$T/bad.qcow2
serve_one qnbd s1 "$T/n" && fail "qnbd serve -l s1 served a snapshot whose L1 table is past the end of the file"
[[ $(wc -l <"$T/n.err") -eq 1 ]] || { cat "$T/n.err" >&2; fail "hostile snapshot L1: not one line"; }
grep -q "Failed to load snapshot" "$T/n.err" || { cat "$T/n.err" >&2; fail "hostile snapshot L1: unclear error"; }
echo "snapshot L1 past the end of the file: refused ($(cat "$T/n.err"))"
img=$T/s.qcow2

# The config file's key.
cat >"$T/cfg.json" <<EOF
{"exports": [{"name": "", "image": "$img", "read_only": true, "load_snapshot": "s1"}]}
EOF
start_serve --config "$T/cfg.json"
nbdcopy "$SERVE_URI" "$T/cfg.raw"
stop_serve
cmp "$T/cfg.raw" "$T/s1.raw" || fail "config load_snapshot: not snapshot s1's data"
echo PASS
