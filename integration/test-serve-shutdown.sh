#!/usr/bin/env bash
# Shutdown (SIGTERM) always stores the bitmaps and always ends (issue 8 item 3).
#  1. A client that stops reading its replies (one WRITE, then 64 pipelined
#     32 MiB READs it never reads) with an enabled bitmap: the server exits 0
#     within a few seconds and the bitmap is stored clean (qemu-img info: no
#     in-use; qemu-nbd -B exports it with the write dirty). (Before: exit 1
#     after 30 s, bitmap left in_use.)
#  2. The same, with a second SIGTERM during the shutdown: immediate exit 1
#     (bitmap left in_use, by design).
#  3. One extended-header WRITE_ZEROES, then TRIM with --discard=unmap, of a
#     whole 1 PiB sparse qcow2: SIGTERM while it runs ends the server within
#     seconds, status 0, and the reply is success or NBD_ESHUTDOWN. Left
#     alone, each request completes within the time bound (whole empty L2
#     spans are skipped). (Before: hours; SIGTERM hung in the pool's join.)
#     The same over a 1 MiB backing file.
#  4. SIGHUP stops qnbd as SIGTERM does (qemu-nbd too): an unflushed WRITE
#     is in the image and the bitmap is stored.
#  5. The same after SIGTERM with stderr on a pipe that has no reader
#     (SIGPIPE ignored, as qemu-nbd).
#  6. SIGUSR1, SIGALRM and SIGIO leave the server serving (qemu-nbd too);
#     a SIGTERM then stops it as in case 4.
set -euo pipefail
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-nbd qemu-io nbdinfo python3 timeout
requires_python_nbd
here=$(cd "$(dirname "$0")" && pwd)
cd "$TMPDIR_TEST"

# nonreader SOCKET READY_FILE: handshake, WRITE 4 KiB at 0, 64 READs of
# 32 MiB (DF: dense data, so replies fill the socket), then never read.
nonreader() {
  python3 - "$1" "$2" "$here" <<'PY' &
import struct, sys, time
sys.path.insert(0, sys.argv[3])
import nbdwire
s, ids, flags, size = nbdwire.connect(sys.argv[1], False, [])
nbdwire.send(s, False, 1, 0, 4096, cookie=1, payload=b"\x11" * 4096)
for i in range(64):
    nbdwire.send(s, False, 0, (i % 8) * (32 << 20), 32 << 20, flags=4, cookie=100 + i)
open(sys.argv[2], "w").write("sent\n")
time.sleep(600)
PY
  NONREADER_PID=$!
  cleanup_fn "kill $NONREADER_PID 2>/dev/null"
  local i
  for ((i = 0; i < 200; i++)); do [[ -s $2 ]] && return; sleep 0.05; done
  fail "the non-reading client did not get its requests out"
}

wait_in_use() {  # IMAGE: until the enabled bitmap reads in-use (first write done)
  local i
  for ((i = 0; i < 100; i++)); do
    qemu-img info -U --output=json "$1" | grep -q '"in-use"' && return
    sleep 0.1
  done
  fail "$1: bitmap never marked in-use (the WRITE was not processed)"
}

