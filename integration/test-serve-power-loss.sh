#!/usr/bin/env bash
# Power loss against the real server, at the system-call level. `qnbd serve`
# runs under an LD_PRELOAD shim (write_log_shim.c) that records every write,
# fallocate, ftruncate, sync, rename and unlink it makes in the image's
# folder.
# A seeded libnbd workload on two connections writes (some FUA), zeroes,
# trims and flushes; then the server is SIGKILLed. power_loss.py rebuilds,
# at many moments of the log, what a disk could hold after a power loss
# there (synced changes kept, later ones kept, lost or torn per sector) and
# asks of each:
#   - qemu-img check: no corruption (leaked clusters allowed);
#   - every sector holds the last value the client was told is durable (a
#     flush answered on either connection, or FUA; with cache=writethrough
#     every answered change) or a value written after it, never another
#     request's or stale data;
#   - the crash-safe bitmap, recovered by the next `qnbd serve`, marks every
#     granule whose data changed; with checkpoints taken through the control
#     socket while the writers run (c1 disables b0, c2 c1, ...), each one
#     that returned left its PREV disabled and dirty wherever a request
#     answered before it wrote, and the bitmaps after it cover every
#     request answered since and all data that reached the image;
#   - and all of that again after the power fails a second time, inside
#     the recovery (the recovering `qnbd serve` under the shim too, its log
#     cut at a random record), the guest data unchanged by it.
# Cases: qcow2 with 64 KiB and 4 KiB clusters, extended L2 alone and over a
# backing file, an external data file, cache=writethrough (qcow2 and raw),
# directsync and none, a raw image, qcow2 with checkpoints (with and without
# point-in-time views) and with live edits of other bitmaps, a second image
# added and removed over and over.
# QNBD_POWER_WIDE=1 adds 19 more (below).
# What the model of the disk leaves out: power_loss.py.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img nbdinfo cc
requires_qnbd
requires_python_nbd
here=$(cd "$(dirname "$0")" && pwd)
T=$TMPDIR_TEST
SIZE=$((16 << 20))

cc -shared -fPIC -O2 -o "$T/wlog.so" "$here/write_log_shim.c" -ldl || fail "cannot build the shim"
# Each crash point's recovery is crashed too, at a random record of its
# own log, before the bitmaps are judged (power_loss.py,
# crash_during_recovery): power that fails twice. QNBD_POWER_DOUBLE=0
# turns that off.
if [[ ${QNBD_POWER_DOUBLE:-1} == 1 ]]; then
  export QNBD_DOUBLE_CRASH_SHIM=$T/wlog.so
fi

# one NAME SEED FMT BITMAP MAKE-COMMAND [serve args...]: MAKE-COMMAND makes
# the image `d` in the current folder; BITMAP is an enabled bitmap it has,
# or "-".
one() {
  local name=$1 seed=$2 fmt=$3 bitmap=$4 make=$5
  shift 5
  # QNBD_POWER_ONLY=REGEX: only the cases whose name matches, for a hunt.
  [[ $name =~ ${QNBD_POWER_ONLY:-.} ]] || return 0
  local d=$T/$name
  mkdir -p "$d/disk"
  (cd "$d/disk" && eval "$make") || fail "$name: cannot make the image"
  cp -a "$d/disk" "$d/init"
  # (Assignments before a function call reach the commands it runs. An
  # ASan build of qnbd wants its runtime first in the preload list.)
  # A recovery chunk of one bitmap granule (64 KiB), so that a recovered
  # bitmap is no coarser than the bitmap itself and the check below means
  # something (the default, 64 MiB, would mark this whole disk).
  local extra=() ctl=()
  [[ $fmt == qcow2 ]] && extra+=(--recovery-chunk-size 65536)
  if [[ ${CHECKPOINTS:-0} == 1 ]]; then
    extra+=(--control "$d/ctl.sock")
    ctl=("$QNBD" "$d/ctl.sock")
  fi
  LD_PRELOAD=$T/wlog.so ASAN_OPTIONS=${ASAN_OPTIONS:-}:verify_asan_link_order=0 \
    QNBD_WLOG=$d/wlog QNBD_WLOG_DIR=$d/disk start_serve -f "$fmt" -e 2 --discard=unmap "${extra[@]}" "$@" "$d/disk/d"
  local cycle=()
  [[ ${CYCLE:-0} == 1 ]] && cycle=(QNBD_POWER_CYCLE_IMAGE="$d/disk/e")
  env "${cycle[@]}" "$PY" "$here/power_loss.py" client "$SERVE_URI" "$d/events" "$seed" "$SIZE" "${THREADS:-2}" "${OPS:-150}" "${ctl[@]}" >"$d/client.out" ||
    fail "$name: the workload failed: $(cat "$d/client.out")"
  kill -9 "$SERVE_PID"
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=
  "$PY" "$here/power_loss.py" check "$d/wlog" "$d/init" "$d/events" "$d/work" d "$fmt" "$SIZE" 24 "$seed" \
    "$QNBD" "$bitmap" >"$d/check.out" || fail "$name: $(cat "$d/check.out")"
  echo "$name: $(cat "$d/client.out"); $(cat "$d/check.out")"
  if [[ ${CYCLE:-0} == 1 ]]; then
    # The same crash points for the image that was added and removed.
    "$PY" "$here/power_loss.py" check "$d/wlog" "$d/init" "$d/events.e" "$d/work-e" e "$fmt" "$SIZE" 24 $((seed + 1000)) \
      "$QNBD" b0 >"$d/check-e.out" || fail "$name (e): $(cat "$d/check-e.out")"
    echo "$name (e): $(cat "$d/check-e.out")"
  fi
}

