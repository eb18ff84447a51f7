#!/usr/bin/env bash
# qnbd and qemu-nbd side by side, in lock step: each serves its own copy of
# the same image (writable, -A, -B b0 where the image has bitmaps,
# --discard=unmap unless the case says otherwise), and lockstep.py sends both the same seeded requests one
# at a time and requires the same answers: the same errors, the same
# bytes (and the bytes of a model of the disk), the same class for every
# sector in base:allocation, qemu:allocation-depth and the dirty bitmap.
# Afterwards both images must pass qemu-img check, read the same, and keep
# the same bitmap.
# Images: qcow2 with 64 KiB and 4 KiB clusters, over a raw backing file
# shorter than the disk, extended L2 over a qcow2 backing file holding
# compressed clusters, a compressed top image, a version 2 image over a
# backing file, raw, clusters shared with an internal snapshot, an external
# data file, 2 MiB clusters, one-bit lazy refcounts, three bitmaps (512 B,
# 2 MiB, one disabled); and with qemu-nbd's
# default flags (TRIM ignored), --detect-zeroes=unmap and =on. LOCKSTEP_ROUNDS=N runs
# N seeds of each (default 2), OPS requests each (default 400).
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io qemu-nbd
requires_qnbd
requires_python_nbd
here=$(cd "$(dirname "$0")" && pwd)
T=$TMPDIR_TEST
SIZE=$((16 << 20))

mkdir -p "$T/base"
(
  cd "$T/base"
  qemu-img create -q -f raw base.raw 12M
  qemu-io -f raw -c 'write -P 0x5a 0 3M' -c 'write -P 0x6b 5M 1M' -c 'write -P 0x7c 9M 2M' base.raw >/dev/null
  qemu-img convert -q -c -f raw -O qcow2 base.raw base-c.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=4k full.qcow2 16M
  qemu-io -f qcow2 -c 'write -P 0x3c 0 6M' -c 'write -z 6M 1M' -c 'write -P 0x4d 10M 3M' full.qcow2 >/dev/null
) || fail "cannot make the base images"