# stop_within SECONDS PID: SIGTERM, wait at most SECONDS; status in $st.
stop_within() {
  local limit=$1 pid=$2 i
  kill -TERM "$pid"
  for ((i = 0; i < limit * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    fail "server $pid still running ${limit} s after SIGTERM"
  fi
  st=0
  wait "$pid" || st=$?
}

bitmap_flags() { qemu-img info --output=json "$1" | python3 -c 'import json,sys; print(",".join(json.load(sys.stdin)["format-specific"]["data"]["bitmaps"][0]["flags"]))'; }

mkimg() {
  qemu-img create -q -f qcow2 "$1" 1G
  qemu-img bitmap --add "$1" b0
}

# ---- 1. the client that stops reading ---------------------------------------
mkimg a.qcow2
start_serve -f qcow2 a.qcow2
nonreader "$SERVE_SOCK" a.ready
wait_in_use a.qcow2
t0=$(date +%s%N)
stop_within 15 "$SERVE_PID"
ms=$((($(date +%s%N) - t0) / 1000000))
SERVE_PID=
kill "$NONREADER_PID" 2>/dev/null || true
echo "qnbd: status $st ${ms} ms after SIGTERM, bitmap flags $(bitmap_flags a.qcow2)"
[[ $st == 0 ]] || { cat "$SERVE_LOG" >&2; fail "qnbd exited $st after SIGTERM with a non-reading client"; }
((ms < 10000)) || fail "qnbd took $ms ms to stop"
expect_eq "$(bitmap_flags a.qcow2)" "auto" "bitmap flags after SIGTERM"
# qemu-nbd accepts the stored bitmap, and it holds the write.
qemu-nbd -r -f qcow2 -B b0 -k "$TMPDIR_TEST/q2.sock" --pid-file q2.pid a.qcow2 2>q2.log &
q2=$!
cleanup_fn "kill -9 $q2 2>/dev/null"
for ((i = 0; i < 100; i++)); do [[ -s q2.pid ]] && break; sleep 0.1; done
map=$(nbdinfo --map=qemu:dirty-bitmap:b0 "nbd+unix:///?socket=$TMPDIR_TEST/q2.sock" | awk '$3 == 1 {print $1 "+" $2}')
kill "$q2" 2>/dev/null || true; wait "$q2" || true
expect_eq "$map" "0+65536" "dirty extents of the stored bitmap (qemu-nbd -B)"

# ---- 2. a second SIGTERM during the shutdown --------------------------------
mkimg c.qcow2
start_serve -f qcow2 c.qcow2
nonreader "$SERVE_SOCK" c.ready
wait_in_use c.qcow2
kill -TERM "$SERVE_PID"
sleep 0.3
stop_within 5 "$SERVE_PID"
SERVE_PID=
kill "$NONREADER_PID" 2>/dev/null || true
expect_eq "$st" 1 "exit status after a second SIGTERM"
grep -q "second signal" "$SERVE_LOG" || fail "no 'second signal' line in the log"

# ---- 3. one request over a whole 1 PiB sparse image -------------------------
# longreq SOCKET TYPE [READY_FILE]: send one extended-header request (6
# WRITE_ZEROES, 4 TRIM) for the whole export; print the reply's error (0 =
# success).
longreq() {
  python3 - "$1" "$2" "$here" "${3:-}" <<'PY'
import struct, sys
sys.path.insert(0, sys.argv[3])
import nbdwire
s, ids, flags, size = nbdwire.connect(sys.argv[1], True, [])
nbdwire.send(s, True, int(sys.argv[2]), 0, size, cookie=9)
if sys.argv[4]:
    open(sys.argv[4], "w").write("sent\n")
try:
    ch = nbdwire.chunks(s, True, cookie=9)
    typ, data = ch[-1]
    print(struct.unpack(">I", data[:4])[0] if typ & 0x8000 else 0)
except EOFError:
    print("closed")
PY
}
# The -backed images have a 1 MiB backing file: the spans past its end are
# skipped too (a request QEMU 7.2 could never receive).
truncate -s 1M backing.raw
for req in "6 write-zeroes" "4 trim" "6 write-zeroes-backed" "4 trim-backed"; do
  set -- $req
  code=$1 name=$2
  backing=()
  [[ $name == *-backed ]] && backing=(-b backing.raw -F raw)
  qemu-img create -q -f qcow2 "${backing[@]}" "p-$name.qcow2" 1P
  # Left alone: completes, and the image stays small.
  start_serve -f qcow2 --discard=unmap "p-$name.qcow2"
  t0=$(date +%s%N)
  got=$(timeout 60 bash -c "$(declare -f longreq); here=$here longreq $SERVE_SOCK $code") || got=timeout
  ms=$((($(date +%s%N) - t0) / 1000000))
  echo "1 PiB $name: reply $got in $ms ms"
  expect_eq "$got" 0 "1 PiB $name reply"
  # Cut short: SIGTERM while it runs.
  (longreq "$SERVE_SOCK" "$code" "$name.sent" >"$name.reply" 2>&1) &
  client=$!
  for ((i = 0; i < 200; i++)); do [[ -s $name.sent ]] && break; sleep 0.05; done
  [[ -s $name.sent ]] || fail "1 PiB $name: the request was not sent"
  sleep 0.2
  t0=$(date +%s%N)
  stop_within 10 "$SERVE_PID"
  ms=$((($(date +%s%N) - t0) / 1000000))
  SERVE_PID=
  wait "$client" || true
  echo "1 PiB $name + SIGTERM: status $st after $ms ms, reply $(cat "$name.reply")"
  # 108: NBD_ESHUTDOWN, the request was stopped at a step boundary.
  expect_eq "$st" 0 "exit status after SIGTERM during a 1 PiB $name"
  case $(cat "$name.reply") in 0 | 108) ;; *) fail "1 PiB $name: reply $(cat "$name.reply")" ;; esac
  qemu-img check -q "p-$name.qcow2" || fail "p-$name.qcow2 does not pass qemu-img check"
  size=$(stat -c %s "p-$name.qcow2")
  ((size < 64 << 20)) || fail "p-$name.qcow2 grew to $size bytes"
done

