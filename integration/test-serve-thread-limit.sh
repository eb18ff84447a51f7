#!/usr/bin/env bash
# A limit on threads (RLIMIT_NPROC here; a cgroup pids limit, systemd's
# TasksMax in service) must make `qnbd serve` refuse to start in one line
# with status 1, never hang or abort. (The old build hung for ever:
# asio::thread_pool's constructor, failing to make its Nth thread, joined
# the threads it had made, which never stop.)
#
# As user nobody (RLIMIT_NPROC does not bind root), for limits from 3 up:
# the server either refuses within 10 s with one line naming the thread it
# could not start, or starts, serves nbdinfo and exits 0. Some limit must
# refuse and some must serve, so both paths run.
source "$(dirname "$0")/functions.sh"
requires qemu-img nbdinfo setpriv prlimit timeout
requires_qnbd

[[ $(id -u) == 0 ]] || { echo "SKIP: $0: needs root to run the server as nobody"; exit 77; }
chmod 0755 "$TMPDIR_TEST"
D=$TMPDIR_TEST/nobody
mkdir -m 0777 "$D"
qemu-img create -q -f qcow2 "$D/d.qcow2" 16M
chmod 0644 "$D/d.qcow2"
# The built binary must be reachable by nobody too.
[[ -x $QNBD ]] && setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$QNBD" ||
  { echo "SKIP: $0: user nobody cannot run $QNBD"; exit 77; }

refused=0 served=0
for limit in 3 6 10 14 24 64; do
  rm -f "$D/s.sock" "$D/s.pid"
  setpriv --reuid=65534 --regid=65534 --clear-groups prlimit --nproc="$limit:$limit" \
    "$QNBD" serve -r -f qcow2 -k "$D/s.sock" --pid-file "$D/s.pid" "$D/d.qcow2" 2>"$TMPDIR_TEST/err" &
  pid=$!
  cleanup_fn "kill -9 $pid 2>/dev/null"
  st=0
  wait_ready -s "$D/s.pid" "$pid" || st=$?
  if ((st == 0)); then
    size=$(timeout 20 nbdinfo --size "nbd+unix:///?socket=$D/s.sock") || fail "nproc $limit: started but serves nothing"
    expect_eq "$size" 16777216 "nproc $limit: export size"
    st=0
    timeout 20 tail --pid="$pid" -f /dev/null || fail "nproc $limit: did not end after its only client"
    wait "$pid" || st=$?
    expect_eq "$st" 0 "nproc $limit: exit status after serving"
    served=$((served + 1))
    echo "nproc $limit: serves"
  else
    ((st == 2)) || fail "nproc $limit: neither listening nor ended within 10 s (a hang)"
    st=0
    wait "$pid" || st=$?
    expect_eq "$st" 1 "nproc $limit: exit status of a refusal"
    expect_eq "$(wc -l <"$TMPDIR_TEST/err")" 1 "nproc $limit: lines of stderr"
    grep -q "cannot start .*thread" "$TMPDIR_TEST/err" || fail "nproc $limit: $(cat "$TMPDIR_TEST/err")"
    refused=$((refused + 1))
    echo "nproc $limit: refused: $(cat "$TMPDIR_TEST/err")"
  fi
done
((refused > 0)) || fail "no limit was low enough to refuse"
((served > 0)) || fail "no limit was high enough to serve"
echo PASS
