#!/usr/bin/env bash
# Zeroing that needs no allocation, beside qemu-nbd: on fresh qcow2 images
# (with and without a backing file, extended L2, v2, preallocated) the same seeded nbdsh
# workload of unaligned WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO), TRIMs and
# WRITEs runs against qnbd and qemu-nbd on identical copies. Every request
# must get the same answer (FAST_ZERO: success or ENOTSUP), the
# base:allocation and qemu:allocation-depth maps must agree (which clusters
# the image itself decides: a TRIM on v3 leaves a zero cluster, as QEMU's
# discard does; on v2 over a backing file it changes nothing) and the images
# must hold the same data (qemu-img compare), with the same layout (qemu-img
# map: which zero clusters kept a host cluster). Last, the space freed
# clusters give back to the file system, --discard=ignore and unmap, beside
# qemu-nbd's. First the issue's
# reproduction: a 32 KiB zero, plain and FAST_ZERO, on an unallocated
# cluster stays sparse.
# A FAST_ZERO refused with ENOTSUP is followed by a plain zero, as copying
# clients do: qemu-nbd may have zeroed the leading part of the range before
# refusing (its block layer splits the request); qnbd decides before it
# changes anything (NBD proto.md: SHOULD NOT modify the export when failing).
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
cmp_map=$INTEGRATION_DIR/map-norm.py

# serve_both IMG_QEMU IMG_QNBD ARGS...: qemu-nbd and qnbd, writable, the
# images in format FMT (default qcow2).
serve_both() {
  local a=$1 b=$2
  shift 2
  start_server "$T/q.pid" qemu-nbd -t -A -f "${FMT:-qcow2}" "$@" -k "$T/q.sock" --pid-file "$T/q.pid" "$a" ||
    fail "qemu-nbd did not start"
  QPID=$SERVER_PID
  QURI="nbd+unix:///?socket=$T/q.sock"
  start_serve -A -f "${FMT:-qcow2}" "$@" "$b"
}
stop_both() {
  stop_server "$QPID" || fail "qemu-nbd did not stop cleanly"
  stop_serve
}
# io_both WHAT QEMU-IO-ARGS...: the same qemu-io commands through qemu-nbd,
# then qnbd; none may fail.
io_both() {
  local what=$1 uri
  shift
  for uri in "$QURI" "$SERVE_URI"; do
    qemu-io -f raw "$@" "$uri" >"$T/io.out" 2>&1
    if grep -q 'failed' "$T/io.out"; then
      cat "$T/io.out" >&2
      fail "$what: a request failed on $uri"
    fi
  done
}
# same_layout IMG_QEMU IMG_QNBD WHAT: `qemu-img map` of the image qemu-nbd
# wrote and of the one qnbd wrote agree (map-norm.py layout: where a host
# cluster lands is each writer's own choice, whether there is one is not).
same_layout() {
  qemu-img map --output=json "$1" >"$1.layout"
  qemu-img map --output=json "$2" >"$2.layout"
  python3 "$cmp_map" layout "$1.layout" "$2.layout" >"$T/layout.cmp" ||
    { cat "$T/layout.cmp" >&2; fail "$3: the image's layout (qemu-img map) differs from qemu-nbd's"; }
}

# The issue's reproduction, through qemu-io over NBD.
qemu-img create -q -f qcow2 "$T/r1.qcow2" 8M
cp "$T/r1.qcow2" "$T/r2.qcow2"
serve_both "$T/r1.qcow2" "$T/r2.qcow2"
for uri in "$QURI" "$SERVE_URI"; do
  qemu-io -f raw -c 'write -z 1M 32k' -c 'write -z -n 2M 32k' "$uri" >"$T/io.out" 2>&1 ||
    { cat "$T/io.out" >&2; fail "qemu-io zeroes failed on $uri"; }
  grep -q 'failed' "$T/io.out" && { cat "$T/io.out" >&2; fail "a zero failed on $uri"; }
  nbdinfo --map "$uri" >"$T/map.$([[ $uri == "$QURI" ]] && echo qemu || echo qnbd)"
