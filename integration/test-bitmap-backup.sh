#!/usr/bin/env bash
# An incremental backup cycle as a backup tool runs it, all through qnbd:
# a full backup (nbdcopy from a read-only `qnbd serve`), then 5 rounds of
#   (a) seeded writes, zeroes, trims and flushes over NBD to a writable
#       `qnbd serve` (the enabled bitmap tracks them), stopped by SIGTERM:
#       the bitmaps must be stored without in-use;
#   (b) a checkpoint at rest with `qnbd bitmap`: --add b{k+1}, --disable b{k}
#       (flags checked in qemu-img info);
#   (c) `qnbd serve -r -B b{k}`: block status of qemu:dirty-bitmap:b{k} over
#       the whole disk, exactly the dirty extents read into backup.raw;
#   (d) backup.raw must equal the image (qemu-img compare), the dirty
#       granules must be exactly the ones the round's requests touched, the
#       map must equal qemu-nbd -B's, and qemu-img check must be clean.
# Rounds alternate --discard=unmap (a trim dirties its granules) and the
# default ignore (a trim is a no-op that dirties nothing). Then 2 crash
# rounds: the writable serve is SIGKILLed mid-workload,
# restarted (which recovers the bitmap, docs/crash-safe-bitmaps.md), then
# checkpointed and pulled as above; the backup must still equal the image.
# At the end every disabled bitmap must still hold what it held when it was
# pulled.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy timeout
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
img=$T/disk.qcow2
backup=$T/backup.raw
rounds=5
seed=${QNBD_BACKUP_SEED:-1000} # the writer of round k uses seed+k
cycle() { timeout 120 "$PY" "$INTEGRATION_DIR/backup_cycle.py" "$@"; }

# "NAME GRANULARITY FLAGS" per bitmap, as qemu-img reads the image.
bitmap_list() {
  qemu-img info --output=json "$img" | "$PY" -c '
import json, sys
d = json.load(sys.stdin).get("format-specific", {}).get("data", {})
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])) or "-")'
}

qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -q -P 0x11 0 3M' -c 'write -q -P 0x22 20M 1M' -c 'write -q -z 30M 2M' \
  -c 'write -q -P 0x33 63M 1M' "$img"
qemu-img bitmap --add "$img" b0
# qemu-img's default granularity; `qnbd bitmap --add` must pick the same.
gran0=$(bitmap_list | awk '$1 == "b0" { print $2 }')
expect_eq "$(bitmap_list)" "b0 $gran0 auto" "bitmaps after qemu-img bitmap --add b0"

# Full backup from a read-only export that also offers b0 (clean so far).
start_serve -r -B b0 -f qcow2 "$img"
nbdcopy "$SERVE_URI" "$backup" || fail "full backup: nbdcopy failed"
nbdinfo --json --map=qemu:dirty-bitmap:b0 "$SERVE_URI" >"$T/full.map.json"
stop_serve
[[ $("$PY" "$INTEGRATION_DIR/map-norm.py" bitmap "$T/full.map.json") == "0 67108864 clean" ]] ||
  fail "b0 is not clean right after it was added: $(cat "$T/full.map.json")"
qemu-img compare -q -f raw -F qcow2 "$backup" "$img" || fail "full backup differs from the image"
echo "full backup: $(stat -c %s "$backup") bytes"

