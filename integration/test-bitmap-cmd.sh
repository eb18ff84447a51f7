#!/usr/bin/env bash
# `qnbd bitmap` vs `qemu-img bitmap`: the same operations on identical
# images (starting from bitmaps qemu-img made, with qemu-io writes between
# steps) must give equal bitmap lists in qemu-img info (names, granularity,
# flags), equal qemu-nbd -B extents for every bitmap, a clean qemu-img
# check, and the same refusals (exit status and message after the prefix).
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3
requires_qnbd

T=$TMPDIR_TEST
ref=$T/ref.qcow2 # edited by qemu-img
mine=$T/mine.qcow2 # edited by qnbd
src=$T/src.qcow2 # -b source for --merge

bitmap_list() {
  qemu-img info --output=json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin).get("format-specific", {}).get("data", {})
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])))'
}

# Every bitmap's extents as qemu-nbd -B serves them (normalised runs): one
# qemu-nbd exporting all of the image's usable bitmaps, one normaliser run.
# LIST is the image's bitmap_list output.
extents() {
  local img=$1 list=$2 out=$3 b
  local -a in_use=() usable=() named=()
  while read -r b _ flags; do
    [[ -n $b ]] || continue
    if [[ $flags == *in-use* ]]; then in_use+=("$b"); else usable+=("$b"); fi
  done <"$list"
  : >"$out"
  for b in "${in_use[@]}"; do echo "$b in-use" >>"$out"; done
  ((${#usable[@]})) || return 0
  local sock=$T/q.sock
  start_server "$T/q.pid" qemu-nbd -r -t -f qcow2 "${usable[@]/#/-B}" -k "$sock" --pid-file "$T/q.pid" "$img" ||
    fail "qemu-nbd did not start on $img"
  local pid=$SERVER_PID
  for b in "${usable[@]}"; do
    nbdinfo --json --map="qemu:dirty-bitmap:$b" "nbd+unix:///?socket=$sock" >"$T/m.$b.json" || fail "nbdinfo failed"
    named+=("$b=$T/m.$b.json")
  done
  stop_server "$pid"
  python3 "$INTEGRATION_DIR/map-norm.py" bitmap --named "${named[@]}" >>"$out"
}

step=0
compare() {
  step=$((step + 1))
  bitmap_list "$ref" >"$T/ref.list"
  bitmap_list "$mine" >"$T/mine.list"
  diff -u "$T/ref.list" "$T/mine.list" || fail "step $step ($*): bitmap lists differ"
  extents "$ref" "$T/ref.list" "$T/ref.ext"
  extents "$mine" "$T/mine.list" "$T/mine.ext"
  diff -u "$T/ref.ext" "$T/mine.ext" || fail "step $step ($*): bitmap extents differ"
  qemu-img check -q "$mine" || fail "step $step ($*): qemu-img check of qnbd's image is not clean"
  qemu-img check -q "$ref" || fail "step $step ($*): qemu-img check of qemu-img's image is not clean"
}

# both ARGS...: run `qemu-img bitmap ARGS IMG NAME` and `qnbd bitmap ...`
# (the last argument is the bitmap name); equal status and message.
both() {
  local name=${*: -1} args=("${@:1:$#-1}") qs ms
  qs=0 ms=0
  qemu-img bitmap "${args[@]}" "$ref" "$name" 2>"$T/qerr" || qs=$?
  "$QNBD" bitmap "${args[@]}" "$mine" "$name" 2>"$T/merr" || ms=$?
  if { [[ $qs == 0 ]] && [[ $ms != 0 ]]; } || { [[ $qs != 0 ]] && [[ $ms == 0 ]]; }; then
    cat "$T/qerr" "$T/merr" >&2
    fail "bitmap ${args[*]} $name: qemu-img status $qs, qnbd status $ms"
  fi
  if [[ $qs != 0 ]]; then
    local qm mm
    qm=$(head -n1 "$T/qerr" | sed 's/^qemu-img: //')
    mm=$(head -n1 "$T/merr" | sed 's/^qnbd: //')
    [[ $qm == "$mm" ]] || fail "bitmap ${args[*]} $name: message '$mm' differs from qemu-img's '$qm'"
    refused=$((refused + 1))
  fi
}
io() {
  qemu-io -f qcow2 "$@" "$ref" >/dev/null
  qemu-io -f qcow2 "$@" "$mine" >/dev/null
}
refused=0

for cluster in 64k 4k 2M; do
  rm -f "$ref" "$mine" "$src"
  qemu-img create -q -f qcow2 -o cluster_size=$cluster "$ref" 64M
  qemu-img bitmap --add -g 4096 "$ref" q1 # made by qemu-img, edited by both
  qemu-io -f qcow2 -c 'write 0 3000' "$ref" >/dev/null
  cp "$ref" "$mine"
  qemu-img create -q -f qcow2 "$src" 64M
  qemu-img bitmap --add -g 512 "$src" ext
  qemu-io -f qcow2 -c 'write 7M 1k' -c 'write 63M 1' "$src" >/dev/null

  both --add a
  compare "cluster $cluster: --add (default granularity)"
  both --add -g 512 --disable b
  io -c 'write 1000 70000' -c 'write -z 5M 1M' -c 'discard 9M 64k'
  compare "--add -g 512 --disable, writes"
  both --add -g 2M c
  io -c 'write 33M 1' -c 'write 40M 3M'
  compare "--add -g 2M, writes"
  both --disable a
  io -c 'write 50M 512'
  both --merge a b
  compare "--disable, --merge"
  both --merge ext -b "$src" -F qcow2 c
  compare "--merge -b"
  both --merge q1 c
  both --clear a
  both --enable b
  io -c 'write 60M 4k'
  compare "--merge, --clear, --enable"
  both --add --disable --enable --clear d
  both --remove q1
  compare "multi-op, --remove of a qemu-made bitmap"
  # Refusals.
  both --add b
  both --remove zz
  both --clear zz
  both --add -g 1000 e
  both --merge zz b
  both --merge b zz
  compare "refusals change nothing"
  # A bitmap left in use by a crash: only removal is allowed.
  # (inner shell so bash's "Aborted" notice goes to /dev/null too)
  for img in "$ref" "$mine"; do
    bash -c 'qemu-io -f qcow2 -c "write 0 4k" -c abort "$1"; true' _ "$img" >/dev/null 2>&1
  done
  both --clear a
  both --enable b
  both --merge b a
  compare "in-use refusals"
  for b in a b c d; do both --remove $b; done
  compare "all removed"
  [[ ! -s $T/mine.list ]] || fail "bitmaps left after removing all: $(cat "$T/mine.list")"
done
[[ $refused == 27 ]] || fail "expected 27 refusals (9 per image), saw $refused"
echo "PASS: $step steps equal to qemu-img bitmap, $refused refusals with qemu-img's messages"
