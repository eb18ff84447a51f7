#!/usr/bin/env bash
# qnbd must refuse malformed qcow2 images cleanly: exit status 1 and exactly
# one stderr line naming the defect (a keyword per case), within a time
# limit; never a crash, a hang or a sanitizer report. Cases are built by
# make-malformed.py from valid qemu-img images; see its docstring for the
# scopes ("open" defects must fail `info`, `convert` and `serve -r`, "data"
# defects must fail `convert` and a read through `serve` while the server
# lives on, and "valid" controls must succeed).
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

  # A defect found at open must also stop `qnbd serve` before it listens.
  serve=-
  if [[ $scope == open ]]; then
    rm -f "$TMPDIR_TEST/serve.sock"
    run_checked 15 "$QNBD" serve -r -k "$TMPDIR_TEST/serve.sock" "${args[@]}" "$path"
    serve=$(verdict fail "$keywords")
  fi

  # A defect inside the cluster mapping is met per request: served, a read
  # of the damaged range must fail (an NBD error reply), and the server must
  # survive it and stop cleanly.
  if [[ $scope == data ]] && command -v nbdcopy >/dev/null && command -v nbdinfo >/dev/null; then
    sock=$TMPDIR_TEST/serve.sock
    rm -f "$sock" "$TMPDIR_TEST/serve.pid"
    if ! start_server "$TMPDIR_TEST/serve.pid" timeout --foreground 60 "$QNBD" serve -r -t -e 4 -k "$sock" \
        --pid-file "$TMPDIR_TEST/serve.pid" "${args[@]}" "$path"; then
      serve="did not start"
    elif timeout 30 nbdcopy "nbd+unix:///?socket=$sock" "$out" 2>/dev/null; then
      serve="read accepted"
    elif ! timeout 30 nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1; then
      serve="died on read"
    elif ! stop_server "$SERVER_PID" 2>/dev/null; then
      serve="bad exit"
    else
      serve="ok (EIO)"
    fi
    if grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$TMPDIR_TEST/server.log" 2>/dev/null; then
      serve="sanitizer"
      : >"$TMPDIR_TEST/server.log"
    fi
    rm -f "$out"
  fi

  if [[ $info != ok* || $convert != ok* || ($serve != ok* && $serve != -) ]]; then
    failed=$((failed + 1))
    [[ $info != ok* ]] && problems+=("$name: info: $info")
    [[ $convert != ok* ]] && problems+=("$name: convert: $convert")
    [[ $serve != ok* && $serve != - ]] && problems+=("$name: serve: $serve")
    result=FAIL
  else
    result=pass
  fi
  rows+=("$(printf '%-36s %-5s %-4s info: %-16.16s convert: %-16.16s serve: %.16s' \
    "$name" "$scope" "$result" "$info" "$convert" "$serve")")
done <"$images/manifest.tsv"

printf '%s\n' "${rows[@]}"
echo
echo "malformed-image cases: $((total - failed)) passed, $failed failed (of $total)"
if ((failed > 0)); then
  printf 'FAIL %s\n' "${problems[@]}"
  exit 1
fi
