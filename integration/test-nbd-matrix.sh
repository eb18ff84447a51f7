#!/usr/bin/env bash
# Serve every read-matrix image (make-read-matrix.py) read-only with
# `qnbd serve` and with `qemu-nbd`, side by side on Unix sockets, and compare
# what an NBD client sees:
#   nbdcopy from qnbd                 == qemu-img convert -O raw   (required)
#   nbdinfo --map (base:allocation)   qnbd vs qemu-nbd             (semantic required)
#   nbdinfo --map=qemu:allocation-depth, qnbd -A vs qemu-nbd -A    (semantic required)
# Exact textual equality of the maps is counted and printed, not required.
# shellcheck source=integration/functions.sh
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy python3 cmp timeout
requires_qnbd

images=$TMPDIR_TEST/images
python3 "$INTEGRATION_DIR/make-read-matrix.py" "$images"

uri() { echo "nbd+unix:///?socket=$1"; }
qnbd_sock=$TMPDIR_TEST/qnbd.sock
qemu_sock=$TMPDIR_TEST/qemu.sock

total=0 copy_ok=0
declare -A semantic_ok=([base]=0 [depth]=0) exact_ok=([base]=0 [depth]=0)
rows=()
problems=()
while IFS=$'\t' read -r name path fmt; do
  total=$((total + 1))
  qemu-img convert -f "$fmt" -O raw "$path" "$TMPDIR_TEST/ref.raw"
  rm -f "$qnbd_sock" "$qemu_sock"

  if ! start_server "$TMPDIR_TEST/qnbd.pid" \
      timeout --foreground 300 "$QNBD" serve -r -t -e 8 -A -f "$fmt" -k "$qnbd_sock" --pid-file "$TMPDIR_TEST/qnbd.pid" "$path"; then
    problems+=("$name: qnbd serve did not start")
    rows+=("$(printf '%-30s %s' "$name" "qnbd serve did not start")")
    continue
  fi
  qnbd_pid=$SERVER_PID
  start_server "$TMPDIR_TEST/qemu.pid" \
    qemu-nbd -r -t -e 8 -A -f "$fmt" -k "$qemu_sock" --pid-file "$TMPDIR_TEST/qemu.pid" "$path" ||
    fail "qemu-nbd did not start on $name"
  qemu_pid=$SERVER_PID

  rm -f "$TMPDIR_TEST/copy.raw"
  if ! timeout 120 nbdcopy "$(uri "$qnbd_sock")" "$TMPDIR_TEST/copy.raw" 2>"$TMPDIR_TEST/nbdcopy.err"; then
    copy="nbdcopy failed: $(head -n 1 "$TMPDIR_TEST/nbdcopy.err")"
    problems+=("$name: $copy")
  elif ! cmp -s "$TMPDIR_TEST/ref.raw" "$TMPDIR_TEST/copy.raw"; then
    copy="DIFFERS: $(cmp "$TMPDIR_TEST/ref.raw" "$TMPDIR_TEST/copy.raw" 2>&1 | sed 's/.* differ: //' || true)"
    problems+=("$name: nbdcopy output $copy")
  else
    copy=identical
    copy_ok=$((copy_ok + 1))
  fi

  maps=""
  for ctx in base depth; do
    if [[ $ctx == base ]]; then map_arg=--map; else map_arg=--map=qemu:allocation-depth; fi
    timeout 60 nbdinfo "$map_arg" "$(uri "$qemu_sock")" >"$TMPDIR_TEST/qemu.map" ||
      fail "nbdinfo $map_arg failed against qemu-nbd on $name"
    if ! timeout 60 nbdinfo "$map_arg" "$(uri "$qnbd_sock")" >"$TMPDIR_TEST/qnbd.map" 2>"$TMPDIR_TEST/nbdinfo.err"; then
      maps+=" $ctx: nbdinfo failed"
      problems+=("$name: nbdinfo $map_arg against qnbd: $(head -n 1 "$TMPDIR_TEST/nbdinfo.err")")
      continue
    fi
    set +e
    verdict=$(python3 "$INTEGRATION_DIR/map-norm.py" nbdinfo "$TMPDIR_TEST/qemu.map" "$TMPDIR_TEST/qnbd.map")
    rc=$?
    set -e
    first=$(head -n 1 <<<"$verdict")
    maps+=" $ctx: $first"
    [[ $first == *exact=yes* ]] && exact_ok[$ctx]=$((exact_ok[$ctx] + 1))
    if ((rc == 0)); then
      semantic_ok[$ctx]=$((semantic_ok[$ctx] + 1))
    else
      problems+=("$name: $map_arg differs from qemu-nbd: $(tail -n +2 <<<"$verdict" | tr '\n' ' ' | tr -s ' ')")
    fi
  done

  stop_server "$qemu_pid" || true
  if ! stop_server "$qnbd_pid"; then
    problems+=("$name: qnbd serve did not exit cleanly on SIGTERM (see server log)")
  fi
  rows+=("$(printf '%-30s %-12.40s%s' "$name" "$copy" "$maps")")
done <"$images/manifest.tsv"

printf '%s\n' "${rows[@]}"
echo
echo "nbdcopy from qnbd identical to qemu-img convert: $copy_ok/$total"
echo "base:allocation agrees with qemu-nbd: ${semantic_ok[base]}/$total (exactly equal text: ${exact_ok[base]}/$total)"
echo "qemu:allocation-depth agrees with qemu-nbd: ${semantic_ok[depth]}/$total (exactly equal text: ${exact_ok[depth]}/$total)"
if ((${#problems[@]} > 0)); then
  echo
  printf 'FAIL %s\n' "${problems[@]}"
  exit 1
fi
