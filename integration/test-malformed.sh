#!/usr/bin/env bash
# qnbd must refuse malformed qcow2 images cleanly: exit status 1 and exactly
# one stderr line naming the defect (a keyword per case), within a time
# limit; never a crash, a hang or a sanitizer report. Cases are built by
# make-malformed.py from valid qemu-img images; see its docstring for the
# scopes ("open" defects must fail `info` and `convert`, "data" defects must
# fail `convert`, and "valid" controls must succeed).
# shellcheck source=integration/functions.sh
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io python3 timeout
requires_qnbd

images=$TMPDIR_TEST/images
python3 "$INTEGRATION_DIR/make-malformed.py" "$images"
out=$TMPDIR_TEST/out.raw

# verdict MODE KEYWORDS: judge the last run_checked. MODE is "fail" (must
# be refused as described above), "succeed", or "no-crash" (either outcome,
# but a refusal must still be one clean line). Prints "ok" or the problem.
verdict() {
  local mode=$1 keywords=$2
  local lines first
  lines=$(grep -c . "$RUN_STDERR" || true)
  first=$(grep -m 1 . "$RUN_STDERR" | cut -c 1-100 || true)
  case $RUN_KIND in
    crash | sanitizer | timeout)
      echo "$RUN_KIND (exit $RUN_STATUS): $first"
      return
      ;;
  esac
  case $mode in
    succeed)
      if [[ $RUN_KIND == ok ]]; then echo ok; else echo "refused (exit $RUN_STATUS): $first"; fi
      return
      ;;
    no-crash)
      [[ $RUN_KIND == ok ]] && { echo "ok (accepted)"; return; }
      ;;
    fail)
      [[ $RUN_KIND == ok ]] && { echo "accepted (exit 0)"; return; }
      ;;
  esac
  if ((RUN_STATUS != 1)); then
    echo "exit $RUN_STATUS, expected 1: $first"
  elif ((lines != 1)); then
    echo "$lines stderr lines, expected 1: $first"
  elif ! grep -Eiq -- "$keywords" "$RUN_STDERR"; then
    echo "no /$keywords/ in: $first"
  else
    echo "ok"
  fi
}

total=0 failed=0
rows=()
problems=()
while IFS=$'\t' read -r name path scope keywords extra; do
  total=$((total + 1))
  # shellcheck disable=SC2206 # extra is a word list by design
  args=($extra)
  case $scope in
    open) info_mode=fail convert_mode=fail ;;
    data) info_mode=no-crash convert_mode=fail ;;
    valid) info_mode=succeed convert_mode=succeed ;;
    *) fail "manifest: unknown scope '$scope' for $name" ;;
  esac

  run_checked 30 "$QNBD" info "${args[@]}" "$path"
  info=$(verdict "$info_mode" "$keywords")
  rm -f "$out"
  run_checked 30 "$QNBD" convert "${args[@]}" -O raw "$path" "$out"
  convert=$(verdict "$convert_mode" "$keywords")
  rm -f "$out"

  if [[ $info != ok* || $convert != ok* ]]; then
    failed=$((failed + 1))
    [[ $info != ok* ]] && problems+=("$name: info: $info")
    [[ $convert != ok* ]] && problems+=("$name: convert: $convert")
    result=FAIL
  else
    result=pass
  fi
  rows+=("$(printf '%-36s %-5s %-4s info: %-28.28s convert: %.40s' "$name" "$scope" "$result" "$info" "$convert")")
done <"$images/manifest.tsv"

printf '%s\n' "${rows[@]}"
echo
echo "malformed-image cases: $((total - failed)) passed, $failed failed (of $total)"
if ((failed > 0)); then
  printf 'FAIL %s\n' "${problems[@]}"
  exit 1
fi
