#!/usr/bin/env bash
# qnbd check vs qemu-img check on deliberately damaged images (qemu-img
# images patched with python): the JSON counts and the exit status must be
# the same, and after `qnbd check -r all` (and -r leaks, where qemu-img can
# repair with it) qemu-img check must find the image clean (or, for -r
# leaks, agree with what qemu-img -r leaks leaves behind).
set -u
for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool missing"; exit 77; }
done
QNBD=${QNBD:?QNBD must point at the qnbd binary}
[ -x "$QNBD" ] || { echo "SKIP: $QNBD not built"; exit 77; }
QNBD=$(realpath "$QNBD")

tmp=$(mktemp -d)
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
cd "$tmp" || exit 1
failures=0
cases=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# Patch helper: python with the image loaded as `d` (bytearray) and
# helpers for the header fields, refcounts and L1/L2 entries.
patch() {
  local img=$1 code=$2
  python3 - "$img" "$code" <<'EOF'
import struct, sys
path, code = sys.argv[1], sys.argv[2]
d = bytearray(open(path, 'rb').read())
be64 = lambda o: struct.unpack('>Q', d[o:o+8])[0]
be32 = lambda o: struct.unpack('>I', d[o:o+4])[0]
be16 = lambda o: struct.unpack('>H', d[o:o+2])[0]
def put64(o, v): d[o:o+8] = struct.pack('>Q', v)
def put32(o, v): d[o:o+4] = struct.pack('>I', v)
cb = be32(20); cs = 1 << cb
order = be32(96) if be32(4) == 3 else 4
rt = be64(48)
l1 = be64(40)
MASK = 0x00fffffffffffe00
def l2(i=0): return be64(l1 + 8*i) & MASK
def l2e(i, t=0): return be64(l2(t) + 8*i)
def put_l2e(i, v, t=0): put64(l2(t) + 8*i, v)
def set_rc(cluster, v):
    assert order == 4
    per = cs * 8 // 16
    blk = be64(rt + 8*(cluster // per)) & ~0x1ff
    d[blk + 2*(cluster % per): blk + 2*(cluster % per) + 2] = struct.pack('>H', v)
def get_rc(cluster):
    per = cs * 8 // 16
    blk = be64(rt + 8*(cluster // per)) & ~0x1ff
    return struct.unpack('>H', d[blk + 2*(cluster % per): blk + 2*(cluster % per) + 2])[0]
def grow(clusters): d.extend(b'\0' * (clusters * cs))
def bmdir():
    # Bitmaps extension (0x23852875): its bitmap_directory_offset.
    o = be32(100) if be32(4) == 3 else 72
    while be32(o) != 0:
        t, n = be32(o), be32(o + 4)
        if t == 0x23852875: return be64(o + 8 + 16)
        o += 8 + (n + 7) // 8 * 8
    raise SystemExit("no bitmaps extension")
def bmtab(): return be64(bmdir())
def bmdata():
    for i in range(be32(bmdir() + 8)):
        e = be64(bmtab() + 8*i) & MASK
        if e: return e
    raise SystemExit("no bitmap data cluster")
exec(code)
open(path, 'wb').write(d)
EOF
}

# A small image with data, a compressed cluster, an internal snapshot (so
# some clusters have refcount 2) and a persistent bitmap.
make_base() {
  rm -f base.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=4k base.qcow2 4M
  qemu-io -f qcow2 -c "write -P 1 0 32k" -c "write -c -P 2 64k 4k" -c "write -c -P 3 68k 4k" \
    -c "write -P 4 1M 8k" base.qcow2 >/dev/null
  qemu-img snapshot -c snap1 base.qcow2
  qemu-io -f qcow2 -c "write -P 5 8k 4k" base.qcow2 >/dev/null
  qemu-img bitmap --add base.qcow2 b0
  qemu-io -f qcow2 -c "write -P 6 2M 4k" base.qcow2 >/dev/null
}

json_counts() {
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
print(" ".join("%s=%s" % (k, j.get(k, 0)) for k in ("check-errors", "corruptions", "leaks",
      "image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
      "compressed-clusters")))' "$1"
}

# compare_check_only NAME PATCH MARKER: `check` alone (no repair) on base
# with PATCH applied: same exit status and human output as qemu-img, whose
# output must match the regex MARKER (the damage applied).
compare_check_only() {
  local name=$1 code=$2 marker=$3
  cases=$((cases + 1))
  cp base.qcow2 "$name.qcow2"
  patch "$name.qcow2" "$code"
  "$QNBD" check "$name.qcow2" >q.txt 2>&1
  local qrc=$?
  qemu-img check "$name.qcow2" >r.txt 2>&1
  [ "$qrc" = "$?" ] || fail "$name: exit status differs"
  grep -q "$marker" r.txt || fail "$name: the damage did not apply: $(head -2 r.txt)"
  cmp -s q.txt r.txt || fail "$name: human output differs: $(diff q.txt r.txt | head -4)"
}

# compare NAME PATCH fixable|unfixable
compare() {
  local name=$1 code=$2 fixable=${3:-fixable}
  cases=$((cases + 1))
  cp base.qcow2 "$name.qcow2"
  if [ -n "$code" ] && ! patch "$name.qcow2" "$code"; then
    fail "$name: the damage could not be applied"
    return
  fi
  "$QNBD" check --output=json "$name.qcow2" >q.json 2>q.err
  local qrc=$?
  qemu-img check --output=json "$name.qcow2" >r.json 2>r.err
  local rrc=$?
  [ "$qrc" = "$rrc" ] || fail "$name: exit status qnbd=$qrc qemu-img=$rrc"
  if [ -s r.json ]; then
    local qc rc
    qc=$(json_counts q.json 2>/dev/null) rc=$(json_counts r.json)
    [ "$qc" = "$rc" ] || fail "$name: counts differ
  qnbd:     $qc
  qemu-img: $rc"
  fi
  # Human output and the per-problem messages agree too.
  "$QNBD" check "$name.qcow2" >q.txt 2>&1
  qemu-img check "$name.qcow2" >r.txt 2>&1
  sed -i 's/^qemu-img: /qnbd: /' r.txt
  cmp -s q.txt r.txt || fail "$name: human output differs: $(diff q.txt r.txt | head -6)"

  # Repair with -r all. Fixable damage: qemu-img check must then find
  # nothing. Damage qemu-img cannot repair either: ours must leave no more
  # errors and leaks than qemu-img check -r all leaves.
  cases=$((cases + 1))
  cp "$name.qcow2" "$name-all.qcow2"
  cp "$name.qcow2" "$name-allr.qcow2"
  "$QNBD" check -q -r all "$name-all.qcow2" >/dev/null 2>&1
  local arc=$?
  qemu-img check -q -r all "$name-allr.qcow2" >/dev/null 2>&1
  if [ "$fixable" = fixable ]; then
    if qemu-img check "$name-all.qcow2" >all.txt 2>&1; then
      [ "$arc" = 0 ] || fail "$name: qnbd check -r all exited $arc on an image it repaired"
      # Data the damage did not touch reads the same after the repair.
      qemu-io -f qcow2 -c "read -P 4 1M 8k" "$name-all.qcow2" >/dev/null ||
        fail "$name: data at 1M changed by repair"
    else
      fail "$name: qemu-img check after qnbd check -r all: $(head -5 all.txt)"
    fi
  else
    local ours theirs
    ours=$(qemu-img check --output=json "$name-all.qcow2" 2>/dev/null | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j.get("corruptions",0)+j.get("leaks",0))')
    theirs=$(qemu-img check --output=json "$name-allr.qcow2" 2>/dev/null | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j.get("corruptions",0)+j.get("leaks",0))')
    [ "${ours:-999999}" -le "${theirs:-0}" ] ||
      fail "$name: after -r all qnbd leaves $ours problems, qemu-img $theirs"
  fi

  # Repair with -r leaks: no leaks afterwards unless the check had to give
  # up (refcount structure needs a rebuild: exit 1, like qemu-img).
  cases=$((cases + 1))
  cp "$name.qcow2" "$name-lq.qcow2"
  "$QNBD" check -q -r leaks "$name-lq.qcow2" >/dev/null 2>&1
  local lq=$?
  if [ "$lq" != 1 ]; then
    local left
    left=$(qemu-img check --output=json "$name-lq.qcow2" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("leaks",0))')
    [ "$left" = 0 ] || fail "$name: $left leaks left after qnbd check -r leaks (exit $lq)"
  fi
}

make_base
compare clean ""
# A cluster past all metadata marked used: a leak.
compare leak "grow(2); set_rc(len(d)//cs - 1, 1)"
# Refcount of a data cluster too high: a leak (and then COPIED is wrong).
compare refcount-high "set_rc((l2e(20) & MASK)//cs, get_rc((l2e(20) & MASK)//cs) + 1)"
# Refcount of a data cluster 0 while referenced: needs a rebuild.
compare refcount-zero "set_rc((l2e(20) & MASK)//cs, 0)"
# Refcount too low but not 0 (a cluster shared with the snapshot).
compare refcount-low "set_rc((l2e(0) & MASK)//cs, 1)"
# Two L2 entries point at one cluster.
compare referenced-twice "put_l2e(3, l2e(2))"
# COPIED cleared on a data cluster with refcount 1.
compare copied-cleared "put_l2e(20, l2e(20) & ~(1 << 63))"
# COPIED set on a shared cluster.
compare copied-shared "put_l2e(0, l2e(0) | (1 << 63))"
# COPIED flag of the L2 table in the L1 table.
compare l1-copied "put64(l1, be64(l1) ^ (1 << 63))"
# Persistent bitmap structures: refcounts of the bitmap directory, the
# bitmap table and a bitmap data cluster.
compare bitmap-dir-unrefd "set_rc(bmdir()//cs, 0)"
compare bitmap-table-rc2 "set_rc(bmtab()//cs, 2)"
compare bitmap-data-unrefd "set_rc(bmdata()//cs, 0)"
# Misaligned data cluster offset.
compare misaligned-data "put_l2e(21, l2e(21) + 512)" unfixable
# Misaligned L2 table offset in L1.
compare misaligned-l2 "put64(l1 + 8*0, be64(l1) + 512)" unfixable
# Refcount block outside the image.
compare refblock-outside "put64(rt, 0x10000000)"
# Refcount block misaligned.
compare refblock-misaligned "put64(rt, be64(rt) + 512)"
# Refcount table's own cluster not counted.
compare reftable-unrefd "set_rc(rt//cs, 0)"
# Compressed cluster with COPIED set.
compare compressed-copied "put_l2e(16, l2e(16) | (1 << 63))"
# Data cluster beyond the end of the file.
compare beyond-eof "put_l2e(22, (1 << 63) | (len(d) + 64*cs))" unfixable
# L1 entries as qemu-img check reads them: reserved bits are reported; a
# nonzero entry whose offset field is zero names the header cluster as its
# L2 table (counted and walked); a table past the end of the file reads as
# zeroes.
compare l1-reserved-bits "put64(l1, be64(l1) | 0x6)" unfixable
compare l1-offset-zero "put64(l1 + 8, 1 << 63)" unfixable
compare l1-past-eof "put64(l1 + 8, (1 << 63) | (len(d) + 64*cs))" unfixable
# Refcount table entries with reserved bits are reported before anything
# else about them, and force a rebuild (qemu-img repairs them).
compare reftable-reserved-bits "put64(rt, be64(rt) | 0x5)"
compare reftable-reserved-bits-zero-entry "put64(rt + 8, 0x1)"
# COPIED flags are checked in an L2 table at an unaligned offset too.
compare misaligned-l2-copied "o = l2(); put64(l1, be64(l1) + 512); put64(o + 512 + 8*5, be64(o + 8*2) & ~(1 << 63))" unfixable
# Snapshot id and name print as C strings (up to the first NUL): zeroed
# id and name, and an unaligned L1 offset so that check names the snapshot.
# (Human output and status only: qemu-img -r all drops such a snapshot,
# which qnbd's repair does not do.)
compare_check_only snapshot-nul-name "o = be64(64); put64(o, be64(o) | 1); s = o + 40 + be32(o + 36); d[s:s + be16(o + 12) + be16(o + 14)] = bytes(be16(o + 12) + be16(o + 14))" "^ERROR snapshot  () l1_offset="

# A version 3 snapshot entry with less than 16 bytes of extra data is
# reported as incomplete, first, as qemu-img does (check only: qemu-img -r
# all rewrites the snapshot table, qnbd leaves it reported).
compare_check_only snapshot-incomplete "o = be64(64); put32(o + 36, 8)" "^ERROR snapshot table entry 0 is incomplete"

# Extended L2 entries (qcow2.txt "Extended L2 Entries"): an unallocated
# cluster whose bitmap claims allocated subclusters is a corruption that no
# repair clears.
mv base.qcow2 base-std.qcow2
qemu-img create -q -f qcow2 -o cluster_size=64k,extended_l2=on base.qcow2 4M
qemu-io -f qcow2 -c "write -P 1 0 64k" -c "write -P 4 1M 8k" base.qcow2 >/dev/null
compare ext-unallocated-bitmap "put64(l2(0) + 16*3 + 8, 0x3)" unfixable
compare ext-unallocated-bitmap-and-reserved "put64(l2(0) + 16*5, 0x10); put64(l2(0) + 16*5 + 8, 0x1)" unfixable
compare ext-alloc-and-zero "put64(l2(0) + 8, 0x0000000100000001)" unfixable
mv base-std.qcow2 base.qcow2

# A reference count the image's refcount width cannot hold (refcount_bits=1,
# a data cluster named twice) is an overflow, as qemu-img reports it.
mv base.qcow2 base-std.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=1 base.qcow2 4M
qemu-io -f qcow2 -c "write -P 1 0 32k" -c "write -P 4 1M 8k" base.qcow2 >/dev/null
compare refcount-overflow "put_l2e(5, l2e(4))" unfixable
# The same overflow on the refcount block itself (a data cluster that is
# also the block), then a rebuild (a reserved bit in another table entry):
# the rebuild must not take the old block's reference off a count that
# overflowed, or the data cluster comes out with refcount 0.
compare refcount-overflow-rebuild "put_l2e(20, (1 << 63) | (be64(rt) & ~0x1ff)); put64(rt + 8, 0x1)" unfixable
mv base-std.qcow2 base.qcow2

# A repair write that would land on metadata is refused, as qemu-img check
# -r all refuses it: L1[1] has a zero offset field, so the header cluster is
# walked as its L2 table, and a "preallocated, unaligned" entry planted in
# the header cluster's unused tail asks for a repair there. qemu-img marks
# the image corrupt, prints the same lines and fails; qnbd used to write
# the fix into the header cluster. (No persistent bitmap here: opening an
# image with one read-write makes qemu-img rewrite the header cluster first,
# which clears the planted entry.)
cases=$((cases + 1))
rm -f hdr.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4k hdr.qcow2 4M
qemu-io -f qcow2 -c "write -P 1 0 32k" -c "write -P 4 1M 8k" hdr.qcow2 >/dev/null
cp hdr.qcow2 hdr-orig.qcow2
patch hdr.qcow2 "put64(l1 + 8, 1 << 63); put64(cs - 8, 0x201)"
cp hdr.qcow2 hdr-r.qcow2
"$QNBD" check -r all hdr.qcow2 >q.txt 2>&1
qrc=$?
qemu-img check -r all hdr-r.qcow2 >r.txt 2>&1
rrc=$?
sed -i 's/^qemu-img: /qnbd: /' r.txt
[ "$qrc" = "$rrc" ] || fail "header-repair: exit status qnbd=$qrc qemu-img=$rrc"
cmp -s q.txt r.txt || fail "header-repair: output differs: $(diff q.txt r.txt | head -6)"
grep -q "overlaps with qcow2_header" q.txt || fail "header-repair: no overlap refusal: $(tail -3 q.txt)"
qemu-img info --output=json hdr.qcow2 | grep -q '"corrupt": true' || fail "header-repair: not marked corrupt"
python3 -c '
import struct, sys
a, b = (open(f, "rb").read(4088) for f in sys.argv[1:])
# The header and its extensions are untouched but for the corrupt bit.
sys.exit(a[:72] != b[:72] or a[80:] != b[80:])' hdr.qcow2 hdr-orig.qcow2 || fail "header-repair: header cluster rewritten"

# Bigger, fragmented image with 512-byte clusters and refcount_bits=1 made
# by qemu-img itself: must be clean for both, same statistics.
cases=$((cases + 1))
rm -f small.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 small.qcow2 64M
for i in $(seq 0 37); do echo "write -P $i $((i * 997 * 512)) 3k"; done >cmds
qemu-io -f qcow2 small.qcow2 <cmds >/dev/null
"$QNBD" check --output=json small.qcow2 >q.json 2>/dev/null || fail "small: qnbd check not clean"
qemu-img check --output=json small.qcow2 >r.json
[ "$(json_counts q.json)" = "$(json_counts r.json)" ] || fail "small: counts differ"

# A crashed writer with lazy refcounts: dirty bit set, refcounts missing.
# Same report as qemu-img; -r all repairs and clears the dirty bit.
cases=$((cases + 1))
rm -f dirty.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4k dirty.qcow2 64M
# (inner shell so bash's "Aborted" notice goes to /dev/null too)
bash -c 'qemu-io -f qcow2 -c "write -P 1 0 100k" -c abort dirty.qcow2; true' >/dev/null 2>&1
"$QNBD" check --output=json dirty.qcow2 >q.json 2>/dev/null
qrc=$?
qemu-img check --output=json dirty.qcow2 >r.json 2>/dev/null
[ "$qrc" = "$?" ] || fail "dirty: exit status differs"
[ "$(json_counts q.json)" = "$(json_counts r.json)" ] || fail "dirty: counts differ"
"$QNBD" check -q -r all dirty.qcow2 >/dev/null 2>&1 || fail "dirty: -r all failed"
qemu-img check -q dirty.qcow2 || fail "dirty: not clean after -r all"
qemu-img info --output=json dirty.qcow2 | grep -q '"dirty-flag": false' || fail "dirty: bit still set"
qemu-io -f qcow2 -c "read -P 1 0 100k" dirty.qcow2 >/dev/null || fail "dirty: data lost"

# After a refcount rebuild, -r all also repairs the leaks that the recount
# against the new structure finds, as qemu-img does: here the header cluster
# is walked as an L2 table (L1[1] has a zero offset field), so moving the
# refcount table changes what the header's entries name, and the old
# table's cluster is left with a count nothing references.
cases=$((cases + 1))
cp hdr-orig.qcow2 rb.qcow2
patch rb.qcow2 "put64(l1 + 8, 1 << 63); put64(rt, be64(rt) + 512)"
cp rb.qcow2 rb-r.qcow2
"$QNBD" check -q -r all rb.qcow2 >/dev/null 2>&1
qemu-img check -q -r all rb-r.qcow2 >/dev/null 2>&1
left() { qemu-img check --output=json "$1" 2>/dev/null | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j.get("corruptions",0), j.get("leaks",0))'; }
read -r ours_c ours_l <<<"$(left rb.qcow2)"
read -r theirs_c theirs_l <<<"$(left rb-r.qcow2)"
if [ -z "$ours_l" ] || [ -z "$theirs_l" ] || [ "$ours_l" -gt "$theirs_l" ] || [ "$ours_l" -ne 0 ] || [ "$ours_c" -gt "$theirs_c" ]; then
  fail "rebuild-leaks: after -r all qnbd leaves ${ours_c:-?} corruptions ${ours_l:-?} leaks, qemu-img ${theirs_c:-?} ${theirs_l:-?}"
fi

# Raw images cannot be checked (qemu-img's status 63).
cases=$((cases + 1))
qemu-img create -q -f raw r.raw 1M
"$QNBD" check r.raw >/dev/null 2>&1
rc=$?
qemu-img check r.raw >/dev/null 2>&1
[ "$rc" = "$?" ] || fail "raw: exit status differs"

echo "$cases cases, $failures failures"
[ "$failures" -eq 0 ]
