#!/usr/bin/env bash
# A full descriptor table (RLIMIT_NOFILE reached, by many clients or a low
# limit) must cost connections, not the server: accept fails with EMFILE,
# the server waits and tries again, and once descriptors are free it
# serves again; SIGTERM still ends it with status 0. A limit too low to
# start at all is a one-line error with status 1. (The old build made an
# io context's reactor at its first connection: with no descriptor left
# that threw out of the event loop and the process aborted.)
#
# For limits from too low to start up to a few descriptors more than
# listening needs: hold 12 raw connections open on the socket (more than
# the table leaves room for) and 2 on the control socket, release them,
# then nbdinfo must get the export, `qnbd ctl status` must answer, and
# SIGTERM must end the server with status 0. The control socket's accept
# must back off as the NBD one does (the old build retried at once,
# spinning and logging a warning each time: thousands a second).
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img nbdinfo prlimit timeout python3
requires_qnbd

if is_sanitizer_build; then
  # The sanitizer runtime needs descriptors of its own (it reads
  # /proc/self/maps for its checks) and reports false errors once the
  # table is full; the Release run covers this test.
  echo "SKIP: $0: a sanitizer build cannot run with a full descriptor table"
  exit 77
fi

T=$TMPDIR_TEST
qemu-img create -q -f qcow2 "$T/d.qcow2" 16M

# hold SOCKET N SECONDS: N connections to SOCKET held open for SECONDS.
hold() {
  python3 - "$@" <<'PY'
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socks.append(s)
time.sleep(float(sys.argv[3]))
PY
}

started=0
for limit in $(seq 8 40); do
  rm -f "$T/s.sock" "$T/s.pid"
  : >"$T/s.log"
  prlimit --nofile="$limit:$limit" "$QNBD" serve -t -e 0 -r --threads 2 -f qcow2 -k "$T/s.sock" \
    --control "$T/c.sock" --pid-file "$T/s.pid" "$T/d.qcow2" 2>"$T/s.log" &
  pid=$!
  cleanup_fn "kill -9 $pid 2>/dev/null"
  st=0
  wait_ready -s "$T/s.pid" "$pid" || st=$?
  if ((st != 0)); then
    # Did not start: it must have ended with one line and status 1.
    st=0
    wait "$pid" || st=$?
    expect_eq "$st" 1 "limit $limit: exit status of a server that cannot start"
    expect_eq "$(wc -l <"$T/s.log")" 1 "limit $limit: lines of stderr"
    grep -q "Too many open files" "$T/s.log" || fail "limit $limit: $(cat "$T/s.log")"
    ((started == 0)) || fail "limit $limit: refused to start, though a lower limit started"
    continue
  fi
  started=$((started + 1))
  hold "$T/s.sock" 12 1.5 &
  holder=$!
  sleep 0.3
  hold "$T/c.sock" 2 1.2 || fail "limit $limit: could not hold the control connections"
  wait "$holder" || fail "limit $limit: could not hold the connections"
  kill -0 "$pid" 2>/dev/null || fail "limit $limit: the server died: $(tail -n 3 "$T/s.log")"
  warnings=$(grep -c "control: accept" "$T/s.log" || true)
  ((warnings < 100)) || fail "limit $limit: $warnings control accept warnings in about a second (a spin)"
  size=$(timeout 20 nbdinfo --size "nbd+unix:///?socket=$T/s.sock") ||
    fail "limit $limit: no export once the descriptors were free: $(tail -n 3 "$T/s.log")"
  expect_eq "$size" 16777216 "limit $limit: export size"
  timeout 20 "$QNBD" ctl -s "$T/c.sock" status >/dev/null ||
    fail "limit $limit: the control socket does not answer once descriptors are free"
  kill -TERM "$pid"
  st=0
  wait "$pid" || st=$?
  expect_eq "$st" 0 "limit $limit: exit status after SIGTERM"
  echo "limit $limit: served after a full table ($(grep -c 'Too many open files' "$T/s.log") EMFILE warnings, $warnings on the control socket)"
  ((started < 4)) || break
done
((started > 0)) || fail "the server never started under limits up to 40"
echo PASS
