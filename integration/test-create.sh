#!/usr/bin/env bash
# qnbd create vs qemu-img create: for each option combination both tools
# create an image; qemu-img info --output=json must report the same
# virtual size, cluster size, backing file and format-specific data,
# qemu-img check must accept ours, and it must stay clean after qemu-io
# writes data into it. Layouts qemu-img produces deterministically must
# also be byte-identical.
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

qemu-img create -q -f raw base.raw 100M
qemu-img create -q -f qcow2 base.qcow2 200M
failures=0
cases=0
# Cases are independent (each works in its own directory), so they run
# JOBS at a time; the tools mostly wait on the disk and on process start-up.
JOBS=${QNBD_TEST_JOBS:-$(($(nproc) + 1))}

fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# Prints the fields of qemu-img info that describe what create wrote (not
# sizes on disk, not file names that differ between the two images) for
# q.qcow2 and r.qcow2, one line each, then q.qcow2's virtual size: one
# python start-up per case instead of three.
info_fields() {
  qemu-img info --output=json q.qcow2 >q.json && qemu-img info --output=json r.qcow2 >r.json &&
    python3 -c '
import json, sys
for name in ("q.json", "r.json"):
    i = json.load(open(name))
    fs = i.get("format-specific", {}).get("data", {})
    fs.pop("data-file", None)  # names differ by construction; checked separately
    out = {k: i.get(k) for k in ("virtual-size", "cluster-size", "format", "backing-filename",
                                 "backing-filename-format", "dirty-flag")}
    out["format-specific"] = fs
    print(json.dumps(out, sort_keys=True))
print(json.load(open("q.json"))["virtual-size"])'
}

