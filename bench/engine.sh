#!/usr/bin/env bash
# Engine benchmark: `qnbd bench` vs `qemu-img bench` on the same request
# streams, no NBD in between. Both tools take the same arguments, so every
# row runs the identical command line with either binary.
#
#   seq-alloc  sequential allocating write of SIZE (default 1 GiB) in 1 MiB
#              requests into an empty qcow2: -w -s 1M -S 1M -c SIZE/1M
#   rand-4k    4 KiB overwrites of an allocated image of SIZE: -w -s 4k with
#              step 4k*K, K = the odd number nearest 0.618 * SIZE/4k. Both
#              tools send request i to i*step mod SIZE; K odd and SIZE/4k a
#              power of two make that a permutation of the 4 KiB blocks, and
#              the golden-ratio stride scatters consecutive requests over the
#              whole image (a random-looking order qemu-img bench can
#              produce). -c RAND_COUNT (default 20000), -d 16.
# each with -t none and -t writeback, for qcow2 and (as a baseline) raw.
# Tools alternate within a repetition (qemu first in odd reps, qnbd first in
# even ones); REPS repetitions (default 3); the table shows median seconds
# and the ratio qnbd/qemu (below 1 = qnbd faster). A row whose command fails
# prints "skipped" with the error instead of stopping the run.
#
# Usage: bench/engine.sh [QNBD]   (env: SIZE_MB, RAND_COUNT, REPS, BENCH_DIR)
set -u
QNBD=${1:-${QNBD:-build/qnbd}}
[ -x "$QNBD" ] || { echo "qnbd binary '$QNBD' not found (pass it as \$1)"; exit 1; }
QNBD=$(realpath "$QNBD")
command -v qemu-img >/dev/null || { echo "qemu-img missing"; exit 1; }
SIZE_MB=${SIZE_MB:-1024}
RAND_COUNT=${RAND_COUNT:-20000}
REPS=${REPS:-3}
dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/qnbd-engine.XXXXXX")
trap 'rm -rf "$dir"' EXIT
cd "$dir" || exit 1

# run TOOL ARGS...: prints the seconds of "Run completed in X seconds." or
# "fail: <last error line>".
run() {
  local tool=$1 out
  shift
  if [ "$tool" = qemu ]; then
    out=$(qemu-img bench "$@" 2>&1)
  else
    out=$("$QNBD" bench "$@" 2>&1)
  fi
  local secs
  secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out")
  if [ -n "$secs" ]; then
    echo "$secs"
  else
    echo "fail: $(tail -n 1 <<<"$out")"
  fi
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Fresh image for one run: empty for seq-alloc, a copy of the filled image
# for rand-4k (so every run overwrites the same allocated layout).
prepare() {
  local kind=$1 fmt=$2
  rm -f img
  if [ "$kind" = seq-alloc ]; then
    qemu-img create -q -f "$fmt" img "${SIZE_MB}M"
  else
    cp --sparse=never "full.$fmt" img
  fi
}

for fmt in qcow2 raw; do
  qemu-img create -q -f "$fmt" "full.$fmt" "${SIZE_MB}M"
  qemu-img bench -f "$fmt" -w -s 1M -S 1M -c "$SIZE_MB" -t none --pattern=90 "full.$fmt" >/dev/null ||
    echo "could not fill full.$fmt"
done

printf '%-10s %-6s %-10s %10s %10s %8s\n' row format cache qemu-s qnbd-s ratio
for kind in seq-alloc rand-4k; do
  if [ "$kind" = seq-alloc ]; then
    args=(-w -s 1M -S 1M -c "$SIZE_MB" --pattern=171)
  else
    stride=$(((SIZE_MB * 256 * 618 / 1000) | 1))
    args=(-w -s 4k -S $((4096 * stride)) -c "$RAND_COUNT" -d 16 --pattern=172)
  fi
  for fmt in qcow2 raw; do
    for cache in none writeback; do
      declare -A times=([qemu]="" [qnbd]="")
      error=""
      for ((rep = 1; rep <= REPS; rep++)); do
        order="qemu qnbd"
        [ $((rep % 2)) -eq 0 ] && order="qnbd qemu"
        for tool in $order; do
          prepare "$kind" "$fmt"
          t=$(run "$tool" -f "$fmt" -t "$cache" "${args[@]}" img)
          if [[ $t == fail* ]]; then
            error="$tool ${t#fail: }"
            break 2
          fi
          times[$tool]+=" $t"
        done
      done
      if [ -n "$error" ]; then
        printf '%-10s %-6s %-10s skipped (%s)\n' "$kind" "$fmt" "$cache" "$error"
        continue
      fi
      # shellcheck disable=SC2086
      q=$(median ${times[qemu]}) n=$(median ${times[qnbd]})
      ratio=$(awk -v n="$n" -v q="$q" 'BEGIN { if (q > 0) printf "%.2f", n / q; else print "-" }')
      printf '%-10s %-6s %-10s %10s %10s %8s\n' "$kind" "$fmt" "$cache" "$q" "$n" "$ratio"
    done
  done
done
