#!/usr/bin/env bash
# Persistent bitmaps made by qemu-img bitmap and filled by qemu-io writes
# (unaligned, zero writes, discards; granularities 512 B .. 2 MiB; bitmaps
# started at different moments, disabled, cleared, merged; a size that is
# not a multiple of the granularity; a 1 TiB sparse image) must read the
# same through `qnbd map --bitmap` and `qnbd serve -B` as through
# `qemu-nbd -B` (nbdinfo --map=qemu:dirty-bitmap:NAME, merged runs). The
# refusals (unknown name, in_use bitmap) must use qemu-nbd's words.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3
requires_qnbd

norm() { python3 "$INTEGRATION_DIR/map-norm.py" bitmap "$1"; }
io() { qemu-io -f qcow2 "$@" >/dev/null; }

# --- images --------------------------------------------------------------
small=$TMPDIR_TEST/small.qcow2
qemu-img create -q -f qcow2 "$small" 64M
qemu-img bitmap --add -g 512 "$small" g512
qemu-img bitmap --add -g 4096 "$small" g4k
qemu-img bitmap --add "$small" g64k
qemu-img bitmap --add -g 2M "$small" g2m
qemu-img bitmap --add --disable "$small" frozen
io -c 'write -P 1 1000 3000' -c 'write -z 5M 100k' -c 'write -P 2 8388607 2' \
  -c 'discard 10M 1M' -c 'write -P 3 67108352 512' "$small"
# Started later: sees only what follows.
qemu-img bitmap --add -g 4096 "$small" late
io -c 'write -P 4 20M 12345' -c 'write -z -u 30M 2M' -c 'discard 40M 64k' -c 'write -P 5 33554431 1' "$small"
# Enabled for a while, then frozen; a cleared one; a merge of two.
qemu-img bitmap --disable "$small" late
io -c 'write -P 6 50M 4k' "$small"
qemu-img bitmap --add "$small" cleared
io -c 'write -P 7 1M 1' "$small"
qemu-img bitmap --clear "$small" cleared
qemu-img bitmap --add -g 65536 --disable "$small" merged
qemu-img bitmap --merge g2m "$small" merged
qemu-img bitmap --merge late "$small" merged
small_maps=(g512 g4k g64k g2m frozen late cleared merged)

# Size not a multiple of any granularity (last granule partial).
odd=$TMPDIR_TEST/odd.qcow2
qemu-img create -q -f qcow2 "$odd" $((64 * 1024 * 1024 + 1536))
qemu-img bitmap --add -g 2M "$odd" big
qemu-img bitmap --add -g 512 "$odd" fine
io -c "write -P 8 $((64 * 1024 * 1024 + 1024)) 512" -c 'write 3M 1k' "$odd"
odd_maps=(big fine)

# 1 TiB sparse, small cluster size so the bitmap spans many data clusters.
huge=$TMPDIR_TEST/huge.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096 "$huge" 1T
qemu-img bitmap --add -g 65536 "$huge" h64k
qemu-img bitmap --add -g 2M "$huge" h2m
io -c 'write 0 1' -c 'write 512G 1M' -c 'write -z 700G 64k' -c 'discard 900G 4k' \
  -c "write $((1024 * 1024 * 1024 * 1024 - 4096)) 4096" "$huge"
huge_maps=(h64k h2m)

# --- comparison ----------------------------------------------------------
checked=0
compare_image() {
  local img=$1
  shift
  local -a maps=("$@") bflags=()
  local b
  for b in "${maps[@]}"; do bflags+=(-B "$b"); done
  local qsock=$TMPDIR_TEST/qemu.sock
  start_server "$TMPDIR_TEST/qemu.pid" qemu-nbd -r -t -f qcow2 "${bflags[@]}" -k "$qsock" \
    --pid-file "$TMPDIR_TEST/qemu.pid" "$img" || fail "qemu-nbd did not start on $img"
  local qpid=$SERVER_PID
  for b in "${maps[@]}"; do
    nbdinfo --json --map="qemu:dirty-bitmap:$b" "nbd+unix:///?socket=$qsock" >"$TMPDIR_TEST/ref.json" ||
      fail "nbdinfo against qemu-nbd failed for $b"
    norm "$TMPDIR_TEST/ref.json" >"$TMPDIR_TEST/ref.$b"
    timeout 60 "$QNBD" map --bitmap "$b" --output=json -f qcow2 "$img" >"$TMPDIR_TEST/map.json" ||
      fail "qnbd map --bitmap $b failed on $img"
    norm "$TMPDIR_TEST/map.json" >"$TMPDIR_TEST/map.$b"
    diff -u "$TMPDIR_TEST/ref.$b" "$TMPDIR_TEST/map.$b" || fail "qnbd map --bitmap $b differs from qemu-nbd ($img)"
    checked=$((checked + 1))
  done
  stop_server "$qpid"
  # The same through qnbd serve -B (skipped if serve cannot export bitmaps).
  start_serve -r -f qcow2 "${bflags[@]}" "$img"
  for b in "${maps[@]}"; do
    nbdinfo --json --map="qemu:dirty-bitmap:$b" "$SERVE_URI" >"$TMPDIR_TEST/serve.json" ||
      fail "nbdinfo against qnbd serve failed for $b"
    norm "$TMPDIR_TEST/serve.json" >"$TMPDIR_TEST/serve.$b"
    diff -u "$TMPDIR_TEST/ref.$b" "$TMPDIR_TEST/serve.$b" || fail "qnbd serve -B $b differs from qemu-nbd ($img)"
    checked=$((checked + 1))
  done
  stop_serve
}

compare_image "$small" "${small_maps[@]}"
compare_image "$odd" "${odd_maps[@]}"
compare_image "$huge" "${huge_maps[@]}"

# The test must be able to fail: the maps are not trivially all clean.
grep -q dirty "$TMPDIR_TEST/ref.h64k" || fail "reference map of h64k has no dirty run"
grep -q clean "$TMPDIR_TEST/ref.frozen" || fail "reference map of frozen is not clean"
[[ $(grep -c dirty "$TMPDIR_TEST/ref.g512") -ge 5 ]] || fail "g512 should have several dirty runs"

# --- refusals, in qemu-nbd's words --------------------------------------
bad=$TMPDIR_TEST/inuse.qcow2
cp "$small" "$bad"
# (inner shell so bash's "Aborted" notice goes to /dev/null too)
bash -c 'qemu-io -f qcow2 -c "write 0 4k" -c abort "$1"; true' _ "$bad" >/dev/null 2>&1
qemu-img info "$bad" | grep -q in-use || fail "qemu-io abort did not leave a bitmap in use"
for b in g64k nosuch; do
  qmsg=$(timeout 10 qemu-nbd -r -f qcow2 -B "$b" -k "$TMPDIR_TEST/x.sock" "$bad" 2>&1 >/dev/null) && fail "qemu-nbd accepted $b"
  qmsg=${qmsg#qemu-nbd: }
  if "$QNBD" map --bitmap "$b" -f qcow2 "$bad" >/dev/null 2>"$TMPDIR_TEST/err"; then fail "qnbd accepted $b"; fi
  grep -qF "$qmsg" "$TMPDIR_TEST/err" || fail "qnbd's refusal of $b ('$(cat "$TMPDIR_TEST/err")') lacks qemu-nbd's '$qmsg'"
done
echo "PASS: $checked bitmap maps equal to qemu-nbd's"
