#!/usr/bin/env bash
# QEMU's size syntax (common/size.hpp) through every qnbd command that takes
# a size, against the qemu-img command of the same name: `create` (the size
# argument, -o size=, -o cluster_size=), `bench` (-c, -d, -o, -s, -S) and
# `bitmap --add -g`. For each value both tools must accept or refuse alike,
# print the same messages (after the program-name prefix) and, where they
# accept, produce the same result (virtual size, offsets and sizes bench
# reports, the bitmap's granularity).
set -u
for tool in qemu-img python3; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool missing"; exit 77; }
done
QNBD=${QNBD:?QNBD must point at the qnbd binary}
[ -x "$QNBD" ] || { echo "SKIP: $QNBD not built"; exit 77; }
QNBD=$(realpath "$QNBD")

tmp=$(mktemp -d)
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
cd "$tmp" && mkdir q r || exit 1

failures=0
cases=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# Run a command in directory $1; print its exit status, then its stdout and
# stderr lines without the program-name prefix ("qemu-img: " / "qnbd: ")
# and without bench's timing line. Output order between the two streams is
# not compared (qemu-img's stdout is block-buffered into a pipe), and a
# line repeated at once counts once (qemu-img parses a -o option string
# twice, so it warns twice about "0x10k" there).
outcome() {
  local dir=$1 out err rc=0
  shift
  out=$(cd "$dir" && "$@" 2>../err-$dir.txt) || rc=$?
  err=$(sed -E 's/^(qemu-img|qnbd): //' "err-$dir.txt" | uniq)
  printf 'rc=%s\n%s\n%s\n' "$rc" "$(grep -v '^Run completed' <<<"$out")" "$err"
}

# same DESC QEMU-ARGS... -- QNBD-ARGS...: qemu-img runs in r/, qnbd in q/,
# so that both see the same file names.
same() {
  local desc=$1
  shift
  local qemu=() qnbd=()
  while [ "$1" != -- ]; do
    qemu+=("$1")
    shift
  done
  shift
  qnbd=("$@")
  cases=$((cases + 1))
  local q n
  # Both at once: start-up is most of each run.
  outcome q "${qnbd[@]}" >n.txt &
  q=$(outcome r "${qemu[@]}")
  wait $!
  n=$(cat n.txt)
  [ "$q" = "$n" ] || fail "$desc
  qemu-img: $(tr '\n' '|' <<<"$q")
  qnbd:     $(tr '\n' '|' <<<"$n")"
}

# Sizes as qemu-img create reads them: the virtual size of each accepted
# one (qcow2 rounds it up to 512 bytes, so fractions are checked through
# bench -o below, which does not round).
vsize() { qemu-img info --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'; }
sizes=(0 00 010 1000 1k 1K 1.5k 1.5M 0.5G 1.k 1.b 1.0b 4096.0 +1 " 1k" 0x10 0X200 0x10k 1.000001k 0.999k
  1.999999999999999999999k 1T 1g 0.5 1.5 0.5b .5k 1..5 1.5e3k 1e3 1kB "1k " 1_000 0x 0x1.8k 0x1p3
  inf nan k "" 16E 8E 18446744073709551615 18446744073709551616)
for s in "${sizes[@]}"; do
  rm -f q/f.qcow2 r/f.qcow2
  same "create size [$s]" qemu-img create -q -f qcow2 f.qcow2 "$s" -- "$QNBD" create -q -f qcow2 f.qcow2 "$s"
  if [ -f r/f.qcow2 ]; then
    cases=$((cases + 1))
    [ -f q/f.qcow2 ] && [ "$(vsize q/f.qcow2)" = "$(vsize r/f.qcow2)" ] || fail "create size [$s]: virtual size differs"
  fi
done
# -o size= (QemuOpts): the same list, and a negative number (which as an
# argument of its own getopt takes for an option). Left out: sizes from
# 2^63 to 2^64 - 1, which parse but which qemu-img 7.2 then reports
# inconsistently ("Image creation needs a size parameter" for 2^64 - 1,
# "Image size cannot be negative" for 8E); qnbd says the size must be
# less than 8 EiB (checked in the unit test of the parser's range).
for s in "${sizes[@]}" -1 -0; do
  case $s in 8E | 18446744073709551615) continue ;; esac
  rm -f q/f.qcow2 r/f.qcow2
  same "create -o size=[$s]" qemu-img create -q -f qcow2 -o "size=$s" f.qcow2 -- \
    "$QNBD" create -q -f qcow2 -o "size=$s" f.qcow2
