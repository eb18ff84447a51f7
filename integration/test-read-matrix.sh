#!/usr/bin/env bash
# Read every image of the matrix (make-read-matrix.py: qcow2 v2/v3, cluster
# sizes 512 B..2 MiB, refcount widths, zlib/zstd compression, zero and
# discarded clusters, backing chains with raw, extended L2, external data
# files, lazy refcounts, snapshots, odd sizes) with qnbd and with qemu-img:
#   qnbd convert -O raw   must be byte-identical to   qemu-img convert -O raw
#   qnbd map --output=json must agree with qemu-img map on which ranges hold
#   data and which read as zeros (exact JSON equality is counted, not required)
# shellcheck source=integration/functions.sh
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io python3 cmp timeout
requires_qnbd

images=$TMPDIR_TEST/images
python3 "$INTEGRATION_DIR/make-read-matrix.py" "$images"

total=0 convert_ok=0 map_semantic=0 map_exact=0
failures=()
rows=()
while IFS=$'\t' read -r name path fmt; do
  total=$((total + 1))
  ref=$TMPDIR_TEST/ref.raw
  out=$TMPDIR_TEST/out.raw
  rm -f "$ref" "$out"
  qemu-img convert -f "$fmt" -O raw "$path" "$ref"

  run_checked 120 "$QNBD" convert -O raw "$path" "$out"
  if [[ $RUN_KIND != ok ]]; then
    convert="$RUN_KIND($RUN_STATUS): $(head -c 200 "$RUN_STDERR" | head -n 1)"
    failures+=("$name: convert $convert")
  elif ! cmp -s "$ref" "$out"; then
    convert="DIFFERS: $(cmp "$ref" "$out" 2>&1 | head -n 1 | sed "s/.* differ: //" || true)"
    failures+=("$name: convert output $convert")
  else
    convert=identical
    convert_ok=$((convert_ok + 1))
  fi

  qemu-img map -f "$fmt" --output=json "$path" >"$TMPDIR_TEST/ref.json"
  run_checked 120 "$QNBD" map --output=json "$path"
  if [[ $RUN_KIND != ok ]]; then
    map="$RUN_KIND($RUN_STATUS): $(head -c 200 "$RUN_STDERR" | head -n 1)"
    failures+=("$name: map $map")
  else
    cp "$RUN_STDOUT" "$TMPDIR_TEST/qnbd.json"
    set +e
    verdict=$(python3 "$INTEGRATION_DIR/map-norm.py" img "$TMPDIR_TEST/ref.json" "$TMPDIR_TEST/qnbd.json" 2>&1)
    rc=$?
    set -e
    map=$(head -n 1 <<<"$verdict")
    [[ $map == *exact=yes* ]] && map_exact=$((map_exact + 1))
    if ((rc == 0)); then
      map_semantic=$((map_semantic + 1))
    else
      failures+=("$name: map disagrees with qemu-img: $(tail -n +2 <<<"$verdict" | tr '\n' ' ' | tr -s ' ')")
    fi
  fi
  rows+=("$(printf '%-30s %-12s %s' "$name" "${convert:0:60}" "${map:0:70}")")
done <"$images/manifest.tsv"

printf '%-30s %-12s %s\n' image convert map
printf '%s\n' "${rows[@]}"
echo
echo "convert byte-identical to qemu-img: $convert_ok/$total"
echo "map agrees with qemu-img (data/zero classes): $map_semantic/$total"
echo "map JSON exactly equal to qemu-img's: $map_exact/$total"
if ((${#failures[@]} > 0)); then
  echo
  printf 'FAIL %s\n' "${failures[@]}"
  exit 1
fi