# ---- 4. SIGHUP: the terminal or ssh session went away -----------------------
# A stop like SIGTERM's, as qemu-nbd's: a WRITE the client never flushed
# (its L2 entry only in the server's cache) is in the image afterwards, and
# the bitmap is stored with it. (Before: death by SIGHUP, the write lost
# and b0 left in_use.)
hup_write() {  # URI: 4 KiB of 0x22 at 1 MiB, no FLUSH
  "$PY" - "$1" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x22" * 4096, 1 << 20)
h.shutdown()
PY
}
# clean_stop WHAT STATUS IMAGE: the server ended with status 0, the bitmap
# is stored (flags "auto", no in-use), hup_write's write is in the image
# and it passes qemu-img check.
clean_stop() {
  local what=$1 st=$2 img=$3 out
  echo "$what: status $st, bitmap flags $(bitmap_flags "$img")"
  expect_eq "$st" 0 "$what: exit status"
  expect_eq "$(bitmap_flags "$img")" "auto" "$what: bitmap flags"
  # (qemu-io prints "read 4096/4096" even after a pattern mismatch.)
  out=$(qemu-io -r -f qcow2 -c "read -P 0x22 1M 4k" "$img")
  [[ $out == *"read 4096/4096"* && $out != *"verification failed"* ]] ||
    fail "$what: the unflushed write is not in the image: $out"
  qemu-img check -q "$img" || fail "$what: $img does not pass qemu-img check"
}
for tool in qemu-nbd qnbd; do
  mkimg "h-$tool.qcow2"
  start_tool "$tool" -f qcow2 "h-$tool.qcow2"
  hup_write "nbd+unix:///?socket=$TMPDIR_TEST/s.sock"
  kill -HUP "$SERVER_PID"
  st=0
  wait "$SERVER_PID" || st=$?
  unset "_live_servers[$SERVER_PID]"
  clean_stop "$tool after SIGHUP" "$st" "h-$tool.qcow2"
done

# ---- 5. stderr is a pipe whose reader went away -----------------------------
# (`2>&1 | logger`, a log collector restarted.) The shutdown's log line
# must not kill the server with SIGPIPE: as case 4, exit 0 with the
# unflushed write in the image and the bitmap stored, as qemu-nbd. (Before:
# death by SIGPIPE at "shutting down", the write lost, b0 in_use.)
for tool in qemu-nbd qnbd; do
  mkimg "p-$tool.qcow2"
  rm -f errpipe p.pid
  mkfifo errpipe
  # The reader opens the pipe (so the server's open of it returns) and
  # leaves at once; from then on the pipe has no reader.
  (exec 3<errpipe) &
  reader=$!
  if [[ $tool == qemu-nbd ]]; then
    qemu-nbd -v -t -f qcow2 -k "$TMPDIR_TEST/p.sock" --pid-file p.pid "p-$tool.qcow2" 2>errpipe &
  else
    "$QNBD" serve -v -t -f qcow2 -k "$TMPDIR_TEST/p.sock" --pid-file p.pid "p-$tool.qcow2" 2>errpipe &
  fi
  pid=$!
  cleanup_fn "kill -9 $pid 2>/dev/null"
  wait "$reader" || true
  wait_ready -s p.pid "$pid" || fail "$tool did not start with stderr on a pipe"
  hup_write "nbd+unix:///?socket=$TMPDIR_TEST/p.sock"
  kill -TERM "$pid"
  st=0
  wait "$pid" || st=$?
  clean_stop "$tool after SIGTERM, stderr without a reader" "$st" "p-$tool.qcow2"
done

# ---- 6. signals qemu-nbd survives -------------------------------------------
# SIGUSR1, SIGALRM and SIGIO (QEMU's main loop blocks or swallows them):
# after each, the server still answers, and a SIGTERM then stops it
# cleanly with the write in the image and the bitmap stored. (Before: qnbd
# died of each, the write lost and b0 left in_use.)
for tool in qemu-nbd qnbd; do
  mkimg "s-$tool.qcow2"
  start_tool "$tool" -f qcow2 "s-$tool.qcow2"
  hup_write "nbd+unix:///?socket=$TMPDIR_TEST/s.sock"
  for sig in USR1 ALRM IO; do
    kill -"$sig" "$SERVER_PID"
    sleep 0.2
    nbdinfo --size "nbd+unix:///?socket=$TMPDIR_TEST/s.sock" >/dev/null ||
      fail "$tool does not answer after SIG$sig"
  done
  kill -TERM "$SERVER_PID"
  st=0
  wait "$SERVER_PID" || st=$?
  unset "_live_servers[$SERVER_PID]"
  clean_stop "$tool after SIGUSR1, SIGALRM, SIGIO and SIGTERM" "$st" "s-$tool.qcow2"
done
echo "PASS"
