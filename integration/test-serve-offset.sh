#!/usr/bin/env bash
# -o/--offset, beside qemu-nbd -o (a raw node with an offset on top of the
# image's format: a disk stored some way into a file or into a guest disk).
# 1. Raw images at several offsets (decimal, hex, the whole size): the same
#    nbdinfo --json, map and bytes as qemu-nbd; writes at the export's first
#    and last bytes land that far into the file, in both, and nothing else
#    changes.
# 2. A qcow2 image with a backing file, -A: the same base:allocation and
#    qemu:allocation-depth maps as qemu-nbd (what the top layer leaves to
#    the backing file is a hole that is not zero, at depth 0), the same
#    bytes, and the same guest disk after the same writes, with a clean
#    qemu-img check.
# 3. A probed raw image: the same nbdinfo (minimum block size 1: the
#    offset node does not take the probed node's 512), and the first-sector
#    guard stays on the image's own first sector, so a qcow2 header written
#    at export offset 0 lands 512 bytes in, in both.
# 4. Refusals: an offset past the end, -B with -o, and -l with -o (qemu-nbd
#    asks its raw node for the snapshot) are refused by both, qnbd in one
#    line in qemu's words; so are malformed offsets. An offset that is not
#    a multiple of 512 is refused by qnbd (qemu-nbd 7.2 serves one, then
#    aborts on the read of its last partial sector: not run here).
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy python3
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
URI="nbd+unix:///?socket=$T/s.sock"

# describe TOOL: what a client sees of the export (the URI line left out:
# it names the socket).
describe() {
  nbdinfo --json "$URI" | grep -v '"uri"' >"$T/$1.info"
  nbdinfo --map "$URI" >>"$T/$1.info"
}

size=$((8 << 20))
head -c 4M /dev/urandom >"$T/r.raw"
truncate -s $size "$T/r.raw"

echo "== 1. raw images"
for o in 512 1048576 0x300000 $size; do
  o_dec=$((o))
  len=$((size - o_dec))
  for tool in qemu-nbd qnbd; do
    cp "$T/r.raw" "$T/r-$tool.raw"
    start_tool "$tool" -f raw -o "$o" "$T/r-$tool.raw"
    describe "$tool"
    nbdcopy "$URI" "$T/out-$tool.bin"
    if ((len > 0)); then
      w1=$(pwrite_at "$URI" 0 4096 0xa1)
      w2=$(pwrite_at "$URI" $((len - 4096)) 4096 0xa2)
      expect_eq "$w1 $w2" "ok ok" "$tool -o $o: writes at the first and last bytes"
    fi
    stop_server "$SERVER_PID"
  done
  diff "$T/qemu-nbd.info" "$T/qnbd.info" || fail "-o $o: nbdinfo differs from qemu-nbd's"
  expect_eq "$(grep -o '"export-size": [0-9]*' "$T/qnbd.info")" "\"export-size\": $len" "-o $o: export size"
  cmp <(tail -c +$((o_dec + 1)) "$T/r.raw") "$T/out-qnbd.bin" || fail "-o $o: qnbd served other bytes"
  cmp "$T/out-qemu-nbd.bin" "$T/out-qnbd.bin" || fail "-o $o: bytes differ from qemu-nbd's"
  cmp "$T/r-qemu-nbd.raw" "$T/r-qnbd.raw" || fail "-o $o: the file after the writes differs from qemu-nbd's"
  if ((len > 0)); then
    expect_eq "$(od -An -tx1 -j "$o_dec" -N1 "$T/r-qnbd.raw" | tr -d ' ')" a1 "-o $o: first write's place"
    expect_eq "$(od -An -tx1 -j $((size - 1)) -N1 "$T/r-qnbd.raw" | tr -d ' ')" a2 "-o $o: last write's place"
    cmp -n "$o_dec" "$T/r.raw" "$T/r-qnbd.raw" || fail "-o $o: bytes before the offset changed"
  fi
  echo "-o $o: as qemu-nbd"
done

echo "== 2. qcow2 over a backing file, -A"
qemu-img create -q -f qcow2 "$T/base.qcow2" 64M
qemu-io -c 'write -P 3 0 8M' -c 'write -P 4 20M 2M' "$T/base.qcow2" >/dev/null
for tool in qemu-nbd qnbd; do
  qemu-img create -q -f qcow2 -b "$T/base.qcow2" -F qcow2 "$T/top-$tool.qcow2" 64M
  qemu-io -c 'write -P 5 1M 1M' -c 'write -z 6M 1M' -c 'write -P 6 30M 64k' "$T/top-$tool.qcow2" >/dev/null
  start_tool "$tool" -A -f qcow2 -o 1048576 "$T/top-$tool.qcow2"
  describe "$tool"
  nbdinfo --map=qemu:allocation-depth "$URI" >>"$T/$tool.info"
  nbdcopy "$URI" "$T/out-$tool.bin"
  w1=$(pwrite_at "$URI" 0 65536 0xb1)
  w2=$(pwrite_at "$URI" $((10 << 20)) 4096 0xb2)
  w3=$(pwrite_at "$URI" $(((63 << 20) - 65536)) 65536 0xb3)
  expect_eq "$w1 $w2 $w3" "ok ok ok" "$tool qcow2 writes"
  stop_server "$SERVER_PID"
