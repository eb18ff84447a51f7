#!/usr/bin/env bash
# Image locks QEMU honours, part 1: qnbd takes QEMU's file-posix OFD lock
# bytes (same bytes as qemu-nbd, read from /proc/locks) on the image, its
# backing files and its external data file, and QEMU's tools are refused
# or let in by them exactly as by qemu-nbd. Part 2 (qemu holds, qnbd asks)
# is test-lock-qemu.sh.
source "$(dirname "$0")/functions.sh"
source "$(dirname "$0")/lib-lock.sh"
requires qemu-img qemu-io qemu-nbd
requires_qnbd
lock_test_setup
qemu-img create -q -f raw r.raw 8M
qemu-img create -q -f qcow2 -b r.raw -F raw rtop.qcow2
qemu-img create -q -f qcow2 -o data_file=data.raw dtop.qcow2 8M

# --- 1. The layout: for each image, format and mode, the bytes locked on
# every file while qemu-nbd serves it equal those while qnbd serves it.
snapshot() {
  local f out=""
  for f in "$@"; do out+="$f=[$(locks_of "$f")] "; done
  echo "$out"
}
n=0
compare_layout() {  # "qemu-nbd/qnbd serve args" -- files
  local args=() files=()
  while [[ $1 != -- ]]; do args+=("$1"); shift; done
  shift
  files=("$@")
  n=$((n + 1))
  start_server "q$n.pid" qemu-nbd -t -k "$TMPDIR_TEST/q$n.sock" --pid-file "q$n.pid" "${args[@]}" ||
    fail "qemu-nbd ${args[*]}"
  local theirs
  theirs=$(snapshot "${files[@]}")
  stop_server "$SERVER_PID"
  [[ $theirs == *1* ]] || fail "qemu-nbd ${args[*]} locked nothing? $theirs"
  start_server "s$n.pid" "$QNBD" serve -t -k "$TMPDIR_TEST/s$n.sock" --pid-file "s$n.pid" "${args[@]}" ||
    fail "qnbd serve ${args[*]}"
  local ours
  ours=$(snapshot "${files[@]}")
  stop_server "$SERVER_PID"
  expect_eq "$ours" "$theirs" "locks of qnbd serve ${args[*]} (qemu-nbd's)"
  echo "layout ${args[*]}: $ours"
}
compare_layout top.qcow2 -- top.qcow2 base.qcow2
compare_layout -r top.qcow2 -- top.qcow2 base.qcow2
compare_layout -f raw r.raw -- r.raw
compare_layout -r -f raw r.raw -- r.raw
compare_layout rtop.qcow2 -- rtop.qcow2 r.raw
compare_layout dtop.qcow2 -- dtop.qcow2 data.raw
compare_layout -r dtop.qcow2 -- dtop.qcow2 data.raw
compare_layout --cache=none top.qcow2 -- top.qcow2 base.qcow2

# --- 2. qnbd serves top.qcow2 writable: every other writer is refused,
# as qemu-nbd refuses them.
start_server w.pid "$QNBD" serve -t -k "$TMPDIR_TEST/w.sock" --pid-file w.pid top.qcow2 || fail "qnbd serve"
W=$SERVER_PID
expect_refused '"write"' top.qcow2 qemu-io -c 'write -P 0x22 0 4k' top.qcow2
expect_refused '"write"' top.qcow2 qemu-img check -r all top.qcow2
expect_refused '"write"' top.qcow2 qemu-img bitmap --add top.qcow2 b1
expect_refused '"write"' top.qcow2 qemu-nbd -k "$TMPDIR_TEST/x.sock" top.qcow2
expect_refused '"write"' top.qcow2 "$QNBD" serve -k "$TMPDIR_TEST/x.sock" top.qcow2
[[ $(wc -l <"$RUN_STDERR") == 1 ]] || fail "qnbd's refusal is not one line: $(cat "$RUN_STDERR")"
# Readers that refuse to share write (qemu-img info, map, qemu-nbd -r) are
# refused too, as a writable qemu-nbd refuses them; -U lets them in.
expect_refused 'shared "write"' top.qcow2 qemu-img info top.qcow2
expect_refused 'shared "write"' top.qcow2 qemu-nbd -r -k "$TMPDIR_TEST/x.sock" top.qcow2
expect_allowed qemu-img info -U top.qcow2
expect_allowed qemu-io -r -U -c 'read -P 0x11 0 4k' top.qcow2
# The backing file is shared read-only: readers welcome, writers not.
expect_allowed qemu-io -r -c 'read -P 0x11 0 4k' base.qcow2
expect_refused '"write"' base.qcow2 qemu-io -c 'write 0 4k' base.qcow2
stop_server "$W"
# The locks went with the server.
expect_eq "$(locks_of top.qcow2)" "" "locks after qnbd stopped"
expect_allowed qemu-io -c 'write -P 0x22 0 4k' top.qcow2

# --- 3. A read-only qnbd export lets readers in and keeps writers out.
start_server r.pid "$QNBD" serve -t -r -k "$TMPDIR_TEST/r.sock" --pid-file r.pid top.qcow2 || fail "qnbd serve -r"
R=$SERVER_PID
expect_allowed qemu-img info top.qcow2
expect_allowed qemu-img map top.qcow2
expect_server_allowed q2.pid qemu-nbd -t -r -k "$TMPDIR_TEST/q2.sock" --pid-file q2.pid top.qcow2
expect_server_allowed s2.pid "$QNBD" serve -t -r -k "$TMPDIR_TEST/s2.sock" --pid-file s2.pid top.qcow2
expect_refused '"write"' top.qcow2 qemu-io -c 'write 0 4k' top.qcow2
expect_refused '"write"' top.qcow2 "$QNBD" serve -k "$TMPDIR_TEST/x.sock" top.qcow2
stop_server "$R"

# --- 4. The external data file is locked too: nobody may resize it under
# a writable qnbd export.
start_server d.pid "$QNBD" serve -t -k "$TMPDIR_TEST/d.sock" --pid-file d.pid dtop.qcow2 || fail "qnbd serve dtop"
D=$SERVER_PID
expect_refused '"resize"' data.raw qemu-img resize -f raw data.raw 16M
expect_refused '"write"' dtop.qcow2 qemu-io -c 'write 0 4k' dtop.qcow2
stop_server "$D"
expect_allowed qemu-img resize -f raw data.raw 16M

echo "PASS: test-lock"
