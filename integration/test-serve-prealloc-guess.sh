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
requires qemu-img qemu-io qemu-nbd nbdcopy nbdinfo
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

# A guess that cannot be made (the refcount table names an unaligned
# refcount block) is "no", as QEMU's: it must not fail the READ or the
# BLOCK_STATUS that makes it. Before, qnbd failed every BLOCK_STATUS of
# such an image, so nbdcopy and nbdinfo --map failed where qemu-nbd served.
img=$T/r.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c 'write -P 7 0 64k' "$img" >/dev/null
"$PY" - "$img" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(48)  # refcount_table_offset (qcow2.txt "Header")
    table = struct.unpack(">Q", f.read(8))[0]
    f.seek(table)
    f.write(struct.pack(">Q", 0x12345))  # refcount table entry 0, unaligned
PY
for server in qnbd qemu-nbd; do
  sock=$T/r-$server.sock
  if [[ $server == qnbd ]]; then
    start_server "$T/r.pid" "$QNBD" serve -r -t -k "$sock" --pid-file "$T/r.pid" -f qcow2 "$img" || fail "qnbd did not start"
  else
    start_server "$T/r.pid" qemu-nbd -r -t -k "$sock" --pid-file "$T/r.pid" -f qcow2 "$img" || fail "qemu-nbd did not start"
  fi
  pid=$SERVER_PID
  nbdcopy "nbd+unix:///?socket=$sock" "$T/r-$server.raw" || fail "$server: nbdcopy of the image with a bad refcount table"
  map=$(nbdinfo --map "nbd+unix:///?socket=$sock") || fail "$server: nbdinfo --map of the image with a bad refcount table"
  echo "$map" > "$T/r-$server.map"
  stop_server "$pid" >/dev/null || true
done
cmp -s "$T/r-qnbd.raw" "$T/r-qemu-nbd.raw" || fail "bad refcount table: the copies differ"
cmp -s "$T/r-qnbd.map" "$T/r-qemu-nbd.map" || fail "bad refcount table: the maps differ: $(diff "$T/r-qnbd.map" "$T/r-qemu-nbd.map")"
echo "bad refcount table: nbdcopy and nbdinfo --map as qemu-nbd's"
echo PASS