qcow2() { echo "qemu-img create -q -f qcow2 $1 d 16M && qemu-img bitmap --add d b0"; }
# QNBD_POWER_ROUNDS=N: N seeds per case (default 1), for a longer hunt.
for ((r = 0; r < ${QNBD_POWER_ROUNDS:-1}; r++)); do
  s=$((r * 10))
  one qcow2-64k.$r $((s + 1)) qcow2 b0 "$(qcow2 "")"
  one qcow2-4k.$r $((s + 2)) qcow2 b0 "$(qcow2 "-o cluster_size=4k")"
  one qcow2-extl2-backing.$r $((s + 3)) qcow2 b0 \
    "qemu-img create -q -f raw base 16M && qemu-io -f raw -c 'write -P 0x5a 0 16M' base >/dev/null &&
     $(qcow2 "-o extended_l2=on,cluster_size=32k -b base -F raw")"
  # Extended L2 without a backing file: a write from an unallocated
  # subcluster into allocated ones of the same cluster once zeroed them
  # before writing (zeroes after a power loss between the two).
  one qcow2-extl2.$r $((s + 11)) qcow2 b0 "$(qcow2 "-o extended_l2=on")"
  one qcow2-datafile.$r $((s + 4)) qcow2 b0 "$(qcow2 "-o data_file=d.data")"
  # Writethrough: every answered change must be durable, not only FUA ones.
  WRITETHROUGH=1 one qcow2-writethrough.$r $((s + 5)) qcow2 b0 "$(qcow2 "")" --cache=writethrough
  WRITETHROUGH=1 one raw-writethrough.$r $((s + 9)) raw - "truncate -s 16M d" --cache=writethrough
  WRITETHROUGH=1 one qcow2-directsync.$r $((s + 10)) qcow2 b0 "$(qcow2 "-o cluster_size=4k")" --cache=directsync
  one qcow2-cache-none.$r $((s + 7)) qcow2 b0 "$(qcow2 "-o cluster_size=4k")" --cache=none
  one raw.$r $((s + 6)) raw - "truncate -s 16M d"
  CHECKPOINTS=1 OPS=400 one qcow2-checkpoints.$r $((s + 8)) qcow2 b0 "$(qcow2 "")"
  # The same with a point-in-time view opened at each checkpoint.
  CHECKPOINTS=1 QNBD_POWER_VIEWS=1 OPS=400 one qcow2-views.$r $((s + 14)) qcow2 b0 "$(qcow2 "-o cluster_size=4k")"
  # Live edits of other bitmaps through the control socket (add, clear,
  # disable, enable, merge, remove) while the writers run.
  CHECKPOINTS=1 QNBD_POWER_BITMAP_EDITS=1 OPS=1200 one qcow2-bitmap-edits.$r $((s + 12)) qcow2 b0 \
    "$(qcow2 "-o cluster_size=4k")"
  # A second image added and removed through the control socket over and
  # over (bitmaps marked in use, then stored on a clean close) while the
  # writers run: crash points inside the open and the close.
  CYCLE=1 CHECKPOINTS=1 OPS=100 one qcow2-export-cycle.$r $((s + 13)) qcow2 b0 \
    "$(qcow2 "-o cluster_size=4k") && qemu-img create -q -f qcow2 e 16M && qemu-img bitmap --add e b0"
  if [[ ${QNBD_POWER_WIDE:-0} == 1 ]]; then
    # More geometries, for a longer hunt (not run in CI; each passed 2-4
    # seeds on c8b90cf): 512-byte clusters (refcount table growth, 1-bit
    # refcounts), lazy refcounts, 2 MiB clusters (both writers in one
    # cluster), compat 0.10, a qcow2 backing file with compressed clusters,
    # extended L2 at 16 KiB / 2 MiB / 128 KiB over a backing file, a raw
    # external data file, internal snapshots (every write copies a shared
    # cluster), a compressed image, four writers, and checkpoints on them.
    snap="qemu-img create -q -f qcow2 d 16M && qemu-io -c 'write -P 0x11 0 16M' d >/dev/null && qemu-img snapshot -c s1 d"
    one c512-rc64.$r $((s + 101)) qcow2 b0 "$(qcow2 "-o cluster_size=512,refcount_bits=64")"
    one c512-rc1.$r $((s + 102)) qcow2 b0 "$(qcow2 "-o cluster_size=512,refcount_bits=1")"
    one lazy.$r $((s + 103)) qcow2 b0 "$(qcow2 "-o cluster_size=4k,lazy_refcounts=on")"
    one c2m.$r $((s + 104)) qcow2 b0 "$(qcow2 "-o cluster_size=2M")"
    one compat010.$r $((s + 106)) qcow2 - "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k d 16M"
    one backing-qcow2.$r $((s + 107)) qcow2 b0 \
      "qemu-img create -q -f qcow2 base 16M && qemu-io -c 'write -P 0x5a 0 8M' -c 'write -c -P 0x6b 8M 1M' base >/dev/null &&
       $(qcow2 "-o cluster_size=4k -b base -F qcow2")"
    one extl2-16k-rc2.$r $((s + 108)) qcow2 b0 "$(qcow2 "-o extended_l2=on,cluster_size=16k,refcount_bits=2")"
    one extl2-2m.$r $((s + 109)) qcow2 b0 "$(qcow2 "-o extended_l2=on,cluster_size=2M")"
    one extl2-128k-backing.$r $((s + 111)) qcow2 b0 \
      "qemu-img create -q -f qcow2 base 16M && qemu-io -c 'write -P 0x5a 0 4M' -c 'write -z 4M 1M' -c 'write -c -P 0x6b 8M 1M' base >/dev/null &&
       $(qcow2 "-o extended_l2=on,cluster_size=128k -b base -F qcow2")"
    one c4k-datafile-raw.$r $((s + 112)) qcow2 b0 "$(qcow2 "-o cluster_size=4k,data_file=d.data,data_file_raw=on")"
    one snap64k.$r $((s + 113)) qcow2 b0 "$snap && qemu-img bitmap --add d b0"
    one snap4k.$r $((s + 114)) qcow2 b0 "${snap/create -q -f qcow2/create -q -f qcow2 -o cluster_size=4k} && qemu-img bitmap --add d b0"
    one compressed.$r $((s + 115)) qcow2 b0 \
      "qemu-img create -q -f raw r 16M && qemu-io -f raw -c 'write -P 0x33 0 16M' r >/dev/null &&
       qemu-img convert -c -O qcow2 -o cluster_size=4k r d && rm r && qemu-img bitmap --add d b0"
    THREADS=4 OPS=400 one c512-4t.$r $((s + 116)) qcow2 b0 "$(qcow2 "-o cluster_size=512,refcount_bits=64")"
    THREADS=4 OPS=400 one extl2-4t.$r $((s + 117)) qcow2 b0 "$(qcow2 "-o extended_l2=on,cluster_size=16k")"
    CHECKPOINTS=1 OPS=400 one cp-4k.$r $((s + 118)) qcow2 b0 "$(qcow2 "-o cluster_size=4k")"
    CHECKPOINTS=1 OPS=400 one cp-extl2.$r $((s + 119)) qcow2 b0 "$(qcow2 "-o extended_l2=on")"
    CHECKPOINTS=1 OPS=400 THREADS=4 one cp-snap.$r $((s + 120)) qcow2 b0 "$snap && qemu-img bitmap --add d b0"
    # Twelve enabled bitmaps with checkpoint-style names: the directory that
    # arming marks in_use in place spans two sectors.
    many="$(qcow2 "-o cluster_size=4k")"
    for i in $(seq 1 11); do many+=" && qemu-img bitmap --add d checkpoint-2026-12-07T05:00:0$i"; done
    one many-bitmaps.$r $((s + 121)) qcow2 b0 "$many"
  fi
  rm -rf "${T:?}"/*."$r"
done
echo PASS
