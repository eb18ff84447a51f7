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

# ---- Side by side with qemu-nbd: one tool at a time on $TMPDIR_TEST/s.sock
# (nbd+unix:///?socket=$TMPDIR_TEST/s.sock) ----

# start_tool TOOL ARGS...: TOOL (qemu-nbd or qnbd) serving ARGS, --persistent;
# sets SERVER_PID (stop it with stop_server "$SERVER_PID").
start_tool() {
  local tool=$1 d=$TMPDIR_TEST
  shift
  if [[ $tool == qemu-nbd ]]; then
    start_server "$d/s.pid" qemu-nbd -t -k "$d/s.sock" --pid-file "$d/s.pid" "$@" || fail "qemu-nbd $* did not start"
  else
    start_server "$d/s.pid" "$QNBD" serve -t -k "$d/s.sock" --pid-file "$d/s.pid" "$@" || fail "qnbd $* did not start"
  fi
}

# pwrite_at URI OFFSET LENGTH BYTE: write LENGTH bytes of BYTE and flush;
# prints "ok" or the errno name the server answered.
pwrite_at() {
  "$PY" - "$@" <<'EOF'
import nbd, sys
uri, off, n, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4], 0)
h = nbd.NBD()
h.connect_uri(uri)
try:
    h.pwrite(bytes([b]) * n, off)
    h.flush()
    print("ok")
except nbd.Error as e:
    print(e.errno)
h.shutdown()
EOF
}

# qnbd_refuses PHRASE ARGS...: `qnbd serve ARGS` refuses to start, with one
# line of error that holds PHRASE.
qnbd_refuses() {
  local phrase=$1 err=$TMPDIR_TEST/x.err
  shift
  if timeout 10 "$QNBD" serve -k "$TMPDIR_TEST/x.sock" "$@" 2>"$err" >/dev/null; then fail "qnbd serve $*: served"; fi
  expect_eq "$(wc -l <"$err")" 1 "qnbd serve $*: lines of error"
  grep -qF -- "$phrase" "$err" || { cat "$err" >&2; fail "qnbd serve $*: no '$phrase'"; }
  echo "refused: $*"
}

# refused_by_both PHRASE ARGS...: qemu-nbd refuses ARGS too (it does not get as far
# as writing its pid file), then qnbd_refuses.
refused_by_both() {
  local phrase=$1 st=0 d=$TMPDIR_TEST
  shift
  rm -f "$d/x.pid"
  qemu-nbd -k "$d/x.sock" --pid-file "$d/x.pid" "$@" >/dev/null 2>&1 &
  local pid=$!
  wait_ready -s "$d/x.pid" "$pid" || st=$?
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$d/x.sock"
  ((st != 0)) || fail "qemu-nbd serves $* (the test expects a refusal)"
  qnbd_refuses "$phrase" "$@"
}
