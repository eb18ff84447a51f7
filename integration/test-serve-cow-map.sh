#!/usr/bin/env bash
# Writes that leave part of a new cluster to copy-on-write: qnbd must zero
# or copy those regions exactly where qemu-nbd does, so that the host file
# has the same holes and `nbdinfo --map` reports the same extents (on an
# image QEMU takes for metadata-preallocated, as every small new one is,
# base:allocation reports a hole in the host file under a data cluster as
# zero; docs/architecture.md).
#
# QEMU decides once per allocation (qcow2.c handle_alloc_space,
# is_zero_cow): the head region of the first new cluster and the tail
# region of the last are zeroed by the file system only if both read as
# zeroes, and a tail that runs past the image end never is (block status
# has no answer there). The old build decided each cluster alone: it
# zeroed a tail past the image end, and a tail over nothing beside a head
# over backing data, where qemu-nbd copies zeroes (`nbdinfo --map`: "zero"
# runs inside what qemu-nbd reports as data).
#
# Each case: two sparse copies of one new image, one write pattern through
# qemu-io (one WRITE per command), once through each server; then the
# maps must be identical, the image files too (`cmp`), and qnbd's must
# pass qemu-img check.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo cmp
requires_qnbd

T=$TMPDIR_TEST
cases=0

# run_case NAME IMAGE QEMU-IO-COMMAND...: the writes through each server on
# its own copy of IMAGE, then compare.
run_case() {
  local name=$1 image=$2 server uri="nbd+unix:///?socket=$T/s.sock"
  shift 2
  local writes=()
  for c in "$@"; do writes+=(-c "$c"); done
  for server in qnbd qemu; do
    cp --sparse=always "$image" "$T/$server.qcow2"
    if [[ $server == qnbd ]]; then start_tool qnbd -f qcow2 "$T/qnbd.qcow2"; else start_tool qemu-nbd -f qcow2 "$T/qemu.qcow2"; fi
    timeout 60 qemu-io -f raw "${writes[@]}" "$uri" >/dev/null || fail "$name: qemu-io through $server failed"
    timeout 60 nbdinfo --map "$uri" >"$T/$server.map" || fail "$name: nbdinfo --map of $server failed"
    stop_server "$SERVER_PID" || fail "$name: $server did not stop cleanly"
  done
  if ! diff -u "$T/qemu.map" "$T/qnbd.map" >&2; then
    fail "$name: qnbd's map differs from qemu-nbd's (above: - qemu-nbd, + qnbd)"
  fi
  cmp "$T/qnbd.qcow2" "$T/qemu.qcow2" || fail "$name: qnbd's image differs from qemu-nbd's"
  qemu-img check -q "$T/qnbd.qcow2" || fail "$name: qemu-img check of qnbd's image"
  cases=$((cases + 1))
  echo "ok: $name"
}

# The last cluster holds only 512 bytes of the disk (8 MiB + 512).
qemu-img create -q -f qcow2 "$T/odd0.qcow2" $(((8 << 20) + 512))
cp --sparse=always "$T/odd0.qcow2" "$T/odd.qcow2"
run_case "a write across two new clusters to the image end" "$T/odd.qcow2" "write -P 0x55 7857152 531968"
run_case "a write from inside the next-to-last cluster into the last" "$T/odd.qcow2" "write -P 0x55 8384512 4608"
run_case "a write inside the last cluster" "$T/odd.qcow2" "write -P 0x55 8388608 512"
run_case "a write with both regions inside the disk" "$T/odd.qcow2" "write -P 0x55 100000 200000"

# Over a backing file with data in the second cluster: the first write's
# head region reads that data, its tail region nothing.
qemu-img create -q -f qcow2 "$T/base.qcow2" 8M
qemu-io -f qcow2 -c "write -P 7 64k 64k" "$T/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b "$T/base.qcow2" -F qcow2 "$T/over0.qcow2" 8M
cp --sparse=always "$T/over0.qcow2" "$T/over.qcow2"
run_case "a head over backing data, a tail over nothing" "$T/over.qcow2" \
  "write -P 0x55 100000 200000" "write -P 0x56 1000000 200000"

expect_eq "$cases" 5 "cases compared"
echo "PASS"