done
stop_both
expect_eq "$(cat "$T/map.qnbd")" "$(cat "$T/map.qemu")" "map after the 32 KiB zeroes"
qemu-img map --output=json "$T/r2.qcow2" | grep -q '"data": true' && fail "the 32 KiB zeroes allocated data"

# workload URI SEED OUT: the seeded requests; one answer per line to OUT.
workload() {
  "$PY" - "$@" <<'PY' || fail "workload on $1 failed"
import errno, nbd, random, sys
uri, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rnd = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
cs = 64 << 10
answers = []
for step in range(300):
    # Offsets near cluster edges as often as anywhere.
    off = rnd.choice([rnd.randrange(size), rnd.randrange(size // cs) * cs + rnd.choice([0, 512, cs - 512, 4096])])
    off = min(off, size - 1)
    ln = min(size - off, rnd.choice([512, 4096, 32 << 10, cs - 512, cs, cs + 4096, 3 * cs, rnd.randrange(1, 256 << 10)]))
    op = rnd.random()
    what = ("write" if op < 0.35 else "zero" if op < 0.55 else "zero-nohole" if op < 0.65
            else "zero-fast" if op < 0.85 else "trim")
    try:
        if what == "write":
            h.pwrite(random.Random(step).randbytes(ln), off)
        elif what == "zero":
            h.zero(ln, off)
        elif what == "zero-nohole":
            h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE)
        elif what == "zero-fast":
            h.zero(ln, off, nbd.CMD_FLAG_FAST_ZERO)
        else:
            h.trim(ln, off)
        res = "ok"
    except nbd.Error as e:
        res = errno.errorcode.get(e.errnum, str(e.errnum))
        if what == "zero-fast" and e.errnum == errno.ENOTSUP:
            # What a copying client does next (nbdcopy, qemu-img convert).
            h.zero(ln, off)
            res += "+zero"
    answers.append(f"{step} {what} {off} {ln} {res}")
h.flush()
open(out, "w").write("\n".join(answers) + "\n")
PY
}

# run_case NAME SEED CREATE_ARGS [serve args...]: two identical fresh images,
# the workload on each, then compare answers, maps and data.
# With MAKE=datafile (or datafile-raw) the images have external data files;
# with MAKE=compressed the image starts as compressed clusters (0-3M, 5-6M)
# that internal snapshot s1 shares, then 2-4M rewritten in the active layer.
run_case() {
  local name=$1 seed=$2 create=$3
  shift 3
  if [[ ${MAKE:-} == compressed ]]; then
    truncate -s 8M "$T/src.raw"
    qemu-io -f raw -c 'write -P 0x33 0 3M' -c 'write -P 0x44 5M 1M' "$T/src.raw" >/dev/null
    # shellcheck disable=SC2086 # CREATE_ARGS is a word list
    qemu-img convert -c -f raw -O qcow2 $create "$T/src.raw" "$T/$name.a.qcow2"
    qemu-img snapshot -c s1 "$T/$name.a.qcow2"
    qemu-io -c 'write -P 0x55 2M 2M' "$T/$name.a.qcow2" >/dev/null
    cp "$T/$name.a.qcow2" "$T/$name.b.qcow2"
  elif [[ ${MAKE:-} == datafile* ]]; then
    # Each image its own external data file (raw: data_file_raw=on).
    local raw=off f
    [[ $MAKE == datafile-raw ]] && raw=on
    for f in a b; do
      rm -f "$T/$name.$f.qcow2" "$T/$name.$f.raw"
      # shellcheck disable=SC2086 # CREATE_ARGS is a word list
      qemu-img create -q -f qcow2 -o data_file="$T/$name.$f.raw",data_file_raw=$raw $create "$T/$name.$f.qcow2" 8M
    done
  else
    # Not a copy: cp leaves holes for runs of zeroes in a sparse file, and a
    # metadata-preallocated image's space is what qemu-img map reports from.
    local f
    for f in a b; do
      # shellcheck disable=SC2086 # CREATE_ARGS is a word list
      qemu-img create -q -f qcow2 $create "$T/$name.$f.qcow2" 8M
    done
  fi
  serve_both "$T/$name.a.qcow2" "$T/$name.b.qcow2" "$@"
  workload "$QURI" "$seed" "$T/$name.qemu.txt" &
  local wq=$!
  workload "$SERVE_URI" "$seed" "$T/$name.qnbd.txt"
  wait "$wq" || fail "$name: workload on qemu-nbd failed"
  nbdinfo --map "$QURI" >"$T/$name.qemu.map"
  nbdinfo --map "$SERVE_URI" >"$T/$name.qnbd.map"
  nbdinfo --map=qemu:allocation-depth "$QURI" >"$T/$name.qemu.depth"
  nbdinfo --map=qemu:allocation-depth "$SERVE_URI" >"$T/$name.qnbd.depth"
  stop_both
  diff -u "$T/$name.qemu.txt" "$T/$name.qnbd.txt" >"$T/$name.diff" ||
    { head -n 20 "$T/$name.diff" >&2; fail "$name: answers differ from qemu-nbd's"; }
  # v2 has no zero flag: every FAST_ZERO is refused there, as by qemu-nbd.
  [[ $name == v2* ]] || grep -q 'zero-fast .* ok$' "$T/$name.qnbd.txt" ||
    fail "$name: no FAST_ZERO succeeded (nothing compared)"
  python3 "$cmp_map" nbdinfo "$T/$name.qemu.map" "$T/$name.qnbd.map" >"$T/$name.cmp" ||
    { cat "$T/$name.cmp" >&2; fail "$name: base:allocation map differs from qemu-nbd's"; }
  # Which clusters the image itself decides (a TRIM leaves a zero cluster
  # on v3, as QEMU's discard does, not an unallocated one).
  python3 "$cmp_map" nbdinfo "$T/$name.qemu.depth" "$T/$name.qnbd.depth" >"$T/$name.dcmp" ||
    { cat "$T/$name.dcmp" >&2; fail "$name: qemu:allocation-depth map differs from qemu-nbd's"; }
  qemu-img compare -q -f qcow2 -F qcow2 "$T/$name.a.qcow2" "$T/$name.b.qcow2" || fail "$name: data differs"
  qemu-img check -q "$T/$name.b.qcow2" || fail "$name: qemu-img check finds errors"
  if [[ ${MAKE:-} == compressed ]]; then
    qemu-img convert -l s1 -O raw "$T/$name.b.qcow2" "$T/$name.s1.raw"
    cmp -s "$T/src.raw" "$T/$name.s1.raw" || fail "$name: snapshot s1 changed"
  fi
  # Which zero clusters kept a host cluster (`offset` present): a zero
  # without NO_HOLE releases it even without --discard=unmap, in both.
  same_layout "$T/$name.a.qcow2" "$T/$name.b.qcow2" "$name"
  echo "$name: $(wc -l <"$T/$name.qnbd.txt") requests, $(grep -c 'zero-fast .* ok$' "$T/$name.qnbd.txt") fast zeroes ok, $(head -n 1 "$T/$name.cmp")"
}

# Backing file: data in some clusters, holes elsewhere, shorter than the top.
truncate -s 6M "$T/base.raw"
qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0x11 2M 100k' -c 'write -z 3M 64k' \
  -c 'write -P 0x22 5M 300k' "$T/base.raw" >/dev/null

run_case plain 11 ""
run_case plain-unmap 12 "" --discard=unmap
run_case backing 13 "-b $T/base.raw -F raw"
run_case backing-unmap 14 "-b $T/base.raw -F raw" --discard=unmap
run_case extl2 15 "-o extended_l2=on,cluster_size=64k" --discard=unmap
run_case extl2-backing 16 "-o extended_l2=on -b $T/base.raw -F raw"
run_case v2 17 "-o compat=0.10" --discard=unmap
run_case v2-backing 18 "-o compat=0.10 -b $T/base.raw -F raw"
run_case v2-backing-unmap 19 "-o compat=0.10 -b $T/base.raw -F raw" --discard=unmap
# Other cluster sizes: 512-byte clusters (an L2 span is 32 KiB, so requests
# cover whole spans), 16 KiB with extended L2 (1 KiB subclusters), 2 MiB.
run_case c512-backing 22 "-o cluster_size=512 -b $T/base.raw -F raw" --discard=unmap
run_case c16k-extl2 23 "-o cluster_size=16k,extended_l2=on" --discard=unmap
run_case c2m-extl2-backing 25 "-o cluster_size=2M,extended_l2=on -b $T/base.raw -F raw"
run_case v2-c512 26 "-o cluster_size=512,compat=0.10" --discard=unmap
# Preallocated images: every cluster already has a host cluster (metadata:
# a hole in the file, which qemu-img map reports as zero; falloc: space
# reserved).
run_case prealloc-metadata 52 "-o preallocation=metadata" --discard=unmap
run_case prealloc-metadata-backing 53 "-o preallocation=metadata,extended_l2=on -b $T/base.raw -F raw" --discard=unmap
run_case prealloc-falloc 54 "-o preallocation=falloc" --discard=unmap
# Compressed clusters with extended L2: a zero whose subcluster-aligned
# middle starts or ends inside a compressed cluster writes that whole
# middle as data (QEMU's qcow2_subcluster_zeroize is all or nothing), and a
# FAST_ZERO there is refused.
MAKE=compressed run_case extl2-compressed 34 "-o extended_l2=on"
MAKE=compressed run_case extl2-compressed-unmap 35 "-o extended_l2=on" --discard=unmap
# External data files: a FAST_ZERO over a raw one is the file system's
# cheap zeroing (QEMU's NO_FALLBACK on the data file), and a TRIM with
# --discard=unmap leaves zero clusters there too, the file zeroed.
MAKE=datafile run_case datafile-extl2 43 "-o extended_l2=on" --discard=unmap
MAKE=datafile-raw run_case datafile-raw 44 ""
MAKE=datafile-raw run_case datafile-raw-unmap 45 "" --discard=unmap

# Zeroes over whole L2 spans with no L2 table yet: as QEMU's
# zero_in_l2_slice, the clusters become zero clusters in this layer (new L2
# tables), so qemu:allocation-depth says "local", not "absent". 512-byte
# clusters make a span 32 KiB, so qemu-io's requests cover many; on 64 KiB
# clusters a 1 GiB nbdsh request covers two 512 MiB spans.
echo "== zeroes over whole L2 spans"
spans() {
  local name=$1 create=$2
  shift 2
  # shellcheck disable=SC2086 # CREATE_ARGS is a word list
  qemu-img create -q -f qcow2 $create "$T/$name.a.qcow2" 2G
  cp "$T/$name.a.qcow2" "$T/$name.b.qcow2"
  # shellcheck disable=SC2086 # SPAN_SERVE_ARGS is a word list
  serve_both "$T/$name.a.qcow2" "$T/$name.b.qcow2" ${SPAN_SERVE_ARGS:-}
  for uri in "$QURI" "$SERVE_URI"; do
    "$@" "$uri" || fail "$name: the zeroes failed on $uri"
  done
  nbdinfo --map=qemu:allocation-depth "$QURI" >"$T/$name.qemu.depth"
  nbdinfo --map=qemu:allocation-depth "$SERVE_URI" >"$T/$name.qnbd.depth"
  stop_both
  grep -q local "$T/$name.qemu.depth" || fail "$name: qemu-nbd made nothing local (nothing compared)"
  python3 "$cmp_map" nbdinfo "$T/$name.qemu.depth" "$T/$name.qnbd.depth" >"$T/$name.dcmp" ||
    { cat "$T/$name.dcmp" >&2; fail "$name: qemu:allocation-depth map differs from qemu-nbd's"; }
  same_layout "$T/$name.a.qcow2" "$T/$name.b.qcow2" "$name"
  qemu-img check -q "$T/$name.b.qcow2" || fail "$name: qemu-img check finds errors"
  echo "$name: the same allocation-depth map and layout as qemu-nbd's"
}
qemu_io_zeroes() {
  qemu-io -f raw -c 'write -z 0 1M' -c 'write -z -u 2M 1M' -c 'write -z -n 5M 3M' "$1" >"$T/io.out" 2>&1 &&
    ! grep -q 'failed' "$T/io.out"
}
nbdsh_zeroes() {
  "$PY" - "$1" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.zero(1 << 30, 0)
h.zero(512 << 20, 1 << 30, nbd.CMD_FLAG_NO_HOLE)
h.shutdown()
PY
}
qemu_io_trims() {
  qemu-io -f raw -c 'discard 0 1M' -c 'discard 6M 2M' -c 'discard 9M 100k' "$1" >"$T/io.out" 2>&1 &&
    ! grep -q 'failed' "$T/io.out"
}
spans spans-512 "-o cluster_size=512" qemu_io_zeroes
spans spans-64k "" nbdsh_zeroes
# A TRIM over a backing file writes zero flags over whole spans too, even
# past the end of the (shorter) backing file, as QEMU's discard_in_l2_slice.
SPAN_SERVE_ARGS=--discard=unmap spans spans-512-trim-backing "-o cluster_size=512 -b $T/base.raw -F raw" qemu_io_trims

# Zeroing without unmap keeps a host cluster that an internal snapshot
# shares (QEMU's zero_in_l2_slice keeps it, without OFLAG_COPIED), and a
# later write into that cluster copies it: the snapshot keeps its data.
# `offset` in qemu-img map says whether a zero cluster kept its host
# cluster. NO_HOLE zeroes (qemu-io write -z) keep it, others (write -z -u,
# with --discard=unmap) release it, in both servers.
echo "== zeroes over clusters an internal snapshot shares"
for ext in off on; do
  qemu-img create -q -f qcow2 -o extended_l2=$ext "$T/s.a.qcow2" 8M
  qemu-io -c 'write -P 2 1M 1M' -c 'write -c -P 1 0 64k' "$T/s.a.qcow2" >/dev/null
  qemu-img snapshot -c s1 "$T/s.a.qcow2"
  cp "$T/s.a.qcow2" "$T/s.b.qcow2"
  qemu-img convert -l s1 -O raw "$T/s.a.qcow2" "$T/s1.raw"
  serve_both "$T/s.a.qcow2" "$T/s.b.qcow2" --discard=unmap
  io_both "extended_l2=$ext" -c 'write -z 0 64k' -c 'write -z 1M 128k' -c 'write -z -u 1280k 64k'
  stop_both
  same_layout "$T/s.a.qcow2" "$T/s.b.qcow2" "extended_l2=$ext, after zeroing"
  grep -q '"zero": true, "data": false, "offset"' "$T/s.b.qcow2.layout" ||
    fail "extended_l2=$ext: no zero cluster kept its host cluster (nothing compared)"
  serve_both "$T/s.a.qcow2" "$T/s.b.qcow2"
  for uri in "$QURI" "$SERVE_URI"; do
    qemu-io -f raw -c 'write -P 7 1M 64k' -c 'write -P 8 1088k 4k' "$uri" >/dev/null 2>&1
  done
  stop_both
  for f in a b; do
    qemu-img convert -l s1 -O raw "$T/s.$f.qcow2" "$T/s1.$f.raw"
    cmp "$T/s1.raw" "$T/s1.$f.raw" || fail "extended_l2=$ext: a write after the zeroes changed snapshot s1 ($f)"
    qemu-img check -q "$T/s.$f.qcow2" || fail "extended_l2=$ext: qemu-img check ($f)"
  done
  qemu-img compare -q "$T/s.a.qcow2" "$T/s.b.qcow2" || fail "extended_l2=$ext: data differs"
  echo "extended_l2=$ext: the same layout as qemu-nbd's, the snapshot intact"
done
# The space of freed clusters: a zero without NO_HOLE and a TRIM drop
# clusters from the image's metadata; only with --discard=unmap is their
# space given back to the host file system (QEMU's pass-discard-request),
# a cluster at a time once no snapshot shares it. Judged by the blocks the
# image file occupies, beside qemu-nbd's.
echo "== space of freed clusters"
blocks() { stat -c %b "$1"; }
# freed BLOCKS FILE: 64 KiB clusters of storage FILE gave back since it
# occupied BLOCKS 512-byte blocks.
freed() { echo $((($1 - $(blocks "$2")) * 512 / 65536)); }
# same_space WHAT MIN BLOCKS_A FILE_A BLOCKS_B FILE_B: qnbd's FILE_B gave
# back as many clusters as qemu-nbd's FILE_A, and that one at least MIN.
same_space() {
  local what=$1 min=$2 q b
  q=$(freed "$3" "$4")
  b=$(freed "$5" "$6")
  ((q >= min)) || fail "$what: qemu-nbd gave back only $q clusters, not at least $min (nothing compared)"
  expect_eq "$b" "$q" "$what: 64 KiB clusters given back to the file system"
  echo "$what: qnbd and qemu-nbd gave back $b clusters"
}
for discard in ignore unmap; do
  qemu-img create -q -f qcow2 "$T/f.qcow2" 16M
  qemu-io -c 'write -P 3 0 6M' "$T/f.qcow2" >/dev/null
  qemu-img snapshot -c s1 "$T/f.qcow2"
  qemu-io -c 'write -P 4 4M 4M' "$T/f.qcow2" >/dev/null
  # Copies without holes: a metadata write into a hole would add blocks.
  cp --sparse=never "$T/f.qcow2" "$T/f.a.qcow2"
  cp --sparse=never "$T/f.qcow2" "$T/f.b.qcow2"
  before_a=$(blocks "$T/f.a.qcow2") before_b=$(blocks "$T/f.b.qcow2")
  serve_both "$T/f.a.qcow2" "$T/f.b.qcow2" --discard=$discard
  # 0-2M: shared with s1 (kept); 4M-6M zeroed and 6M-8M trimmed: unshared.
  io_both "discard=$discard" -c 'write -z -u 0 2M' -c 'write -z -u 4M 2M' -c 'discard 6M 2M'
  stop_both
  for f in a b; do qemu-img check -q "$T/f.$f.qcow2" || fail "discard=$discard: qemu-img check ($f)"; done
  same_layout "$T/f.a.qcow2" "$T/f.b.qcow2" "discard=$discard"
  min=0
  [[ $discard == unmap ]] && min=64
  same_space "discard=$discard" $min "$before_a" "$T/f.a.qcow2" "$before_b" "$T/f.b.qcow2"

  # An external data file has no refcounts: a released cluster's range in
  # it is discarded at once (QEMU's qcow2_free_any_cluster), cluster 0 too.
  for f in a b; do
    rm -f "$T/d.$f.qcow2" "$T/d.$f.raw"
    qemu-img create -q -f qcow2 -o data_file="$T/d.$f.raw" "$T/d.$f.qcow2" 16M
    qemu-io -c 'write -P 5 0 8M' "$T/d.$f.qcow2" >/dev/null
  done
  before_a=$(blocks "$T/d.a.raw") before_b=$(blocks "$T/d.b.raw")
  serve_both "$T/d.a.qcow2" "$T/d.b.qcow2" --discard=$discard
  io_both "data file, discard=$discard" -c 'write -z -u 0 2M' -c 'discard 2M 1M' -c 'write -z 4M 1M'
  stop_both
  same_layout "$T/d.a.qcow2" "$T/d.b.qcow2" "data file, discard=$discard"
  qemu-img compare -q "$T/d.a.qcow2" "$T/d.b.qcow2" || fail "data file, discard=$discard: data differs"
  [[ $discard == unmap ]] && min=48
  same_space "data file, discard=$discard" $min "$before_a" "$T/d.a.raw" "$before_b" "$T/d.b.raw"

  # A raw image, and a raw external data file: a zero that may unmap
  # punches the file whatever --discard says (QEMU opens the file under the
  # format node with discard=unmap), a NO_HOLE zero keeps it allocated, and
  # a TRIM punches only with --discard=unmap.
  for f in a b; do
    rm -f "$T/r.$f.raw" "$T/dr.$f.qcow2" "$T/dr.$f.raw"
    truncate -s 16M "$T/r.$f.raw"
    qemu-io -f raw -c 'write -P 6 0 8M' "$T/r.$f.raw" >/dev/null
    qemu-img create -q -f qcow2 -o data_file="$T/dr.$f.raw",data_file_raw=on "$T/dr.$f.qcow2" 16M
    qemu-io -c 'write -P 6 0 8M' "$T/dr.$f.qcow2" >/dev/null
  done
  before_a=$(blocks "$T/r.a.raw") before_b=$(blocks "$T/r.b.raw")
  FMT=raw serve_both "$T/r.a.raw" "$T/r.b.raw" --discard=$discard
  io_both "raw, discard=$discard" -c 'write -z -u 0 2M' -c 'write -z 4M 1M' -c 'discard 6M 1M'
  stop_both
  cmp "$T/r.a.raw" "$T/r.b.raw" || fail "raw, discard=$discard: data differs"
  min=32
  [[ $discard == unmap ]] && min=48
  same_space "raw, discard=$discard" $min "$before_a" "$T/r.a.raw" "$before_b" "$T/r.b.raw"
  before_a=$(blocks "$T/dr.a.raw") before_b=$(blocks "$T/dr.b.raw")
  serve_both "$T/dr.a.qcow2" "$T/dr.b.qcow2" --discard=$discard
  io_both "raw data file, discard=$discard" -c 'write -z -u 0 2M' -c 'write -z 4M 1M' -c 'discard 6M 1M'
  stop_both
  same_layout "$T/dr.a.qcow2" "$T/dr.b.qcow2" "raw data file, discard=$discard"
  cmp "$T/dr.a.raw" "$T/dr.b.raw" || fail "raw data file, discard=$discard: data differs"
  # (qemu-nbd discards a little less of the data file than of a raw image)
  [[ $discard == unmap ]] && min=40
  same_space "raw data file, discard=$discard" $min "$before_a" "$T/dr.a.raw" "$before_b" "$T/dr.b.raw"
done

# --detect-zeroes=unmap: a WRITE of zero bytes is an unmapping zero, so its
# clusters are released and their space given back, as qemu-nbd does
# (--detect-zeroes=on keeps them: the snapshot case above shows NO_HOLE).
qemu-img create -q -f qcow2 "$T/z.qcow2" 16M
qemu-io -c 'write -P 1 0 8M' "$T/z.qcow2" >/dev/null
cp --sparse=never "$T/z.qcow2" "$T/z.a.qcow2"
cp --sparse=never "$T/z.qcow2" "$T/z.b.qcow2"
before_a=$(blocks "$T/z.a.qcow2") before_b=$(blocks "$T/z.b.qcow2")
serve_both "$T/z.a.qcow2" "$T/z.b.qcow2" --discard=unmap --detect-zeroes=unmap
io_both "detect-zeroes=unmap" -c 'write -P 0 0 2M' -c 'write -P 0 4M 4k'
stop_both
same_layout "$T/z.a.qcow2" "$T/z.b.qcow2" "detect-zeroes=unmap"
same_space "detect-zeroes=unmap" 32 "$before_a" "$T/z.a.qcow2" "$before_b" "$T/z.b.qcow2"
echo PASS
