#!/usr/bin/env bash
# Image locks QEMU honours, part 2: qemu-nbd holds the image and qnbd asks
# (serve, check -r, bitmap --add refused; info/map/check with -U, serve -r
# --force-share let in with a warning); read-only exports side by side; one
# backing file under two writable chains; the locking switch (--locking,
# the config key) and a file system without OFD locks. Part 1 is
# test-lock.sh.
source "$(dirname "$0")/functions.sh"
source "$(dirname "$0")/lib-lock.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo cc
requires_qnbd
lock_test_setup
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top2.qcow2
qemu-img bitmap --add top.qcow2 b0

# --- 1. qemu-nbd serves top.qcow2 writable.
start_server q.pid qemu-nbd -t -k "$TMPDIR_TEST/q.sock" --pid-file q.pid top.qcow2 || fail "qemu-nbd"
Q=$SERVER_PID
expect_refused '"write"' top.qcow2 "$QNBD" serve -k "$TMPDIR_TEST/x.sock" top.qcow2
[[ $(wc -l <"$RUN_STDERR") == 1 ]] || fail "qnbd's refusal is not one line: $(cat "$RUN_STDERR")"
expect_eq "$RUN_STATUS" 1 "qnbd serve exit status"
expect_refused '"write"' top.qcow2 "$QNBD" check -r all top.qcow2
expect_refused '"write"' top.qcow2 "$QNBD" bitmap --add top.qcow2 b1
expect_refused '"write"' top.qcow2 "$QNBD" bench -w -c 1 top.qcow2
# Read-only tools refuse to share write, as qemu-img does here (qemu-img
# info, map and check are refused by a writable qemu-nbd alike)...
expect_refused 'shared "write"' top.qcow2 qemu-img info top.qcow2
expect_refused 'shared "write"' top.qcow2 "$QNBD" info top.qcow2
expect_refused 'shared "write"' top.qcow2 "$QNBD" map top.qcow2
expect_refused 'shared "write"' top.qcow2 "$QNBD" check top.qcow2
expect_refused 'shared "write"' top.qcow2 "$QNBD" serve -r -k "$TMPDIR_TEST/x.sock" top.qcow2
# ...unless told -U / --force-share, which opens anyway, with a warning.
expect_allowed "$QNBD" info -U top.qcow2
grep -q 'force-share' "$RUN_STDERR" || fail "no --force-share warning: $(cat "$RUN_STDERR")"
grep -q '^image: top.qcow2' "$RUN_STDOUT" || fail "qnbd info -U printed: $(cat "$RUN_STDOUT")"
expect_allowed "$QNBD" map -U --output=json top.qcow2
expect_allowed "$QNBD" check -U top.qcow2
expect_allowed "$QNBD" convert -U -O raw top.qcow2 out.raw
run_checked 10 "$QNBD" check -U -r all top.qcow2
[[ $RUN_KIND == error ]] && grep -q 'read-only' "$RUN_STDERR" || fail "check -U -r all: $(cat "$RUN_STDERR")"
run_checked 10 "$QNBD" serve --force-share -k "$TMPDIR_TEST/x.sock" top.qcow2
[[ $RUN_KIND == error ]] && grep -q 'read-only' "$RUN_STDERR" || fail "serve --force-share (rw): $(cat "$RUN_STDERR")"
start_server f.pid "$QNBD" serve -t -r --force-share -k "$TMPDIR_TEST/f.sock" --pid-file f.pid top.qcow2 ||
  fail "qnbd serve -r --force-share refused"
F=$SERVER_PID
grep -q 'force-share' server.log || fail "no --force-share warning from serve"
nbdinfo --size "nbd+unix:///?socket=$TMPDIR_TEST/f.sock" >/dev/null || fail "nbdinfo on the --force-share export"
stop_server "$F"
# --locking=off shows the switch works: a second writer gets in (the
# operator's own risk, as with QEMU's locking=off).
start_server o.pid "$QNBD" serve -t --locking=off -k "$TMPDIR_TEST/o.sock" --pid-file o.pid top.qcow2 ||
  fail "qnbd serve --locking=off refused"
stop_server "$SERVER_PID"
# The same per export in a config file.
cfg() {
  printf '{"exports": [{"name": "", "image": "top.qcow2", "locking": "%s"}],
    "listeners": [{"type": "unix", "path": "%s"}]}\n' "$1" "$TMPDIR_TEST/c.sock" >c.json
}
cfg on
expect_refused '"write"' top.qcow2 "$QNBD" serve --config c.json
cfg off
expect_server_allowed c.pid "$QNBD" serve --config c.json --pid-file c.pid
stop_server "$Q"
expect_eq "$(locks_of top.qcow2)" "" "locks after qemu-nbd and qnbd stopped"