for ((k = 0; k < rounds; k++)); do
  b=b$k
  next=b$((k + 1))
  gran=$(bitmap_list | awk -v b=$b '$1 == b { print $2 }')
  [[ -n $gran ]] || fail "round $k: bitmap $b missing"

  # (a) writes through a writable qnbd serve.
  if ((k % 2 == 0)); then discard=(--discard=unmap); trim_dirties=1; else discard=(); trim_dirties=0; fi
  start_serve "${discard[@]}" -f qcow2 "$img"
  wrote=$(cycle write "$SERVE_URI" $((seed + k)) "$gran" $trim_dirties "$T/granules.$k.json") ||
    { cat "$SERVE_LOG" >&2; fail "round $k: writer failed"; }
  # qnbd sets in_use before the first write (qemu at open): after writes,
  # while the server still runs, the tracking bitmap must be in-use on disk.
  [[ $(qemu-img info -U "$img") == *"in-use"* ]] || fail "round $k: $b not in-use on disk while served writable"
  stop_serve
  if [[ $(qemu-img info "$img") == *in-use* ]]; then fail "round $k: in-use left after SIGTERM"; fi
  qemu-img check -q "$img" || fail "round $k: qemu-img check not clean after the writes"

  # (b) checkpoint at rest with qnbd's own bitmap command.
  before=$(bitmap_list)
  "$QNBD" bitmap --add "$img" "$next" || fail "round $k: qnbd bitmap --add $next failed"
  "$QNBD" bitmap --disable "$img" "$b" || fail "round $k: qnbd bitmap --disable $b failed"
  want=$( (echo "$before" | sed "s/^$b \([0-9]*\) auto\$/$b \1 -/"; echo "$next $gran0 auto") | sort)
  expect_eq "$(bitmap_list)" "$want" "round $k: bitmaps after the checkpoint"
  qemu-img check -q "$img" || fail "round $k: qemu-img check not clean after the checkpoint"

  # (c) pull exactly the dirty extents of b{k}.
  start_serve -r -B "$b" -f qcow2 "$img"
  pulled=$(cycle pull "$SERVE_URI" "$b" "$backup" "$T/granules.$k.json" "$gran") ||
    { cat "$SERVE_LOG" >&2; fail "round $k: incremental pull of $b failed"; }
  nbdinfo --json --map=qemu:dirty-bitmap:$b "$SERVE_URI" >"$T/qnbd.$b.json"
  stop_serve

  # (d) the backup equals the image; qemu-nbd serves the same map.
  qemu-img compare -q -f raw -F qcow2 "$backup" "$img" ||
    fail "round $k: backup.raw differs from the image after pulling $b"
  start_server "$T/q.pid" qemu-nbd -r -t -B "$b" -f qcow2 -k "$T/q.sock" --pid-file "$T/q.pid" "$img" ||
    fail "round $k: qemu-nbd -B $b did not start"
  qpid=$SERVER_PID
  nbdinfo --json --map=qemu:dirty-bitmap:$b "nbd+unix:///?socket=$T/q.sock" >"$T/qemu.$b.json"
  stop_server "$qpid" || fail "round $k: qemu-nbd did not stop cleanly"
  diff -u "$T/qemu.$b.json" "$T/qnbd.$b.json" || fail "round $k: map of $b differs from qemu-nbd's"
  qemu-img check -q "$img" || fail "round $k: qemu-img check not clean"
  echo "round $((k + 1)): discard=${discard[*]:-ignore} $wrote; pulled $b: $pulled"
done

# Crash rounds: kill -9 mid-round, restart, pull the recovered bitmap.
crash_rounds=2
for ((k = rounds; k < rounds + crash_rounds; k++)); do
  b=b$k
  next=b$((k + 1))
  start_serve --recovery-chunk-size 1048576 -f qcow2 "$img"
  # The round's writer, cut by the kill (its exit status then says nothing).
  cycle write "$SERVE_URI" $((seed + k)) "$gran0" 0 "$T/granules.$k.json" >/dev/null 2>"$T/writer.log" &
  writer=$!
  sleep 0.5
  serve_alive || { cat "$SERVE_LOG" >&2; fail "crash round $k: qnbd serve died before the kill"; }
  kill -KILL "$SERVE_PID"
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=
  timeout 30 tail --pid="$writer" -f /dev/null || fail "crash round $k: writer did not stop"
  wait "$writer" || true
  [[ $(qemu-img info "$img") == *in-use* ]] || fail "crash round $k: $b not in-use after the kill"
  # The restart recovers: -B of the tracking bitmap is accepted, and the
  # clean stop stores it consistent.
  start_serve -B "$b" -f qcow2 "$img"
  stop_serve
  if [[ $(qemu-img info "$img") == *in-use* ]]; then fail "crash round $k: in-use left after recovery"; fi
  qemu-img check -q "$img" || [[ $? == 3 ]] || fail "crash round $k: qemu-img check found corruption"
  "$QNBD" bitmap --add "$img" "$next" || fail "crash round $k: qnbd bitmap --add $next failed"
  "$QNBD" bitmap --disable "$img" "$b" || fail "crash round $k: qnbd bitmap --disable $b failed"
  start_serve -r -B "$b" -f qcow2 "$img"
  pulled=$(cycle pull "$SERVE_URI" "$b" "$backup" - "$gran0") ||
    { cat "$SERVE_LOG" >&2; fail "crash round $k: pull of the recovered $b failed"; }
  nbdinfo --json --map=qemu:dirty-bitmap:$b "$SERVE_URI" >"$T/qnbd.$b.json"
  stop_serve
  qemu-img compare -q -f raw -F qcow2 "$backup" "$img" ||
    fail "crash round $k: backup.raw differs from the image after pulling the recovered $b"
  echo "crash round $((k + 1)): killed mid-workload; pulled the recovered $b: $pulled"
done
rounds=$((rounds + crash_rounds))

# Disabled bitmaps are frozen: each still equals what was pulled from it.
args=()
for ((k = 0; k < rounds; k++)); do args+=(-B "b$k"); done
start_serve -r "${args[@]}" -f qcow2 "$img"
for ((k = 0; k < rounds; k++)); do
  nbdinfo --json --map=qemu:dirty-bitmap:b$k "$SERVE_URI" >"$T/final.b$k.json"
  diff -u "$T/qnbd.b$k.json" "$T/final.b$k.json" || fail "disabled bitmap b$k changed after it was pulled"
done
stop_serve
expect_eq "$(bitmap_list | tail -n 1)" "b$rounds $gran0 auto" "the last checkpoint's bitmap"
echo PASS
