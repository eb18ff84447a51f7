#!/usr/bin/env bash
# The commonest write workload, a disk copied into an empty qcow2 over NBD
# by one stream (a restore, an import, `qemu-img convert -n`), leaves a
# file byte for byte identical to the one qemu-nbd leaves: the same
# clusters at the same host offsets, the same refcounts, L1 and L2 tables.
# A backup or migration tool that compares images, checksums them or
# diffs `qemu-img map --output=json` sees no difference between the two
# servers.
#
# The old build allocated a run of new data clusters before the L2 table
# that maps them (QEMU allocates the table first), so every copy into an
# empty image put its data one cluster lower and its tables elsewhere
# (`cmp` differed at byte 196614, the first L1 entry).
#
# The bitmap directory a server stores at its stop is written as QEMU
# writes it, its own bytes only: the old build wrote its whole cluster, so
# the file ran on 65504 bytes past where qemu-nbd's ends.
#
# For 64 KiB (the default) and 2 MiB clusters, 64 KiB with an enabled
# bitmap, and for nbdcopy (one
# connection, one thread, one request in flight, --destination-is-zero:
# its WRITE_ZEROES for the holes are sent several at a time even so, and
# each server may take concurrent requests in its own order) and
# qemu-img convert -n (-m 1, which zeroes the holes one request at a time): a 2 GiB sparse source with random data, a run of written zeroes
# and data on both sides of the first L2 table's end (512 MiB with 64 KiB
# clusters), copied into two empty copies of one image, one served by each
# server; then, by qemu-io, one write across the third table's end (its
# run of new clusters needs the next table) and one where no table exists
# yet. `cmp` must find the two images identical, qemu-img check clean, and
# qnbd's image must read as the source with those writes.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-nbd nbdcopy cmp
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
src=$T/src.raw
truncate -s 2G "$src"
put() {  # MIB_OFFSET BYTES: random bytes at that offset
  head -c "$2" /dev/urandom | dd of="$src" bs=1M seek="$1" conv=notrunc status=none
}
put 2 $((3 << 20))
dd if=/dev/zero of="$src" bs=1M seek=6 count=2 conv=notrunc status=none
put 508 $((8 << 20))
head -c 100000 /dev/urandom | dd of="$src" bs=1 seek=$((700 << 20)) conv=notrunc status=none
writes=(-c "write -P 0x5c 1535M 2M" -c "write -P 0x5d 900M 3M")
ref=$T/ref.raw  # what each image must read: the source, then the writes
cp --sparse=always "$src" "$ref"
qemu-io -f raw "${writes[@]}" "$ref" >/dev/null

for image in 65536 2097152 65536+bitmap; do
  cs=${image%+bitmap}
  for tool in nbdcopy qemu-img; do
    qemu-img create -q -f qcow2 -o cluster_size="$cs" "$T/empty.qcow2" 2G
    # An enabled persistent bitmap: each server stores it when it stops.
    [[ $image == *+bitmap ]] && qemu-img bitmap --add "$T/empty.qcow2" b0
    cp --sparse=always "$T/empty.qcow2" "$T/qnbd.qcow2"
    cp --sparse=always "$T/empty.qcow2" "$T/qemu.qcow2"
    for server in qnbd qemu; do
      if [[ $server == qnbd ]]; then start_tool qnbd -f qcow2 "$T/qnbd.qcow2"; else start_tool qemu-nbd -f qcow2 "$T/qemu.qcow2"; fi
      uri="nbd+unix:///?socket=$T/s.sock"
      if [[ $tool == nbdcopy ]]; then
        timeout 120 nbdcopy -C 1 -T 1 -R 1 --destination-is-zero "$src" "$uri" || fail "$image/$tool: nbdcopy into $server failed"
      else
        timeout 120 qemu-img convert -n -m 1 -f raw -O raw "$src" "$uri" || fail "$image/$tool: qemu-img convert into $server failed"
      fi
      # One write across the end of an L2 table (the next table is new),
      # then one inside a region no table maps yet.
      timeout 60 qemu-io -f raw "${writes[@]}" "$uri" >/dev/null ||
        fail "$image/$tool: qemu-io into $server failed"
      stop_server "$SERVER_PID" || fail "$image/$tool: $server did not stop cleanly"
    done
    qemu-img compare -f raw -F qcow2 "$ref" "$T/qnbd.qcow2" >/dev/null || fail "$image/$tool: qnbd's image does not read as written"
    qemu-img check -q "$T/qnbd.qcow2" || fail "$image/$tool: qemu-img check of qnbd's copy"
    if ! cmp "$T/qnbd.qcow2" "$T/qemu.qcow2"; then
      qemu-img map --output=json "$T/qnbd.qcow2" | head -n 4 >&2
      qemu-img map --output=json "$T/qemu.qcow2" | head -n 4 >&2
      fail "$image/$tool: qnbd's image differs from qemu-nbd's"
    fi
    echo "ok: clusters $image, $tool: identical to qemu-nbd's image"
  done
done

# Random writes (no zeroing or trim: frees are applied later than QEMU
# applies them, docs/testing.md) on 4 KiB clusters, one request at a time:
# a 16-bit refcount block covers 8 MiB of file there, so the file crosses
# into a new block several times. QEMU allocates each write's new
# clusters as one run, the partial first and last ones included, and puts
# a refcount block that run needs after it. The old build allocated the
# whole clusters and the partial ones separately, so the block landed
# inside the run (cmp differed at byte 4111, the refcount table's second
# entry).
for seed in 1 3; do
  qemu-img create -q -f qcow2 -o cluster_size=4k "$T/qnbd.qcow2" 64M
  cp "$T/qnbd.qcow2" "$T/qemu.qcow2"
  for server in qnbd qemu; do
    if [[ $server == qnbd ]]; then start_tool qnbd -f qcow2 "$T/qnbd.qcow2"; else start_tool qemu-nbd -f qcow2 "$T/qemu.qcow2"; fi
    "$PY" - "nbd+unix:///?socket=$T/s.sock" "$seed" <<'PY' || fail "seed $seed: the writes into $server failed"
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
rnd = random.Random(int(sys.argv[2]))
size = h.get_size()
for i in range(300):
    off = rnd.randrange(size // 512) * 512
    n = min(rnd.choice([512, 4096, 65536, 100000, 300000]), size - off) // 512 * 512 or 512
    h.pwrite(bytes([i % 255 + 1]) * n, off)
h.shutdown()
PY
    stop_server "$SERVER_PID" || fail "seed $seed: $server did not stop cleanly"
  done
  qemu-img check -q "$T/qnbd.qcow2" || fail "seed $seed: qemu-img check of qnbd's image"
  cmp "$T/qnbd.qcow2" "$T/qemu.qcow2" || fail "4 KiB clusters, seed $seed: qnbd's image differs from qemu-nbd's"
  echo "ok: 4 KiB clusters, 300 random writes (seed $seed): identical to qemu-nbd's image"
done
echo "PASS"