done
diff "$T/qemu-nbd.info" "$T/qnbd.info" || fail "qcow2 -o: nbdinfo or a map differs from qemu-nbd's"
grep -qE '^ +[0-9]+ +[0-9]+ +1 +hole$' "$T/qnbd.info" || fail "qcow2 -o: no backing range mapped as a hole that is not zero"
cmp "$T/out-qemu-nbd.bin" "$T/out-qnbd.bin" || fail "qcow2 -o: bytes differ from qemu-nbd's"
qemu-img compare -q "$T/top-qemu-nbd.qcow2" "$T/top-qnbd.qcow2" || fail "qcow2 -o: the guest disk after the writes differs"
# qemu-io prints a "read" line after a pattern mismatch too, and exits 1:
out=$(qemu-io -r -c 'read -P 0xb1 1M 64k' -c 'read -P 0xb2 11M 4k' -c 'read -P 0xb3 0x3ff0000 64k' \
  "$T/top-qnbd.qcow2" 2>&1) || fail "qcow2 -o: the writes do not read back at guest offset + 1 MiB: $out"
[[ $out != *"verification failed"* ]] || fail "qcow2 -o: pattern mismatch: $out"
expect_eq "$(grep -c '^read ' <<<"$out")" 3 "qcow2 -o: the writes read back at guest offset + 1 MiB"
qemu-img check -q "$T/top-qnbd.qcow2" || fail "qcow2 -o: check after the writes"
echo "qcow2 -o 1M -A: as qemu-nbd"

echo "== 3. probed raw"
qcow2_head=$(printf 'QFI\xfb\0\0\0\3' | od -An -tx1 | tr -d ' \n')
for tool in qemu-nbd qnbd; do
  head -c 1M /dev/zero >"$T/p-$tool.raw"
  start_tool "$tool" -o 512 "$T/p-$tool.raw"
  describe "$tool"
  "$PY" - "$URI" >"$T/p-$tool.out" <<'EOF'
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"QFI\xfb\0\0\0\3" + bytes(504), 0)
    h.flush()
    print("ok")
except nbd.Error as e:
    print(e.errno)
EOF
  stop_server "$SERVER_PID"
done
diff "$T/qemu-nbd.info" "$T/qnbd.info" || fail "probed raw -o 512: nbdinfo differs from qemu-nbd's (minimum block 1)"
expect_eq "$(cat "$T/p-qnbd.out")" "$(cat "$T/p-qemu-nbd.out")" "probed raw -o 512: a qcow2 header at export offset 0"
expect_eq "$(cat "$T/p-qnbd.out")" ok "probed raw -o 512: the header write"
expect_eq "$(od -An -tx1 -j 512 -N8 "$T/p-qnbd.raw" | tr -d ' ')" "$qcow2_head" "probed raw -o 512: where it landed"
cmp "$T/p-qemu-nbd.raw" "$T/p-qnbd.raw" || fail "probed raw -o 512: the files differ"

echo "== 4. refusals"
qemu-img create -q -f qcow2 "$T/b.qcow2" 8M
qemu-img bitmap --add "$T/b.qcow2" b0
refused_by_both "Offset (9437184) cannot be greater than size of the containing file (8388608)" -f raw -o 9437184 "$T/r.raw"
refused_by_both "Bitmap 'b0' is not found" -f qcow2 -o 512 -B b0 "$T/b.qcow2"
qemu-img snapshot -c snap1 "$T/b.qcow2"
refused_by_both "does not support temporarily loading internal snapshots" -f qcow2 -o 512 -l snap1 "$T/b.qcow2"
refused_by_both "Invalid offset 'abc'" -f raw -o abc "$T/r.raw"
refused_by_both "Invalid offset '-512'" -f raw -o -512 "$T/r.raw"
qnbd_refuses "offset 1000 is not a multiple of 512" -f raw -o 1000 "$T/r.raw"
[[ $(od -An -tx1 -N4 "$T/b.qcow2" | tr -d ' ') == 514649fb ]] || fail "the refused image changed"
echo "PASS"
