#!/usr/bin/env bash
# A writable `qnbd serve` tracking enabled bitmaps is SIGKILLed (by its PID)
# while a seeded libnbd client writes. Afterwards, compared with qemu-nbd and
# qemu-img on copies of the same image, with crash recovery turned off
# (--recover-bitmaps=no, or copies without the write-intent record beside
# them; test-bitmap-crash.sh tests recovery):
#  - the tracking bitmaps are stored in-use (qemu-img info), the disabled one
#    is not, and qemu-img check finds no corruption (leaks allowed);
#  - `qnbd serve -B NAME` of an in-use bitmap refuses at start, read-only or
#    writable, with one line naming the bitmap inconsistent, like qemu-nbd
#    -B, exits non-zero without hanging and leaves the bitmaps as they were;
#  - the disabled bitmap still exports (same map as qemu-nbd's), serving
#    without -B reads the same data as qemu-img, and a writable serve leaves
#    the bitmaps the way qemu-nbd leaves them;
#  - `qnbd bitmap --remove` of an in-use bitmap succeeds like qemu-img's,
#    and --clear/--enable/--disable refuse it like qemu-img's.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy timeout
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
img=$T/disk.qcow2

# "NAME GRANULARITY FLAGS" per bitmap of image $1.
bitmap_list() {
  qemu-img info -U --output=json "$1" | "$PY" -c '
import json, sys
d = json.load(sys.stdin).get("format-specific", {}).get("data", {})
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])) or "-")'
}

# check_no_corruption IMG WHAT: qemu-img check exit 0 or 3 (leaks only).
check_no_corruption() {
  local status=0
  qemu-img check --output=json "$1" >"$T/check.json" 2>"$T/check.err" || status=$?
  case $status in
    0 | 3) ;;
    *) cat "$T/check.json" "$T/check.err" >&2; fail "$2: qemu-img check exit $status" ;;
  esac
  CHECK_SUMMARY=$("$PY" -c '
import json, sys
d = json.load(open(sys.argv[1]))
if d.get("corruptions", 0) or d.get("check-errors", 0):
    sys.exit("corruptions %s, check errors %s" % (d.get("corruptions", 0), d.get("check-errors", 0)))
print("leaks %d, image end %d" % (d.get("leaks", 0), d["image-end-offset"]))' "$T/check.json") ||
    fail "$2: qemu-img check found corruption"
}

# bitmap_map SERVER IMG BITMAP OUT: nbdinfo --json map of BITMAP as served
# read-only by SERVER (qnbd or qemu-nbd).
bitmap_map() {
  local server=$1 image=$2 b=$3 out=$4 sock=$T/map.sock pid
  if [[ $server == qnbd ]]; then
    start_server "$T/map.pid" "$QNBD" serve -r -t -B "$b" -f qcow2 -k "$sock" --pid-file "$T/map.pid" "$image"
  else
    start_server "$T/map.pid" qemu-nbd -r -t -B "$b" -f qcow2 -k "$sock" --pid-file "$T/map.pid" "$image"
  fi || fail "$server -r -B $b did not start on $image"
  pid=$SERVER_PID
  nbdinfo --json --map="qemu:dirty-bitmap:$b" "nbd+unix:///?socket=$sock" >"$out" || fail "nbdinfo map of $b ($server)"
  stop_server "$pid" || fail "$server -B $b did not stop cleanly"
}

qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0x6b 3M 512k' "$img"
qemu-img bitmap --add "$img" bk
qemu-img bitmap --add -g 4k "$img" fine
qemu-img bitmap --add --disable "$img" off
qemu-io -f qcow2 -c 'write -q -P 0x77 8M 100k' "$img" # recorded in bk and fine, not off
# A disabled bitmap holding bits (bk's) that must survive everything below.
qemu-img bitmap --add --disable "$img" frozen
qemu-img bitmap --merge bk "$img" frozen
bitmap_map qemu-nbd "$img" frozen "$T/frozen.before.json"
bitmap_map qemu-nbd "$img" off "$T/off.before.json"

# The workload, killed mid-way: wait until a write has marked the bitmaps
# in-use on disk, let it run a little longer, then SIGKILL the server.
start_serve -f qcow2 "$img"
"$PY" "$INTEGRATION_DIR/kill_writer.py" "$SERVE_URI" 7 "$T/expect.raw" "$T/pending.txt" 2>"$T/writer.log" &
writer=$!
# shellcheck disable=SC2016 # expanded when the cleanup runs
cleanup_fn '[[ -n $writer ]] && kill "$writer" 2>/dev/null'
# (A poll can land inside the in-place directory update, where qemu-img -U
# sees the bitmaps extension invalidated and warns: expected, kept quiet.)
for ((i = 0; i < 200; i++)); do
  [[ $(qemu-img info -U "$img" 2>/dev/null) == *"in-use"* ]] && break
  sleep 0.05
