# Start/stop helpers for tests that run `qnbd serve`. Source after nothing
# else (it sources functions.sh):
#   source "$(dirname "$0")/lib-serve.sh"
#   start_serve -f raw "$img"          # extra args go to `qnbd serve`
#   nbdinfo "$SERVE_URI"
#   stop_serve                          # SIGTERM, wait, check exit status 0
#
# The server listens on a Unix socket in $TMPDIR_TEST, is started with
# --persistent unless the caller passes NOPERSIST=1, and is killed by its own
# PID at exit if the test did not stop it. Readiness = the pid file exists
# (qnbd writes it only once the socket listens), so there are no sleeps.

source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

SERVE_PID=
SERVE_SOCK=
SERVE_URI=
SERVE_LOG=
_serve_n=0

# start_serve [qnbd serve args...]: sets SERVE_PID, SERVE_SOCK, SERVE_URI
# (nbd+unix URI of the export named by -x, default ""), SERVE_LOG.
start_serve() {
  requires_qnbd
  _serve_n=$((_serve_n + 1))
  SERVE_SOCK=$TMPDIR_TEST/serve$_serve_n.sock
  SERVE_LOG=$TMPDIR_TEST/serve$_serve_n.log
  local pidfile=$TMPDIR_TEST/serve$_serve_n.pid
  local export="" a prev=""
  for a in "$@"; do
    if [[ $prev == -x || $prev == --export-name ]]; then export=$a; fi
    prev=$a
  done
  local persist=(-t)
  [[ ${NOPERSIST:-0} == 1 ]] && persist=()
  "$QNBD" serve -k "$SERVE_SOCK" --pid-file "$pidfile" "${persist[@]}" "$@" 2>"$SERVE_LOG" &
  SERVE_PID=$!
  cleanup_fn "kill -9 $SERVE_PID 2>/dev/null"
  local st=0
  wait_ready -s "$pidfile" "$SERVE_PID" || st=$?
  if ((st == 2)); then
    cat "$SERVE_LOG" >&2
    fail "qnbd serve exited before listening"
  fi
  ((st == 0)) || fail "qnbd serve did not start within 10 s"
  SERVE_URI="nbd+unix:///$export?socket=$SERVE_SOCK"
}

# serve_alive: true if the server process still runs.
serve_alive() {
  kill -0 "$SERVE_PID" 2>/dev/null
}

# stop_serve: SIGTERM the server, wait for it, fail unless it exits 0.
stop_serve() {
  [[ -n $SERVE_PID ]] || return 0
  kill -TERM "$SERVE_PID" 2>/dev/null || true
  local status=0
  wait "$SERVE_PID" || status=$?
  SERVE_PID=
  if [[ $status != 0 ]]; then
    cat "$SERVE_LOG" >&2
    fail "qnbd serve exited with status $status after SIGTERM"
  fi
}
