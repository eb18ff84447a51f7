#!/usr/bin/env bash
# BLOCK_STATUS with REQ_ONE as QEMU's NBD client sends it (always): `qemu-img
# map` over NBD walks the whole export one extent per request. qnbd asks its
# engine for only the extents REQ_ONE needs and extends while equal
# neighbours merge; the maps must be byte-identical to those over qemu-nbd:
# - a qcow2 with 512-byte clusters, every other one allocated (the worst
#   case: every extent one cluster);
# - a qcow2 over a raw backing file (data, zero clusters, discarded ranges,
#   backing data showing through), for base:allocation and, through
#   x-dirty-bitmap, qemu:allocation-depth and a dirty bitmap.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd python3

# Every other 512-byte cluster holds data; the zero ones are left out (-S 512).
frag=$TMPDIR_TEST/frag.qcow2
python3 - "$TMPDIR_TEST/frag.raw" <<'PY'
import os, sys
block = os.urandom(512)
with open(sys.argv[1], "wb") as f:
    f.write((block + bytes(512)) * (8 << 10))  # 8 MiB
PY
qemu-img convert -q -f raw -O qcow2 -o cluster_size=512 -S 512 "$TMPDIR_TEST/frag.raw" "$frag"

base=$TMPDIR_TEST/base.raw
chain=$TMPDIR_TEST/chain.qcow2
truncate -s 16M "$base"
qemu-io -f raw -c 'write -P 1 0 2M' -c 'write -P 2 6M 64k' -c 'write -P 3 12M 3M' "$base" >/dev/null
qemu-img create -q -f qcow2 -F raw -b "$base" "$chain" 16M
qemu-img bitmap --add -g 64k "$chain" b0
qemu-io -f qcow2 -c 'write -P 4 1M 64k' -c 'write -z 1536k 128k' -c 'write -P 5 5M 1M' \
  -c 'discard 12M 512k' -c 'write -z 14M 64k' -c 'write -P 6 15M 4k' "$chain" >/dev/null

entries() {
  python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))))' "$1"
}

# maps IMAGE NAME [qnbd serve / qemu-nbd extra args]: the qemu-img maps over
# qemu-nbd and over qnbd must be identical, for each context in $contexts.
maps() {
  local img=$1 name=$2
  shift 2
  local qsock=$TMPDIR_TEST/qemu-$name.sock ctx out
  qemu-nbd -r -t -k "$qsock" -f qcow2 "$@" "$img" &
  local qpid=$!
  cleanup_fn "kill $qpid 2>/dev/null"
  wait_ready -S "$qsock" $qpid || fail "qemu-nbd did not start"
  start_serve -r -f qcow2 "$@" "$img"
  for ctx in "${contexts[@]}"; do
    for srv in qemu qnbd; do
      local sock=$qsock
      [[ $srv == qnbd ]] && sock=$SERVE_SOCK
      local opts="driver=nbd,server.type=unix,server.path=$sock"
      [[ $ctx != base:allocation ]] && opts+=",x-dirty-bitmap=$ctx"
      out=$TMPDIR_TEST/$name-${ctx//[:\/]/_}-$srv.json
      qemu-img map --output=json --image-opts "$opts" >"$out" || fail "qemu-img map over $srv ($name, $ctx)"
    done
    diff -q "${out%-qnbd.json}-qemu.json" "$out" >/dev/null ||
      fail "$name: qemu-img map ($ctx) over qnbd differs from qemu-nbd's: $(diff "${out%-qnbd.json}-qemu.json" "$out" | head -5)"
    echo "$name $ctx: $(entries "$out") map entries, identical"
  done
  stop_serve
  kill "$qpid"
  wait "$qpid" 2>/dev/null || true
}

contexts=(base:allocation)
maps "$frag" frag
# Every other cluster: the map alternates, one entry per cluster.
frag_entries=$(entries "$TMPDIR_TEST/frag-base_allocation-qnbd.json")
((frag_entries == 16384)) || fail "the fragmented map has only $frag_entries entries"
contexts=(base:allocation qemu:allocation-depth qemu:dirty-bitmap:b0)
maps "$chain" chain -A -B b0
echo PASS