# one NAME SEED BITMAP MAKE-COMMAND: MAKE-COMMAND makes `d` in the case's
# folder (the base images are in ../base).
one() {
  local name=$1 seed=$2 bitmap=$3 make=$4 fmt=qcow2
  local d=$T/$name
  mkdir -p "$d/q" "$d/n"
  # Each copy made by the same commands: cp would turn zero blocks into
  # holes, and where the host file has holes is visible (QEMU's
  # metadata-preallocation guess, which both servers make, counts them).
  (cd "$d/q" && eval "$make") || fail "$name: cannot make the image"
  (cd "$d/n" && eval "$make") || fail "$name: cannot make the image"
  [[ $(qemu-img info --output=json "$d/q/d" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["format"])') == raw ]] && fmt=raw
  local b=()
  local name_
  if [[ $bitmap != - ]]; then
    for name_ in ${bitmap//,/ }; do b+=(-B "$name_"); done
  fi
  # MODES (default --discard=unmap): the servers' I/O flags, the same for both.
  local modes
  read -r -a modes <<<"${MODES:---discard=unmap}"
  start_server "$d/q.pid" "$QNBD" serve -k "$d/q.sock" --pid-file "$d/q.pid" -f "$fmt" -A "${modes[@]}" "${b[@]}" \
    "$d/q/d" || fail "$name: qnbd did not start"
  local qpid=$SERVER_PID
  start_server "$d/n.pid" qemu-nbd -k "$d/n.sock" --pid-file "$d/n.pid" -f "$fmt" -A "${modes[@]}" "${b[@]}" \
    "$d/n/d" || fail "$name: qemu-nbd did not start"
  local npid=$SERVER_PID
  local out
  out=$("$PY" "$here/lockstep.py" "nbd+unix:///?socket=$d/q.sock" "nbd+unix:///?socket=$d/n.sock" "$fmt" "$seed" "$SIZE" \
    "${OPS:-400}" "$bitmap") || fail "$name (seed $seed): $out"
  stop_server "$qpid" || fail "$name: qnbd did not stop cleanly"
  stop_server "$npid" || true
  if [[ $fmt == qcow2 ]]; then
    qemu-img check -q "$d/q/d" || fail "$name: qemu-img check of qnbd's image"
    qemu-img compare -q "$d/q/d" "$d/n/d" || fail "$name: the images read differently after the servers stopped"
    if [[ $bitmap != - ]]; then
      # The bitmaps each server stored, read back through a read-only
      # qemu-nbd.
      local m1 m2
      for name_ in ${bitmap//,/ }; do
        m1=$(nbdinfo_map_bitmap "$d/q/d" "$name_") || fail "$name: bitmap $name_ of qnbd's image"
        m2=$(nbdinfo_map_bitmap "$d/n/d" "$name_") || fail "$name: bitmap $name_ of qemu-nbd's image"
        [[ $m1 == "$m2" ]] || fail "$name: stored bitmaps $name_ differ: qnbd's image $m1; qemu-nbd's $m2"
      done
    fi
  else
    cmp -s "$d/q/d" "$d/n/d" || fail "$name: the raw files differ"
  fi
  echo "$name: $out"
  rm -rf "$d"
}

# nbdinfo_map_bitmap IMAGE NAME: the dirty ranges of bitmap NAME as
# qemu-nbd -r -B reads them, one "start length" per line.
nbdinfo_map_bitmap() {
  local sock=$T/bm.sock
  rm -f "$sock"
  start_server "$T/bm.pid" qemu-nbd -r -k "$sock" --pid-file "$T/bm.pid" -f qcow2 -B "$2" "$1" >/dev/null || return 1
  local pid=$SERVER_PID
  nbdinfo --map="qemu:dirty-bitmap:$2" "nbd+unix:///?socket=$sock" | awk '$3 == 1 { print $1, $2 }'
  stop_server "$pid" >/dev/null || true
}

requires nbdinfo
bm() { echo "qemu-img bitmap --add d b0"; }
for ((r = 0; r < ${LOCKSTEP_ROUNDS:-2}; r++)); do
  s=$((r * 100))
  one qcow2-64k.$r $((s + 1)) b0 "qemu-img create -q -f qcow2 d 16M && $(bm)"
  one qcow2-4k-backing.$r $((s + 2)) b0 \
    "qemu-img create -q -f qcow2 -o cluster_size=4k -b ../../base/base.raw -F raw d 16M && $(bm)"
  one qcow2-extl2-backing.$r $((s + 3)) b0 \
    "qemu-img create -q -f qcow2 -o extended_l2=on -b ../../base/base-c.qcow2 -F qcow2 d 16M && $(bm)"
  one qcow2-compressed.$r $((s + 4)) b0 "qemu-img convert -q -c -O qcow2 ../../base/full.qcow2 d && $(bm)"
  one qcow2-v2-backing.$r $((s + 5)) - \
    "qemu-img create -q -f qcow2 -o compat=0.10 -b ../../base/base.raw -F raw d 16M"
  one raw.$r $((s + 6)) - "qemu-img convert -q -O raw ../../base/full.qcow2 d"
  # Clusters an internal snapshot shares (copied on write), an external
  # data file (absolute: qemu-nbd 7.2 opens a relative one from its working
  # directory), 2 MiB clusters, one-bit refcounts with lazy refcounts.
  one qcow2-snapshot.$r $((s + 7)) b0 \
    "qemu-img convert -q -O qcow2 ../../base/full.qcow2 d && qemu-img snapshot -c s1 d && $(bm)"
  one qcow2-datafile.$r $((s + 8)) b0 "qemu-img create -q -f qcow2 -o data_file=\$PWD/d.data d 16M && $(bm)"
  one qcow2-2m.$r $((s + 9)) b0 "qemu-img create -q -f qcow2 -o cluster_size=2M d 16M && $(bm)"
  one qcow2-refcount1-lazy.$r $((s + 10)) b0 \
    "qemu-img create -q -f qcow2 -o refcount_bits=1,lazy_refcounts=on,cluster_size=4k d 16M && $(bm)"
  # Three bitmaps: 512-byte granularity, 2 MiB, and a disabled one with
  # dirty bits (which neither server may change).
  one qcow2-3-bitmaps.$r $((s + 14)) fine,coarse,off \
    "qemu-img create -q -f qcow2 d 16M && qemu-img bitmap --add -g 512 d fine &&
     qemu-img bitmap --add -g 2M d coarse && qemu-img bitmap --add d off &&
     qemu-io -f qcow2 -c 'write -P 9 3M 100k' d >/dev/null && qemu-img bitmap --disable d off"
  # qemu-nbd's defaults (TRIM ignored), and zero detection that unmaps.
  MODES=" " one qcow2-defaults.$r $((s + 11)) b0 \
    "qemu-img create -q -f qcow2 -o cluster_size=4k -b ../../base/base.raw -F raw d 16M && $(bm)"
  MODES="--discard=unmap --detect-zeroes=unmap" one qcow2-detect-zeroes.$r $((s + 12)) b0 \
    "qemu-img create -q -f qcow2 -o extended_l2=on -b ../../base/base-c.qcow2 -F qcow2 d 16M && $(bm)"
  MODES="--detect-zeroes=on" one raw-detect-zeroes.$r $((s + 13)) - "qemu-img convert -q -O raw ../../base/full.qcow2 d"
done
echo PASS
