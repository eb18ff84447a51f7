#!/usr/bin/env bash
# Internal snapshots with empty names: qemu-img snapshot -c '' makes one with
# an empty name, and an image may also carry an empty id (patched here).
# qnbd check, info and a read-only serve handle both (under UBSan too: an
# empty id and name once meant memcpy from a null pointer in check) and
# check reports what qemu-img check reports.
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io python3
requires_qnbd

T=$TMPDIR_TEST
img=$T/sn.qcow2
qemu-img create -q -f qcow2 "$img" 1M
qemu-io -f qcow2 -c 'write -P 7 0 64k' "$img" >/dev/null
qemu-img snapshot -c named "$img"
qemu-img snapshot -c '' "$img"
# Set the last snapshot's id_len to 0 too (its name is already empty); being
# last, its shorter entry moves no other entry.
python3 - "$img" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(72)
    nb, off = struct.unpack(">IQ", h[60:72])
    assert nb == 2, nb
    f.seek(off + 12)
    id_len, name_len = struct.unpack(">HH", f.read(4))
    f.seek(off + 36)
    extra = struct.unpack(">I", f.read(4))[0]
    off += (40 + extra + id_len + name_len + 7) // 8 * 8
    f.seek(off + 12)
    id_len, name_len = struct.unpack(">HH", f.read(4))
    assert (id_len, name_len) == (1, 0), (id_len, name_len)
    f.seek(off + 12)
    f.write(struct.pack(">HH", 0, 0))
PY
qemu-img snapshot -l "$img" | grep -q named || fail "qemu-img no longer lists the second snapshot"

# counts FILE: the check JSON's counts, tool-independent.
counts() {
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))
print(*(d.get(k, 0) for k in ("corruptions", "leaks", "check-errors", "image-end-offset")))' "$1"
}
run_checked 30 "$QNBD" check --output=json "$img"
[[ $RUN_KIND == ok ]] || { cat "$RUN_STDERR" >&2; fail "qnbd check: $RUN_KIND (status $RUN_STATUS)"; }
cp "$RUN_STDOUT" "$T/q.json"
qemu-img check --output=json "$img" >"$T/r.json" || fail "qemu-img check finds errors"
expect_eq "$(counts "$T/q.json")" "$(counts "$T/r.json")" "check counts"

run_checked 30 "$QNBD" info --output=json "$img"
[[ $RUN_KIND == ok ]] || { cat "$RUN_STDERR" >&2; fail "qnbd info: $RUN_KIND (status $RUN_STATUS)"; }
run_checked 30 "$QNBD" convert -O raw "$img" "$T/out.raw"
[[ $RUN_KIND == ok ]] || { cat "$RUN_STDERR" >&2; fail "qnbd convert: $RUN_KIND (status $RUN_STATUS)"; }
qemu-img compare -q -f qcow2 -F raw "$img" "$T/out.raw" || fail "converted data differs"
echo PASS