# --- 2. Read-only exports side by side, and info beside them.
start_server q1.pid qemu-nbd -t -r -k "$TMPDIR_TEST/q1.sock" --pid-file q1.pid top.qcow2 || fail "qemu-nbd -r"
Q1=$SERVER_PID
start_server s1.pid "$QNBD" serve -t -r -k "$TMPDIR_TEST/s1.sock" --pid-file s1.pid top.qcow2 || fail "qnbd -r 1"
S1=$SERVER_PID
start_server s2.pid "$QNBD" serve -t -r -k "$TMPDIR_TEST/s2.sock" --pid-file s2.pid top.qcow2 || fail "qnbd -r 2"
S2=$SERVER_PID
expect_allowed "$QNBD" info top.qcow2
expect_allowed "$QNBD" check top.qcow2
expect_refused '"write"' top.qcow2 "$QNBD" bitmap --add top.qcow2 b2
expect_refused '"write"' top.qcow2 qemu-io -c 'write 0 4k' top.qcow2
stop_server "$S2"
stop_server "$S1"
stop_server "$Q1"

# --- 3. One backing file under two writable chains at once (qemu-nbd on
# top.qcow2, qnbd on top2.qcow2): both only read it, so both get in; a
# writer of the backing file itself is kept out.
start_server q3.pid qemu-nbd -t -k "$TMPDIR_TEST/q3.sock" --pid-file q3.pid top.qcow2 || fail "qemu-nbd chain 1"
Q3=$SERVER_PID
start_server s3.pid "$QNBD" serve -t -k "$TMPDIR_TEST/s3.sock" --pid-file s3.pid top2.qcow2 || fail "qnbd chain 2"
S3=$SERVER_PID
expect_eq "$(nbdinfo --size "nbd+unix:///?socket=$TMPDIR_TEST/s3.sock")" 8388608 "chain 2 size"
expect_refused '"write"' base.qcow2 "$QNBD" serve -k "$TMPDIR_TEST/x.sock" base.qcow2
stop_server "$S3"
stop_server "$Q3"

# --- 4. A file system without OFD locks. The kernel's answer there
# (ENOLCK, as from NFS without a lock manager) is injected by a preloaded
# fcntl() wrapper: locking=auto warns and serves, locking=on fails with
# one line.
cat >nolock.c <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
static int forward(const char *name, int fd, int cmd, void *arg) {
  int (*real)(int, int, ...) = (int (*)(int, int, ...))dlsym(RTLD_NEXT, name);
  if (cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW || cmd == F_OFD_GETLK) {
    errno = ENOLCK;
    return -1;
  }
  return real(fd, cmd, arg);
}
int fcntl(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  void *arg = va_arg(ap, void *);
  va_end(ap);
  return forward("fcntl", fd, cmd, arg);
}
int fcntl64(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  void *arg = va_arg(ap, void *);
  va_end(ap);
  return forward("fcntl64", fd, cmd, arg);
}
EOF
cc -shared -fPIC -o nolock.so nolock.c -ldl
nolock=(env LD_PRELOAD="$TMPDIR_TEST/nolock.so" ASAN_OPTIONS="$ASAN_OPTIONS:verify_asan_link_order=0")
run_checked 10 "${nolock[@]}" "$QNBD" info top.qcow2
[[ $RUN_KIND == ok ]] || fail "locking=auto without OFD locks: $(cat "$RUN_STDERR")"
grep -q 'does not support OFD locks' "$RUN_STDERR" || fail "no warning: $(cat "$RUN_STDERR")"
run_checked 10 "${nolock[@]}" "$QNBD" info --locking=on top.qcow2
[[ $RUN_KIND == error && $(wc -l <"$RUN_STDERR") == 1 ]] || fail "locking=on without OFD locks: $(cat "$RUN_STDERR")"
grep -q 'top.qcow2: cannot lock the image: No locks available' "$RUN_STDERR" || fail "message: $(cat "$RUN_STDERR")"
start_server n.pid "${nolock[@]}" "$QNBD" serve -t -k "$TMPDIR_TEST/n.sock" --pid-file n.pid top.qcow2 || fail "serve without OFD locks"
stop_server "$SERVER_PID"

echo "PASS: test-lock-qemu"
