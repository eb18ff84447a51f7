# shellcheck shell=bash
# shellcheck disable=SC2034 # variables here are used by the sourcing scripts
# Helpers shared by every integration/test-*.sh script. Source it first:
#   source "$(dirname "$0")/functions.sh"
#
# Provides: requires TOOL..., requires_qnbd, cleanup_fn CMD..., $TMPDIR_TEST
# (a private temp dir removed on exit), fail MSG, expect_eq ACTUAL EXPECTED
# [WHAT], run_checked TIMEOUT CMD... (runs a command, classifies crashes), and
# the exit status convention: 0 pass, 1 fail, 77 skip (ctest SKIP_RETURN_CODE).

set -euo pipefail

# ctest passes these; fall back to the default build tree for manual runs.
QNBD_SOURCE_DIR=${QNBD_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
QNBD_BUILD_DIR=${QNBD_BUILD_DIR:-$QNBD_SOURCE_DIR/build}
QNBD=${QNBD:-$QNBD_BUILD_DIR/qnbd}
INTEGRATION_DIR=$QNBD_SOURCE_DIR/integration
export QNBD QNBD_SOURCE_DIR QNBD_BUILD_DIR

# Sanitizer reports must not be mistaken for an ordinary "exit 1" error
# path: give them their own exit status (and the text is checked too).
SANITIZER_EXIT=99
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=$SANITIZER_EXIT:abort_on_error=0
export UBSAN_OPTIONS=${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}exitcode=$SANITIZER_EXIT:print_stacktrace=1
export TSAN_OPTIONS=${TSAN_OPTIONS:+$TSAN_OPTIONS:}exitcode=$SANITIZER_EXIT

# Cleanup actions run in reverse order of registration when the script exits,
# however it exits.
_cleanup_fns=()
cleanup_fn() {
  _cleanup_fns+=("$*")
}
_run_cleanups() {
  local status=$?
  local i
  for ((i = ${#_cleanup_fns[@]} - 1; i >= 0; i--)); do
    eval "${_cleanup_fns[i]}" || true
  done
  exit "$status"
}
trap _run_cleanups EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A private scratch directory, removed at exit unless KEEP_TMP=1 (debugging).
TMPDIR_TEST=$(mktemp -d "${TMPDIR:-/tmp}/qnbd-$(basename "$0" .sh).XXXXXX")
if [[ ${KEEP_TMP:-0} == 1 ]]; then
  echo "keeping $TMPDIR_TEST"
else
  cleanup_fn rm -rf "$TMPDIR_TEST"
fi

# Skip the test (exit 77) unless every named tool is on PATH.
requires() {
  local tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "SKIP: $0: required tool '$tool' not found"
      exit 77
    fi
  done
}

# Skip unless a python3 module imports.
requires_python_module() {
  requires python3
  if ! python3 -c "import $1" >/dev/null 2>&1; then
    echo "SKIP: $0: python3 module '$1' not found"
    exit 77
  fi
}

requires_qnbd() {
  if [[ ! -x $QNBD ]]; then
    echo "SKIP: $0: qnbd binary '$QNBD' not built"
    exit 77
  fi
}

# requires_python_nbd: set PY to a python3 that imports libnbd's binding
# (it lives in the system python; a pyenv python3 first on PATH may not see
# it), or skip.
requires_python_nbd() {
  PY=
  local cand
  for cand in python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import nbd' 2>/dev/null; then PY=$cand; return; fi
  done
  echo "SKIP: $0: python3 module 'nbd' not found"
  exit 77
}

fail() {
  echo "FAIL: $0: $*" >&2
  exit 1
}

expect_eq() {
  local actual=$1 expected=$2 what=${3:-value}
  if [[ $actual != "$expected" ]]; then
    fail "$what: expected '$expected', got '$actual'"
  fi
}

# run_checked TIMEOUT CMD...: run CMD with a time limit, stdout to
# $RUN_STDOUT, stderr to $RUN_STDERR, exit status in $RUN_STATUS, and a verdict
# in $RUN_KIND: "ok" (exit 0), "error" (a clean non-zero exit), "timeout",
# "crash" (killed by a signal) or "sanitizer" (ASan/UBSan/LSan report).
# Never fails itself, so callers can tabulate results.
RUN_STDOUT=$TMPDIR_TEST/run.stdout
RUN_STDERR=$TMPDIR_TEST/run.stderr
run_checked() {
  local limit=$1
  shift
  set +e
  timeout --kill-after=5 "$limit" "$@" >"$RUN_STDOUT" 2>"$RUN_STDERR"
  RUN_STATUS=$?
  set -e
  if grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|WARNING: ThreadSanitizer|runtime error:|SUMMARY: .*Sanitizer' "$RUN_STDERR"; then
    RUN_KIND=sanitizer
  elif ((RUN_STATUS == 124 || RUN_STATUS == 137)); then
    RUN_KIND=timeout
  elif ((RUN_STATUS == SANITIZER_EXIT)); then
    RUN_KIND=sanitizer
  elif ((RUN_STATUS >= 128)); then
    RUN_KIND=crash
  elif ((RUN_STATUS == 0)); then
    RUN_KIND=ok
  else
    RUN_KIND=error
  fi
}

# Servers still running at exit are stopped by PID; stop_server forgets a
# reaped PID so a recycled one is never signalled.
declare -A _live_servers=()
_stop_live_servers() {
  local pid
  for pid in "${!_live_servers[@]}"; do
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
}
cleanup_fn _stop_live_servers

# wait_ready TEST PATH [PID]: the one readiness poll of the test scripts.
# Wait (50 ms steps, at most 10 s) until `test TEST PATH` holds: -s for a
# pid file (written once the socket listens), -S for a Unix socket, -e for
# any file. Returns 0 when ready, 2 as soon as PID (if given) has exited,
# 1 on timeout; the caller decides what a failure means.
wait_ready() {
  local op=$1 path=$2 pid=${3:-} i
  for ((i = 0; i < 200; i++)); do
    test "$op" "$path" && return 0
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      test "$op" "$path" && return 0
      return 2
    fi
    sleep 0.05
  done
  return 1
}

# start_server PIDFILE CMD...: start a server in the background that writes
# PIDFILE once it is listening (qnbd serve --pid-file, qemu-nbd --pid-file),
# wait for that file (the process dying first is a failure), and register a
# cleanup that stops it by its own PID. Sets SERVER_PID.
# A server wrapped in timeout(1) needs `timeout --foreground`: otherwise
# timeout follows the SIGTERM it passes on with a SIGCONT, and a SIGCONT
# that lands while LeakSanitizer stops the exiting server's threads
# discards the SIGSTOP its tracer waits for, which hangs the exit for ever
# (seen once in CI: the tracer in waitpid, the server spinning in
# sched_yield).
start_server() {
  local pidfile=$1
  shift
  rm -f "$pidfile"
  "$@" >>"$TMPDIR_TEST/server.log" 2>&1 &
  local pid=$!
  _live_servers[$pid]=1
  # The pid file appears once the socket is bound.
  local st=0
  wait_ready -s "$pidfile" "$pid" || st=$?
  if ((st == 0)); then
    SERVER_PID=$pid
    return 0
  fi
  if ((st == 2)); then
    wait "$pid" 2>/dev/null
    echo "server exited with status $? before listening: $*" >&2
    tail -n 5 "$TMPDIR_TEST/server.log" >&2
    return 1
  fi
  echo "server did not write $pidfile within 10 s: $*" >&2
  return 1
}

# stop_server PID: stop a server started by start_server and reap it. A
# server killed by anything but our SIGTERM (a crash, a sanitizer abort)
# makes the status non-zero.
stop_server() {
  local pid=$1 status=0
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || status=$?
  unset "_live_servers[$pid]"
  # 143 = terminated by our SIGTERM, the normal outcome for qemu-nbd.
  if ((status != 0 && status != 143)); then
    echo "server $pid exited with status $status" >&2
    return 1
  fi
}

# is_sanitizer_build: true if $QNBD carries ASan, UBSan or TSan (g++ links
# their runtimes dynamically).
is_sanitizer_build() {
  ldd "$QNBD" 2>/dev/null | grep -qE 'lib(a|ub|t)san'
}

# requires_strace: skip unless strace is installed and may trace here.
requires_strace() {
  requires strace
  if ! strace -f -qq -o /dev/null true 2>/dev/null; then
    echo "SKIP: $0: strace cannot trace here (ptrace not permitted)"
    exit 77
  fi
}

# start_traced_server PIDFILE TRACE SYSCALLS CMD...: start_server with CMD
# (which writes PIDFILE) under `strace -f -e trace=SYSCALLS -o TRACE`. Sets
# SERVER_PID (strace's) and TRACED_PID (the server's, from PIDFILE).
# LeakSanitizer cannot run under ptrace (it exits with an error in an ASan
# build), so leak checking is off for the traced server only.
start_traced_server() {
  local pidfile=$1 trace=$2 calls=$3
  shift 3
  start_server "$pidfile" strace -f -qq --seccomp-bpf -e trace="$calls" -o "$trace" \
    env ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" "$@" || return 1
  TRACED_PID=$(cat "$pidfile")
}

# end_traced_server: after the client of a server started by
# start_traced_server (without -t) has gone, wait for the server to exit
# (strace exits with it and flushes TRACE), stopping it by its own PID
# only if it hangs there; fails if strace or the server failed.
end_traced_server() {
  local i
  for ((i = 0; i < 200; i++)); do
    kill -0 "$TRACED_PID" 2>/dev/null || break
    sleep 0.05
  done
  kill -TERM "$TRACED_PID" 2>/dev/null || true
  wait "$SERVER_PID" || fail "qnbd serve (under strace) exited with status $?"
  unset "_live_servers[$SERVER_PID]"
}