# run_case N IDENTICAL OPTIONS SIZE [extra args...], in directory case-N.
# DATA in OPTIONS becomes a per-tool external data file name.
run_case() {
  local n=$1 identical=$2 opts=$3 size=$4
  shift 4
  mkdir "case-$n" && cd "case-$n" || return
  local qo=${opts//DATA/q-data.raw} ro=${opts//DATA/r-data.raw}
  local desc="[-o $opts] $size $*"
  # Backing files are named relative to the image, as the caller wrote them.
  local args=() a
  for a in "$@"; do [[ $a == base.* ]] && args+=("../$a") || args+=("$a"); done
  # Both tools at once: the pair is the slow part of a case.
  "$QNBD" create -q -f qcow2 ${opts:+-o "$qo"} "${args[@]}" q.qcow2 ${size:+"$size"} &
  local qpid=$!
  qemu-img create -q -f qcow2 ${opts:+-o "$ro"} "${args[@]}" r.qcow2 ${size:+"$size"} || {
    fail "qemu-img create failed (test bug): $desc"
    wait $qpid
    return
  }
  wait $qpid || {
    fail "qnbd create failed: $desc"
    return
  }
  local fields qi ri vsize
  mapfile -t fields < <(info_fields)
  qi=${fields[0]-} ri=${fields[1]-} vsize=${fields[2]-0}
  [ -n "$qi" ] && [ "$qi" = "$ri" ] || fail "info differs: $desc
  qnbd:     $qi
  qemu-img: $ri"
  if [[ $opts == *DATA* ]]; then
    grep -q '"data-file": "q-data.raw"' q.json || fail "data-file name missing: $desc"
    [ "$(stat -c %s q-data.raw)" = "$(stat -c %s r-data.raw)" ] || fail "data file size differs: $desc"
  fi
  local same=no
  if [ "$identical" = yes ]; then
    if cmp -s q.qcow2 r.qcow2; then
      same=yes
    else
      fail "not byte-identical to qemu-img's image: $desc"
    fi
  fi
  qemu-img check -q q.qcow2 || fail "qemu-img check rejects fresh image: $desc"
  # Write data through QEMU's own driver and re-check. An image identical
  # to qemu-img's own teaches nothing here (qemu would be writing into its
  # own layout), so only differing layouts and the plain default (which
  # proves this step works) get the writes.
  [ "$same" = yes ] && [ "$opts$size" != 1G ] && return
  if [ "$vsize" -ge 1048576 ]; then
    qemu-io -f qcow2 -c "write -P 0xab 0 64k" -c "write -P 0xcd $((vsize - 70000)) 65536" \
      -c "write -z 131072 65536" -c "read -P 0xab 0 64k" q.qcow2 >/dev/null ||
      fail "qemu-io write/read-back failed: $desc"
    qemu-img check -q q.qcow2 || fail "qemu-img check after writes: $desc"
  fi
}

# check_case IDENTICAL OPTIONS SIZE [extra args...]: run_case in the
# background, at most JOBS at once; its output goes to case-N.log.
check_case() {
  cases=$((cases + 1))
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  (failures=0 && run_case "$cases" "$@") >"case-$cases.log" 2>&1 &
}

# Layouts that must match qemu-img to the byte.
for cs in 512 4k 64k 2M; do
  for rb in 1 2 4 8 16 32 64; do
    check_case yes "cluster_size=$cs,refcount_bits=$rb" 3G
  done
done
check_case yes "" 1G
check_case yes "" 0
check_case yes "" 1000
check_case yes "" 1.5k
check_case yes "compat=0.10" 1G
check_case yes "compat=v2,cluster_size=4096" 10G
check_case yes "compat=1.1" 1G
check_case yes "lazy_refcounts=on" 1G
check_case yes "extended_l2=on" 1G
check_case yes "extended_l2=on,cluster_size=16k" 5G
check_case yes "compression_type=zstd" 1G
check_case yes "compression_type=zlib,lazy_refcounts=on,refcount_bits=8" 7G
check_case yes "preallocation=metadata" 300M
check_case yes "preallocation=metadata,cluster_size=4k" 100M
check_case yes "extended_l2=on,preallocation=metadata" 100M
check_case yes "" "" -b base.raw -F raw
check_case yes "" "" -b base.qcow2 -F qcow2
check_case yes "" 5G -b base.qcow2 -F qcow2
check_case yes "cluster_size=4k" 5G -b base.qcow2 -F qcow2
check_case yes "extended_l2=on,preallocation=metadata" "" -b base.qcow2 -F qcow2
# Same information, layout may differ (external data file names, qemu's
# own preallocation and refcount growth strategies).
check_case no "data_file=DATA" 1G
check_case no "data_file=DATA,data_file_raw=on" 1G
check_case no "data_file=DATA,preallocation=metadata" 100M
check_case no "data_file=DATA,preallocation=full" 10M
check_case no "preallocation=full,cluster_size=4k" 10M
check_case no "preallocation=falloc" 10M
# qemu-img needs minutes to preallocate hundreds of MiB in 512-byte
# clusters (a flush per refcount block), so the sizes are the smallest that
# still make both tools grow the refcount structure: 16M with 1-bit
# refcounts needs 9 refcount blocks; 4M with 64-bit refcounts needs a
# refcount table of several clusters.
check_case no "preallocation=metadata,cluster_size=512,refcount_bits=1" 16M
check_case no "preallocation=metadata,cluster_size=512,refcount_bits=64,lazy_refcounts=on" 4M
wait
for ((n = 1; n <= cases; n++)); do
  if grep -q '' "case-$n.log"; then
    cat "case-$n.log"
  fi
  failures=$((failures + $(grep -c '^FAIL' "case-$n.log")))
done

# Options qemu-img refuses must be refused with the same message.
expect_error() {
  local opts=$1
  cases=$((cases + 1))
  local qerr rerr
  qerr=$("$QNBD" create -q -f qcow2 -o "$opts" bad.qcow2 1M 2>&1 >/dev/null) && fail "qnbd accepted -o $opts"
  rerr=$(qemu-img create -q -f qcow2 -o "$opts" bad.qcow2 1M 2>&1 >/dev/null)
  # Compare the message after the "prog: file: " prefix.
  [ "${qerr#*bad.qcow2: }" = "${rerr#*bad.qcow2: }" ] ||
    fail "message for -o $opts: qnbd '$qerr' vs qemu-img '$rerr'"
}
for opts in "compat=0.10,lazy_refcounts=on" "compat=0.10,refcount_bits=8" "refcount_bits=3" \
  "refcount_bits=128" "cluster_size=1000" "cluster_size=256" "cluster_size=4M" \
  "extended_l2=on,cluster_size=4k" "compat=0.10,extended_l2=on" "data_file_raw=on" \
  "compat=0.10,data_file=x.raw" "compression_type=lz4" "compat=0.10,compression_type=zstd" \
  "compat=2.0" "preallocation=foo" "lazy_refcounts=maybe" "foo=bar"; do
  expect_error "$opts"
done
cases=$((cases + 1))
"$QNBD" create -q -f qcow2 -b base.qcow2 nofmt.qcow2 2>/dev/null && fail "backing without -F accepted"
cases=$((cases + 1))
"$QNBD" create -q -f qcow2 nosize.qcow2 2>/dev/null && fail "missing size accepted"

# Raw images: size rounded up to 512 like qemu-img.
for size in 0 1000 1M 3G; do
  cases=$((cases + 1))
  rm -f q.raw r.raw
  "$QNBD" create -q -f raw q.raw $size && qemu-img create -q -f raw r.raw $size
  [ "$(stat -c %s q.raw)" = "$(stat -c %s r.raw)" ] || fail "raw size for $size"
done

echo "$cases cases, $failures failures"
[ "$failures" -eq 0 ]
