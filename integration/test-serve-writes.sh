#!/usr/bin/env bash
# Writes through qnbd serve with the real clients: nbdcopy and
# qemu-img convert -n into a writable export (checked with qemu-img compare),
# and fio's nbd engine doing verified random read/write from 4 connections.
# Raw and qcow2; qemu-io writes over NBD into the qcow2 export; qemu-img
# check after each qcow2 run.
source "$(dirname "$0")/lib-serve.sh"
requires nbdcopy qemu-img fio nbdinfo

SIZE=64M
qemu-img create -q -f raw "$TMPDIR_TEST/src.raw" $SIZE
# Data with holes, zeros and random runs, so both copiers exercise zero
# detection and data writes.
python3 - "$TMPDIR_TEST/src.raw" <<'PY'
import os, random, sys
r = random.Random(4)
with open(sys.argv[1], "r+b") as f:
    for _ in range(200):
        off = r.randrange(0, 64 << 20, 512)
        f.seek(off)
        f.write(os.urandom(r.choice([512, 4096, 65536, 300 << 10]))[: (64 << 20) - off])
PY

# fio_verify URI: 4 jobs (4 connections), 4k-64k random read/write, every
# block written is read back and checked (crc32c + header).
fio_verify() {
  # fio writes its verify state files into the working directory.
  (cd "$TMPDIR_TEST" && fio --name=v --ioengine=nbd --uri="$1" --rw=randrw --bsrange=4k-64k --iodepth=8 --numjobs=4 \
    --size=16M --offset_increment=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --group_reporting --output="$TMPDIR_TEST/fio.out") ||
    { cat "$TMPDIR_TEST/fio.out"; fail "fio verify on $1"; }
  grep -q "err= 0" "$TMPDIR_TEST/fio.out" || { cat "$TMPDIR_TEST/fio.out"; fail "fio reported errors"; }
}

# --- raw ---------------------------------------------------------------
qemu-img create -q -f raw "$TMPDIR_TEST/dst.raw" $SIZE
start_serve -f raw -e 8 "$TMPDIR_TEST/dst.raw"
nbdcopy "$TMPDIR_TEST/src.raw" "$SERVE_URI"
qemu-img compare -q -f raw -F raw "$TMPDIR_TEST/src.raw" "$SERVE_URI" || fail "raw: nbdcopy result differs"
# Overwrite with qemu-img convert -n (existing target) from a qcow2 source.
qemu-img convert -q -f raw -O qcow2 "$TMPDIR_TEST/src.raw" "$TMPDIR_TEST/src.qcow2"
qemu-io -f qcow2 -c "write -P 0x5a 1M 3M" -c "write -z 10M 2M" "$TMPDIR_TEST/src.qcow2" >/dev/null
qemu-img convert -q -n -f qcow2 -O raw "$TMPDIR_TEST/src.qcow2" "$SERVE_URI"
qemu-img compare -q -f qcow2 -F raw "$TMPDIR_TEST/src.qcow2" "$SERVE_URI" || fail "raw: convert -n result differs"
fio_verify "$SERVE_URI"
stop_serve

# --- qcow2 -------------------------------------------------------------
qemu-img create -q -f qcow2 "$TMPDIR_TEST/dst.qcow2" $SIZE
start_serve -f qcow2 -e 8 "$TMPDIR_TEST/dst.qcow2"
nbdinfo --json "$SERVE_URI" | grep -q '"is_read_only": false' || fail "qcow2: writable export offered read-only"
nbdcopy "$TMPDIR_TEST/src.raw" "$SERVE_URI"
qemu-img compare -q -f raw -F raw "$TMPDIR_TEST/src.raw" "$SERVE_URI" || fail "qcow2: nbdcopy result differs"
qemu-img convert -q -n -f qcow2 -O raw "$TMPDIR_TEST/src.qcow2" "$SERVE_URI"
qemu-img compare -q -f qcow2 -F raw "$TMPDIR_TEST/src.qcow2" "$SERVE_URI" || fail "qcow2: convert -n result differs"
# qemu-io over NBD: unaligned writes, zeroes and discards; the same
# commands on a raw copy of the expected contents give the reference.
qemu-img convert -q -f qcow2 -O raw "$TMPDIR_TEST/src.qcow2" "$TMPDIR_TEST/expect.raw"
qio_cmds=(-c "write -P 0x3c 12345 70000" -c "write -z 5000000 300000" -c "write -P 0x7e 33554431 2"
  -c "discard 40M 1M" -c "write -z 40M 1M" -c "write -P 0x11 63M 1M" -c "flush")
qemu-io -f raw "${qio_cmds[@]}" "$SERVE_URI" >/dev/null || fail "qcow2: qemu-io over NBD"
qemu-io -f raw "${qio_cmds[@]}" "$TMPDIR_TEST/expect.raw" >/dev/null
stop_serve
qemu-img check -q -f qcow2 "$TMPDIR_TEST/dst.qcow2" || fail "qcow2: qemu-img check after convert"
qemu-img compare -q -f raw -F qcow2 "$TMPDIR_TEST/expect.raw" "$TMPDIR_TEST/dst.qcow2" ||
  fail "qcow2: qemu-io writes over NBD differ from the same writes on a raw file"
start_serve -f qcow2 -e 8 "$TMPDIR_TEST/dst.qcow2"
fio_verify "$SERVE_URI"
stop_serve
qemu-img check -q -f qcow2 "$TMPDIR_TEST/dst.qcow2" || fail "qcow2: qemu-img check after fio"
echo PASS