done
[[ $(qemu-img info -U "$img") == *"in-use"* ]] || fail "no bitmap in-use 10 s into the workload"
sleep 0.4
serve_alive || { cat "$SERVE_LOG" >&2; fail "qnbd serve died under the writer before the kill"; }
kill -0 "$writer" 2>/dev/null || { cat "$T/writer.log" >&2; fail "the writer stopped before the kill"; }
kill -KILL "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=
timeout 30 tail --pid="$writer" -f /dev/null || fail "writer did not stop after the kill"
wstatus=0
wait "$writer" || wstatus=$?
writer=
[[ $wstatus == 0 ]] || { cat "$T/writer.log" >&2; fail "writer failed while the server lived ($wstatus)"; }
echo "killed after $(wc -l <"$T/pending.txt") requests since the last flush; $(cat "$T/writer.log")"

# On disk: the tracking bitmaps in-use, the disabled ones not.
after_kill=$(bitmap_list "$img")
echo "bitmaps after SIGKILL:"
echo "$after_kill" | sed 's/^/  /'
expect_eq "$after_kill" "bk 65536 auto,in-use
fine 4096 auto,in-use
frozen 65536 -
off 65536 -" "bitmaps after SIGKILL"
check_no_corruption "$img" "after SIGKILL"
echo "qemu-img check after SIGKILL: $CHECK_SUMMARY"
cp "$img" "$T/killed.qcow2" # pristine copy for the qemu side

