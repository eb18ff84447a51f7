# Helpers for the image-lock tests (test-lock.sh, test-lock-qemu.sh).
# Source after functions.sh.

# lock_test_setup: skip without /proc/locks (the tests read the lock bytes
# there), then, in $TMPDIR_TEST, base.qcow2 (64 KiB of 0x11) and
# top.qcow2 on it, which both tests start from.
lock_test_setup() {
  [[ -r /proc/locks ]] || {
    echo "SKIP: no /proc/locks"
    exit 77
  }
  cd "$TMPDIR_TEST" || fail "no test directory"
  qemu-img create -q -f qcow2 base.qcow2 8M
  qemu-io -c 'write -P 0x11 0 64k' base.qcow2 >/dev/null
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
}

# locks_of FILE: the bytes of FILE under an OFD lock, by anyone, as
# "100 101 103 201 203" (from /proc/locks, which names the file by
# major:minor:inode in hex:hex:decimal).
locks_of() {
  local dev ino id
  dev=$(stat -c %d "$1")
  ino=$(stat -c %i "$1")
  id=$(printf '%02x:%02x:%s' $(((dev >> 8) & 0xfff)) $(((dev & 0xff) | ((dev >> 12) & 0xfff00))) "$ino")
  awk -v id="$id" '$2 == "OFDLCK" && $6 == id { for (b = $7; b <= $8; b++) print b }' /proc/locks |
    sort -n | uniq | tr '\n' ' ' | sed 's/ $//'
}

# expect_refused PERM IMAGE CMD...: CMD must exit non-zero within 10 s with
# one of QEMU's lock messages naming PERM ("write", "shared \"write\"", ...)
# and IMAGE.
expect_refused() {
  local perm=$1 image=$2
  shift 2
  run_checked 10 "$@"
  [[ $RUN_KIND == error ]] || {
    cat "$RUN_STDERR" >&2
    fail "$* was not refused ($RUN_KIND, status $RUN_STATUS)"
  }
  grep -qF "Failed to get $perm lock" "$RUN_STDERR" || {
    cat "$RUN_STDERR" >&2
    fail "$*: no 'Failed to get $perm lock' in the message"
  }
  grep -qF "$image" "$RUN_STDERR" || {
    cat "$RUN_STDERR" >&2
    fail "$*: the message does not name $image"
  }
}

# expect_allowed CMD...: CMD must exit 0 within 20 s.
expect_allowed() {
  run_checked 20 "$@"
  [[ $RUN_KIND == ok ]] || {
    cat "$RUN_STDERR" >&2
    fail "$* was refused ($RUN_KIND, status $RUN_STATUS)"
  }
}

# expect_server_allowed PIDFILE CMD...: a server must start (and is stopped
# again at once).
expect_server_allowed() {
  local pidfile=$1
  shift
  start_server "$pidfile" "$@" || fail "server refused: $*"
  stop_server "$SERVER_PID" || fail "server failed: $*"
}
