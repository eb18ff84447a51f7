#!/usr/bin/env bash
# Run libFuzzer targets for a while (by hand for hours, or from .ci/test for
# seconds) and print executions and exec/s per target.
#
# usage: fuzz/run-long.sh [-d BUILD_DIR] [-t SECONDS] [-j PARALLEL] [TARGET...]
#   BUILD_DIR  the clang build with -DQNBD_FUZZ=ON (default build-fuzz)
#   SECONDS    per target (default 14400, four hours)
#   PARALLEL   targets run at once (default 1)
#   TARGET     protocol transmission qcow2_read qcow2_write check config
#              control intent (default: all)
# The growing corpus of TARGET is BUILD_DIR/corpus/TARGET (the committed
# seeds in fuzz/corpus are only read); crashes go to BUILD_DIR/artifacts/.
# Exits non-zero if any target found a crash: minimize it, fix it, and add
# it to fuzz/corpus/TARGET (see docs/testing.md "Fuzzing").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

dir=build-fuzz
seconds=14400
parallel=1
while getopts "d:t:j:" o; do
  case $o in
    d) dir=$OPTARG ;;
    t) seconds=$OPTARG ;;
    j) parallel=$OPTARG ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(protocol transmission qcow2_read qcow2_write check config control intent)
fi

run_one() {
  local t=$1 bin=$dir/fuzz/qnbd_fuzz_$1
  local seeds=(fuzz/corpus/"$t") extra=() light=
  case $t in
    # Image seeds are at most a few KiB (fuzz_image.hpp's sparse layout);
    # longer inputs only add image bytes the targets cap anyway.
    qcow2_read | qcow2_write) seeds+=(fuzz/corpus/images); extra=(-max_len=4096 -timeout=30) ;;
    # check on a crafted image costs what qemu-img check costs on it: some
    # inputs take seconds (minutes under ASan, millions of error lines),
    # which are not findings. Such inputs are picked less often, not
    # dropped (fuzz/README.md, check's 10 million). Most come from the two
    # sequence-record seeds (thousands of snapshots naming large tables):
    # a run shorter than 10 minutes (the CI's smoke run) leaves those two
    # out, since one such descendant can outlast its whole budget (a CI
    # run timed out on one after 2,318 executions).
    check)
      if ((seconds < 600)); then
        light=$(mktemp -d)
        for f in fuzz/corpus/images/*; do
          [[ ${f##*/} == seed-*scattered* ]] || ln -s "$PWD/$f" "$light/"
        done
        seeds+=("$light")
      else
        seeds+=(fuzz/corpus/images)
      fi
      extra=(-max_len=4096 -timeout=600 -entropic_scale_per_exec_time=1)
      ;;
    # A record is 512 bytes of header and tracked bits plus the chunk bits
    # (the templates have at most 128 chunks); one allocation above 64 MiB
    # is a finding (a record must never make the open allocate unboundedly).
    intent) extra=(-max_len=2048 -timeout=10 -malloc_limit_mb=64) ;;
    *) extra=(-timeout=10) ;;
  esac
  if [[ ! -x $bin ]]; then
    [[ -n $light ]] && rm -rf "$light"
    echo "fuzz $t: $bin is missing (build with -DQNBD_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++)" >&2
    return 1
  fi
  local work=$dir/corpus/$t log=$dir/fuzz-$t.log existing=()
  mkdir -p "$work" "$dir/artifacts"
  for s in "${seeds[@]}"; do [[ -d $s ]] && existing+=("$s"); done
  "$bin" -max_total_time="$seconds" -print_final_stats=1 "${extra[@]}" \
    -artifact_prefix="$dir/artifacts/$t-" "$work" "${existing[@]}" >"$log" 2>&1
  local rc=$?
  [[ -n $light ]] && rm -rf "$light"
  local execs rate
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  echo "fuzz $t: ${execs:-?} executions, ${rate:-?} exec/s, ${seconds} s, exit $rc (log $log)"
  if ((rc != 0)); then
    grep -E "ERROR|violated|SUMMARY|Test unit written" "$log" | head -n 8
    return 1
  fi
}

status=0
running=0
for t in "${targets[@]}"; do
  if ((parallel > 1)); then
    run_one "$t" &
    running=$((running + 1))
    if ((running >= parallel)); then
      wait -n || status=1
      running=$((running - 1))
    fi
  else
    run_one "$t" || status=1
  fi
done
while ((running > 0)); do
  wait -n || status=1
  running=$((running - 1))
done
exit "$status"