done
for s in 4k 4096 0x1000 64k 0.5k 2M 1.5k 0x10k 16E x; do
  rm -f q/f.qcow2 r/f.qcow2
  same "create -o cluster_size=[$s]" qemu-img create -q -f qcow2 -o "cluster_size=$s" f.qcow2 1M -- \
    "$QNBD" create -q -f qcow2 -o "cluster_size=$s" f.qcow2 1M
  if [ -f r/f.qcow2 ]; then
    cases=$((cases + 1))
    cmp -s q/f.qcow2 r/f.qcow2 || fail "create -o cluster_size=[$s]: images differ"
  fi
done

# bench: -c and -d are plain C numbers (decimal, 0x hex, 0 octal, no
# suffix), -o/-s/-S are sizes; the first line bench prints shows each value
# as parsed. (qemu-img takes any -d up to INT_MAX and never ends with -d 0;
# qnbd runs a thread per request in flight and takes 1 to 1024.)
truncate -s 1M q/f.raw
truncate -s 1M r/f.raw
for c in 0 16 010 0x10 " 16" 1k -1 x 2147483647x; do
  same "bench -c [$c]" qemu-img bench -f raw -c "$c" -d 1 -s 512 -S 1k f.raw -- \
    "$QNBD" bench -f raw -c "$c" -d 1 -s 512 -S 1k f.raw
done
for d in 1 010 0x4 1k -1; do
  same "bench -d [$d]" qemu-img bench -f raw -c 4 -d "$d" f.raw -- "$QNBD" bench -f raw -c 4 -d "$d" f.raw
done
for o in 0 1.5k 0.00048828125k 0.000732421875k 0.0001k 1.0005k 1.0004k 0.999k 0x10k 1M 16E 8E -1 1.5; do
  same "bench -o [$o]" qemu-img bench -f raw -c 1 -d 1 -o "$o" f.raw -- "$QNBD" bench -f raw -c 1 -d 1 -o "$o" f.raw
done
for s in 0 512 1.5k 0x200 2G 3G 1.5; do
  same "bench -s [$s]" qemu-img bench -f raw -c 2 -d 1 -s "$s" f.raw -- "$QNBD" bench -f raw -c 2 -d 1 -s "$s" f.raw
done
for s in 0 1.5k 0x10k 3G x; do
  same "bench -S [$s]" qemu-img bench -f raw -c 3 -d 1 -S "$s" f.raw -- "$QNBD" bench -f raw -c 3 -d 1 -S "$s" f.raw
done

# bitmap --add -g: the granularity as stored (qemu-img info lists it).
granularity() {
  qemu-img info --output=json "$1" |
    python3 -c 'import json,sys; print([b["granularity"] for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", [])])'
}
for g in 0 512 64k 0x10000 0x1k 1.5k 0.5M 3 16E x; do
  qemu-img create -q -f qcow2 r/f.qcow2 1M && cp r/f.qcow2 q/f.qcow2
  same "bitmap -g [$g]" qemu-img bitmap --add -g "$g" f.qcow2 b -- "$QNBD" bitmap --add -g "$g" f.qcow2 b
  cases=$((cases + 1))
  [ "$(granularity q/f.qcow2)" = "$(granularity r/f.qcow2)" ] || fail "bitmap -g [$g]: granularity differs"
done

echo "$cases cases, $failures failures"
[ "$failures" -eq 0 ]