# -B of an in-use bitmap: both servers refuse, qnbd with one clear line.
for mode in ro rw; do
  ro=(); [[ $mode == ro ]] && ro=(-r)
  for bm in bk "off -B fine"; do
    read -ra bargs <<<"-B $bm"
    name=${bm##* }
    cp "$T/killed.qcow2" "$T/q.qcow2"
    run_checked 20 qemu-nbd "${ro[@]}" "${bargs[@]}" -f qcow2 -k "$T/q.sock" "$T/q.qcow2"
    [[ $RUN_KIND == error ]] || fail "qemu-nbd ${ro[*]} ${bargs[*]}: expected a refusal, got $RUN_KIND ($RUN_STATUS)"
    qmsg=$(cat "$RUN_STDERR")
    # --recover-bitmaps=no: today's behaviour, as qemu-nbd's (recovery is
    # test-bitmap-crash.sh's).
    run_checked 20 "$QNBD" serve --recover-bitmaps=no "${ro[@]}" "${bargs[@]}" -f qcow2 -k "$T/m.sock" "$img"
    mmsg=$(cat "$RUN_STDERR")
    echo "$mode ${bargs[*]}: qemu-nbd exit $RUN_STATUS: $qmsg"
    echo "$mode ${bargs[*]}: qnbd serve exit $RUN_STATUS: $mmsg"
    [[ $RUN_KIND == error ]] || fail "qnbd serve ${ro[*]} ${bargs[*]}: expected a refusal, got $RUN_KIND ($RUN_STATUS)"
    [[ $(grep -c . "$RUN_STDERR") == 1 ]] || fail "qnbd serve ${bargs[*]}: refusal is not one line: $mmsg"
    [[ $mmsg == *"'$name'"* && $mmsg == *inconsistent* ]] ||
      fail "qnbd serve ${bargs[*]}: message does not name '$name' inconsistent: $mmsg"
    # qemu-nbd's text after its "qemu-nbd: " prefix appears in qnbd's line.
    [[ $mmsg == *"${qmsg#qemu-nbd: }"* ]] || fail "qnbd serve ${bargs[*]}: '$mmsg' lacks qemu-nbd's '${qmsg#qemu-nbd: }'"
    [[ ! -e $T/m.sock ]] || fail "qnbd serve left its socket behind after refusing"
    expect_eq "$(bitmap_list "$img")" "$after_kill" "bitmaps after the refused qnbd serve $mode ${bargs[*]}"
  done
done

# Consistent bitmaps still export, alike on both servers and unchanged.
for b in off frozen; do
  bitmap_map qnbd "$img" "$b" "$T/$b.qnbd.json"
  bitmap_map qemu-nbd "$T/killed.qcow2" "$b" "$T/$b.qemu.json"
  diff -u "$T/$b.qemu.json" "$T/$b.qnbd.json" || fail "disabled bitmap $b: map differs from qemu-nbd's"
  diff -u "$T/$b.before.json" "$T/$b.qnbd.json" || fail "disabled bitmap $b changed across the kill"
done

# Without -B the image serves: the same bytes as qemu-img reads.
start_serve -r -f qcow2 "$img"
size=$(nbdinfo --size "$SERVE_URI") || fail "nbdinfo could not read the export after the kill"
expect_eq "$size" 16777216 "export size after the kill"
nbdcopy "$SERVE_URI" "$T/served.raw" || fail "nbdcopy from the export failed"
stop_serve
qemu-img convert -f qcow2 -O raw "$img" "$T/qemu.raw"
cmp "$T/qemu.raw" "$T/served.raw" || fail "served data differs from qemu-img's reading"

# A writable serve without -B on copies, the same writes through qemu-nbd:
# the bitmaps end up alike (in-use ones stay in-use, disabled ones frozen).
cp "$T/killed.qcow2" "$T/w.mine.qcow2"
cp "$T/killed.qcow2" "$T/w.ref.qcow2"
writes=(-c 'write -P 0x42 100k 300k' -c 'write -z 5M 64k' -c 'write -P 0x43 16777215 1')
start_serve -f qcow2 "$T/w.mine.qcow2"
qemu-io -f raw "${writes[@]}" "$SERVE_URI" >/dev/null || fail "qemu-io through qnbd serve after the kill failed"
stop_serve
start_server "$T/q.pid" qemu-nbd -t -f qcow2 -k "$T/q.sock" --pid-file "$T/q.pid" "$T/w.ref.qcow2" ||
  fail "qemu-nbd (writable) did not start"
qpid=$SERVER_PID
qemu-io -f raw "${writes[@]}" "nbd+unix:///?socket=$T/q.sock" >/dev/null || fail "qemu-io through qemu-nbd failed"
stop_server "$qpid" || fail "qemu-nbd did not stop cleanly"
expect_eq "$(bitmap_list "$T/w.mine.qcow2")" "$(bitmap_list "$T/w.ref.qcow2")" "bitmaps after a writable serve"
qemu-img compare -q "$T/w.ref.qcow2" "$T/w.mine.qcow2" || fail "data after the writable serve differs from qemu-nbd's"
check_no_corruption "$T/w.mine.qcow2" "after a writable serve of the killed image"
bitmap_map qnbd "$T/w.mine.qcow2" off "$T/off.w.json"
diff -u "$T/off.before.json" "$T/off.w.json" || fail "disabled bitmap off changed by the writable serve"

# qnbd bitmap on the in-use bitmap behaves as qemu-img bitmap does.
cp "$T/killed.qcow2" "$T/ref.qcow2"
for op in --clear --enable --disable --remove; do
  qs=0
  qemu-img bitmap "$op" "$T/ref.qcow2" bk >"$T/q.out" 2>&1 || qs=$?
  ms=0
  "$QNBD" bitmap "$op" "$img" bk >"$T/m.out" 2>&1 || ms=$?
  echo "bitmap $op bk (in-use): qemu-img exit $qs, qnbd exit $ms: $(head -n 1 "$T/m.out")"
  expect_eq "$ms" "$qs" "exit status of bitmap $op on the in-use bitmap"
  expect_eq "$(head -n 1 "$T/m.out" | sed 's/^[^:]*: //')" "$(head -n 1 "$T/q.out" | sed 's/^[^:]*: //')" \
    "message of bitmap $op on the in-use bitmap"
  expect_eq "$(bitmap_list "$img")" "$(bitmap_list "$T/ref.qcow2")" "bitmaps after bitmap $op bk"
done
[[ $(bitmap_list "$img") != *bk* ]] || fail "bk still listed after --remove"
check_no_corruption "$T/ref.qcow2" "after qemu-img bitmap --remove"
ref_summary=$CHECK_SUMMARY
check_no_corruption "$img" "after qnbd bitmap --remove"
echo "after --remove bk: qemu-img's copy: $ref_summary; qnbd's: $CHECK_SUMMARY"
expect_eq "${CHECK_SUMMARY%%,*}" "${ref_summary%%,*}" "leaked clusters after --remove"
qemu-img compare -q "$T/ref.qcow2" "$img" || fail "guest data differs after --remove"
for b in off frozen; do
  bitmap_map qnbd "$img" "$b" "$T/$b.final.json"
  diff -u "$T/$b.before.json" "$T/$b.final.json" || fail "bitmap $b changed by --remove bk"
done
# The remaining in-use bitmap still refuses to export.
run_checked 20 "$QNBD" serve -r -B fine -f qcow2 -k "$T/m.sock" "$img"
[[ $RUN_KIND == error ]] || fail "qnbd serve -B fine after --remove bk: expected a refusal, got $RUN_KIND"
echo PASS
