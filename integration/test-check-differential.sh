#!/usr/bin/env bash
# qnbd check vs qemu-img check on 250 randomly damaged images (fixed seeds;
# integration/check_differential.py says what is damaged and how): the
# same exit status and the same output, line for line; and on 200 more,
# `check -r all` and `-r leaks` judged by qemu-img check afterwards. It found the
# divergences fixed with it (L1 entries with reserved bits or a zero offset
# field, refcount table entries with reserved bits, refcount overflow,
# extended-L2 bitmap checks, COPIED flags in unaligned L2 tables, snapshot
# names printed as C strings).
set -u
for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool missing"; exit 77; }
done
QNBD=${QNBD:?QNBD must point at the qnbd binary}
[ -x "$QNBD" ] || { echo "SKIP: $QNBD not built"; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for seed in 1 2; do
  python3 "$here/check_differential.py" "$(realpath "$QNBD")" "$tmp/w$seed" 125 "$seed" || status=1
done
# Repairs: qemu-img check judges each tool's result (no worse than
# qemu-img's repair, exit 0 only when clean).
python3 "$here/check_differential.py" "$(realpath "$QNBD")" "$tmp/wa" 100 3 all || status=1
python3 "$here/check_differential.py" "$(realpath "$QNBD")" "$tmp/wl" 100 4 leaks || status=1
# Snapshot L1 tables past the end of the file: QEMU reads the missing part
# as zeroes and finds nothing to walk; qnbd used to fail the read and report
# an internal error per snapshot (exit 3 against qemu-img's 2).
img="$tmp/snap-l1-past-eof.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4096 "$img" 1M
qemu-io -f qcow2 -c "write -q -P 0x5a 0 64k" "$img"
for s in a b c; do qemu-img snapshot -c "$s" "$img"; done
python3 - "$img" <<'PY'
import os, struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    nb, table = struct.unpack(">IQ", f.read(72)[60:72])
    end = (os.path.getsize(path) + 4095) // 4096 * 4096
    pos = table
    for i in range(nb):
        f.seek(pos)
        e = f.read(40)
        l1, l1_size, id_len, name_len = struct.unpack(">QIHH", e[:16])
        (extra,) = struct.unpack(">I", e[36:40])
        if i != 1:  # the middle snapshot keeps its table
            f.seek(pos)
            f.write(struct.pack(">Q", end + (i + 1) * (1 << 20)))
        pos += (40 + extra + id_len + name_len + 7) // 8 * 8
PY
# Same exit status, output and error lines as qemu-img check on $img.
compare() {
  "$QNBD" check "$img" >"$tmp/ours.out" 2>"$tmp/ours.err"
  ours=$?
  qemu-img check "$img" >"$tmp/theirs.out" 2>"$tmp/theirs.err"
  theirs=$?
  if [ "$ours" != "$theirs" ] || ! cmp -s "$tmp/ours.out" "$tmp/theirs.out" ||
    ! diff <(sed 's/^qnbd: /PROG: /' "$tmp/ours.err") <(sed 's/^qemu-img: /PROG: /' "$tmp/theirs.err") >/dev/null; then
    echo "FAIL: $1: qnbd exit $ours, qemu-img exit $theirs"
    diff "$tmp/ours.out" "$tmp/theirs.out" | head -20
    status=1
  else
    echo "ok: $1, as qemu-img (exit $ours, $(wc -l <"$tmp/ours.err") error lines)"
  fi
}
compare "snapshot L1 tables past the end of the file"
# A sparse snapshot L1 table of 300,000 entries (2.3 MiB) whose few nonzero
# entries lie between holes of the file and on both sides of qnbd's
# 64 Ki-entry read chunks (qnbd skips the holes and reads the rest in
# chunks; QEMU reads the table whole): the same references counted, the
# same lines.
img="$tmp/snap-l1-sparse.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4096 "$img" 1M
qemu-io -f qcow2 -c "write -q -P 0x5a 0 64k" "$img"
for s in a b; do qemu-img snapshot -c "$s" "$img"; done
python3 - "$img" <<'PY'
import os, struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    nb, table = struct.unpack(">IQ", f.read(72)[60:72])
    f.seek(table)
    l1, l1_size = struct.unpack(">QI", f.read(12))
    f.seek(l1)
    (first,) = struct.unpack(">Q", f.read(8))
    assert first, "the snapshot names an L2 table"
    new = (os.path.getsize(path) + (1 << 20)) // 4096 * 4096
    entries = 300000
    # A run written as data (zeroes) longer than one chunk, so that a chunk
    # ends inside it wherever the file system puts its holes.
    run = 131072
    f.seek(new + run * 8)
    f.write(bytes(70000 * 8))
    for i in (0, 511, 65536, run, run + 65535, run + 65536, run + 69999, 250001, entries - 1):
        f.seek(new + i * 8)
        f.write(struct.pack(">Q", first))
    f.seek(table)
    f.write(struct.pack(">QI", new, entries))
PY
compare "a sparse snapshot L1 table read in chunks"
exit $status
