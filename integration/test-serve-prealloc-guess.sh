#!/usr/bin/env bash
# QEMU's metadata-preallocation guess (qcow2_detect_metadata_preallocation)
# decides whether block status asks the host file about data clusters, so
# whether a hole in the host file under a data cluster is reported as
# zero. QEMU makes it once, at its first qcow2_co_block_status call: the
# first BLOCK_STATUS, but also the first structured READ, the first write
# that allocates around a copy-on-write region, the first zeroing that is
# not cluster-aligned. On a fresh image with a bitmap it says yes (six
# refcounted clusters, three allocated); once data has been written it
# says no. For each first request, qnbd and qemu-nbd must report the same
# thing about a cluster written later (prealloc_guess.py). Before qnbd
# made the guess at those moments (it made it at the first BLOCK_STATUS
# that met a data cluster), it said "data" where qemu-nbd said "zero-head"
# after a first READ, partial zeroing, partial write or block status.
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-nbd
requires_qnbd
requires_python_nbd
here=$(cd "$(dirname "$0")" && pwd)
T=$TMPDIR_TEST

# answer SERVER BITMAP FIRST: what SERVER (qnbd or qemu-nbd) reports.
answer() {
  local server=$1 bitmap=$2 first=$3 img=$T/i.qcow2 sock=$T/s.sock
  rm -f "$img" "$img.qnbd-intent" "$sock"
  qemu-img create -q -f qcow2 "$img" 16M
  [[ $bitmap == yes ]] && qemu-img bitmap --add "$img" b0
  if [[ $server == qnbd ]]; then
    start_server "$T/s.pid" "$QNBD" serve -k "$sock" --pid-file "$T/s.pid" -f qcow2 --discard=unmap "$img" || return 1
  else
    start_server "$T/s.pid" qemu-nbd -k "$sock" --pid-file "$T/s.pid" -f qcow2 --discard=unmap "$img" || return 1
  fi
  local pid=$SERVER_PID out
  out=$("$PY" "$here/prealloc_guess.py" "nbd+unix:///?socket=$sock" "$first") || return 1
  stop_server "$pid" >/dev/null || true
  echo "$out"
}

zero_heads=0
for bitmap in yes no; do
  for first in none read zero_partial zero_full write_partial write_full trim flush block_status; do
    q=$(answer qnbd $bitmap $first) || fail "qnbd, bitmap $bitmap, first $first: the client failed"
    n=$(answer qemu-nbd $bitmap $first) || fail "qemu-nbd, bitmap $bitmap, first $first: the client failed"
    [[ $q == "$n" ]] || fail "bitmap $bitmap, first request $first: qnbd says $q, qemu-nbd says $n"
    [[ $n == zero-head ]] && zero_heads=$((zero_heads + 1))
    echo "bitmap $bitmap, first $first: $q"
  done
done
# Both answers occur, so the comparison above means something.
((zero_heads > 0 && zero_heads < 18)) || fail "qemu-nbd answered zero-head $zero_heads times of 18"
echo PASS
