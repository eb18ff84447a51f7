#!/usr/bin/env bash
# qemu-nbd's I/O flags, beside qemu-nbd: tools that spawn qemu-nbd (oVirt
# imageio passes --cache, --aio, --discard and --detect-zeroes) must be able
# to spawn qnbd with the same words.
# 1. Each combination is accepted or refused as qemu-nbd accepts or refuses
#    it (--detect-zeroes=unmap without --discard=unmap, --aio=native without
#    O_DIRECT, unknown values, -n with --cache), with qemu-nbd's message.
# 2. --detect-zeroes: the same WRITEs of all-zero payloads (aligned,
#    unaligned, FUA, into never-written space) on qcow2 and raw leave the
#    same base:allocation map, the same dirty bitmap and the same data as
#    under qemu-nbd, for off, on and unmap; and on/unmap must differ from
#    off (zero clusters instead of stored zeroes), so the comparison cannot
#    pass with the flag ignored.
# 3. -V prints the version and exits 0, as qemu-nbd -V does.
# 4. --selinux-label: a context the kernel refuses, and the flag without
#    --socket, are refused by both with qemu-nbd's words.
# 5. A Unix socket path too long for the system is refused in one line; so
#    are empty values, over-long names, a pid file that cannot be made and
#    a -k path that holds a file, a folder or a link (left as it was;
#    qemu-nbd unlinks it); an unknown option and a bad number exit 1.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
cmp_map=$INTEGRATION_DIR/map-norm.py

qemu-img create -q -f qcow2 "$T/flags.qcow2" 8M

# outcome TOOL ARGS...: "serves" if the server comes up on its socket (then
# stopped by its PID), else "refused" with its first stderr line in
# $T/outcome.err.
outcome() {
  local tool=$1
  shift
  rm -f "$T/o.sock" "$T/o.pid"
  "$tool" "$@" -k "$T/o.sock" --pid-file "$T/o.pid" "$T/flags.qcow2" 2>"$T/outcome.err" &
  local pid=$! st=0
  wait_ready -s "$T/o.pid" "$pid" || st=$?
  if ((st == 0)); then
    nbdinfo --size "nbd+unix:///?socket=$T/o.sock" >/dev/null || fail "$tool $*: serves but nbdinfo fails"
    # (qemu-nbd without -t has already ended with nbdinfo's disconnect)
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" || true
    echo serves
  else
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    echo refused
  fi
}

# check_flags EXPECTED QEMU_PHRASE ARGS...: both servers agree with EXPECTED;
# a refusal by qnbd carries qemu-nbd's phrase. EXPECTED "host-serves": the
# host decides whether qemu-nbd can serve (io_uring, Linux AIO and
# O_DIRECT may be unavailable in a container); qnbd, which uses none of
# them for the flag, must serve.
check_flags() {
  local expected=$1 phrase=$2
  shift 2
  local q n
  q=$(outcome qemu-nbd "$@")
  if [[ $expected == host-serves ]]; then
    [[ $q == serves ]] || echo "note: qemu-nbd $* is refused on this host: $(head -n 1 "$T/outcome.err")"
    expected=serves
    q=serves
  fi
  [[ $q == "$expected" ]] || fail "qemu-nbd $*: $q, the test expects $expected (qemu-nbd changed?)"
  n=$(outcome "$QNBD" serve "$@")
  [[ $n == "$q" ]] || { cat "$T/outcome.err" >&2; fail "qnbd serve $*: $n, qemu-nbd $q"; }
  if [[ $n == refused ]]; then
    grep -qF -- "$phrase" "$T/outcome.err" ||
      { cat "$T/outcome.err" >&2; fail "qnbd serve $*: refusal without '$phrase'"; }
  fi
  echo "flags $*: $n"
}

check_flags refused "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap" \
  --detect-zeroes=unmap
check_flags refused "Failed to parse detect_zeroes mode" --detect-zeroes=bogus
check_flags refused "aio=native was specified, but it requires cache.direct=on" --aio=native
check_flags refused "aio=native was specified, but it requires cache.direct=on" --cache=writeback --aio=native
check_flags refused "Invalid aio mode 'bogus'" --aio=bogus
check_flags refused "-n and --cache can only be specified once" -n --cache=none
check_flags serves "" --aio=threads
check_flags host-serves "" --aio=io_uring
check_flags host-serves "" -n --aio=native
check_flags serves "" --nocache
check_flags host-serves "" --cache=none --aio=native
check_flags serves "" --detect-zeroes=on
check_flags serves "" --detect-zeroes=off
check_flags serves "" --discard=unmap --detect-zeroes=unmap

# --selinux-label: the -k socket is created in that SELinux context, and a
# context the kernel will not take is refused with qemu-nbd's words (every
# context, where SELinux is off, as on this project's CI); without --socket
# it is refused before anything listens.
bad_label=system_u:object_r:qnbd_no_such_t:s0
check_flags refused "Cannot set SELinux socket create context to $bad_label" --selinux-label=$bad_label
if command -v selinuxenabled >/dev/null && selinuxenabled; then
  own_label=$(tr -d '\0' </proc/self/attr/current)
  check_flags serves "" --selinux-label="$own_label"
else
  echo "note: SELinux is off on this host: a context it takes cannot be tried"
fi
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for tool in qemu-nbd "$QNBD serve"; do
  st=0
  # shellcheck disable=SC2086 # "$QNBD serve" is a command and its subcommand
  timeout 10 $tool --selinux-label=$bad_label -b 127.0.0.1 -p "$port" "$T/flags.qcow2" 2>"$T/label.err" || st=$?
  expect_eq "$st" 1 "$tool --selinux-label without --socket: exit status"
  grep -qF -- "--selinux-label is not permitted without --socket" "$T/label.err" ||
    fail "$tool --selinux-label without --socket: $(cat "$T/label.err")"
done
echo "--selinux-label without --socket: refused by both"

# A socket path longer than sockaddr_un holds (107 bytes): refused in one
# line with status 1, as qemu-nbd refuses it; the same for the control
# socket. (Before: an uncaught exception from the socket address, abort,
# status 134.)
long=$T/$(printf 'd%.0s' {1..60})/$(printf 'e%.0s' {1..60})
mkdir -p "$long"
st=0
timeout 10 qemu-nbd -r -f qcow2 -k "$long/s.sock" "$T/flags.qcow2" 2>"$T/long.err" || st=$?
expect_eq "$st" 1 "qemu-nbd: exit status for a socket path too long"
for args in "-k $long/s.sock" "-k $T/l.sock --control $long/c.sock"; do
  st=0
  # shellcheck disable=SC2086 # the words of $args are separate options
  timeout 10 "$QNBD" serve -r -f qcow2 $args "$T/flags.qcow2" 2>"$T/long.err" || st=$?
  expect_eq "$st" 1 "qnbd serve $args: exit status for a socket path too long"
  expect_eq "$(wc -l <"$T/long.err")" 1 "qnbd serve $args: lines of stderr"
  grep -q "too long" "$T/long.err" || fail "qnbd serve $args: $(cat "$T/long.err")"
done
echo "socket paths too long: refused in one line"

# Something that is not a socket at the -k path (a mistyped image name):
# qemu-nbd unlinks it and listens; qnbd leaves it and refuses in one line
# that says why (before: "Address already in use").
for kind in file dir link; do
  rm -rf "$T/taken"
  case $kind in
    file) echo precious >"$T/taken" ;;
    dir) mkdir "$T/taken" ;;
    link) ln -s "$T/flags.qcow2" "$T/taken" ;;
  esac
  st=0
  timeout 10 "$QNBD" serve -r -f qcow2 -k "$T/taken" "$T/flags.qcow2" 2>"$T/taken.err" || st=$?
  expect_eq "$st" 1 "qnbd serve -k onto a $kind: exit status"
  expect_eq "$(wc -l <"$T/taken.err")" 1 "qnbd serve -k onto a $kind: lines of stderr"
  grep -qF "a file that is not a socket is there" "$T/taken.err" || fail "-k onto a $kind: $(cat "$T/taken.err")"
  case $kind in
    file) expect_eq "$(cat "$T/taken")" precious "the file at the -k path" ;;
    dir) [[ -d $T/taken ]] || fail "the folder at the -k path is gone" ;;
    link) [[ -L $T/taken ]] || fail "the link at the -k path is gone" ;;
  esac
done
rm -rf "$T/taken"
echo "-k onto a file, a folder or a link: refused, left as it was"

# Options qemu-nbd refuses with their value: given empty (CLI11 would have
# taken an empty value as the option not given: -k '' served on TCP), an
# export name or description past NBD's 4096 bytes, a pid file that cannot
# be created (qnbd served and never wrote it: whoever waits for it waits
# forever). Both refuse, exit status 1.
long=$(head -c 5000 /dev/zero | tr '\0' a)
check_flags refused "--cache: an empty value" --cache=
check_flags refused "--tls-creds: an empty value" --tls-creds=
refuses() {  # PHRASE ARGS...: qemu-nbd and qnbd serve refuse ARGS, status 1
  local phrase=$1 st
  shift
  st=0
  timeout 10 qemu-nbd -r -f qcow2 "$@" "$T/flags.qcow2" 2>"$T/refuse.err" || st=$?
  expect_eq "$st" 1 "qemu-nbd (${#@} arguments) ${1:-}: exit status"
  st=0
  timeout 10 "$QNBD" serve -r -f qcow2 "$@" "$T/flags.qcow2" 2>"$T/refuse.err" || st=$?
  expect_eq "$st" 1 "qnbd serve (${#@} arguments) ${1:-}: exit status"
  local args="$*"
  grep -qF -- "$phrase" "$T/refuse.err" || fail "qnbd serve ${args:0:100}: $(head -c 300 "$T/refuse.err")"
  echo "refused by both: ${args:0:100}"
}
refuses "export name 'aaaa" -k "$T/e.sock" -x "$long"
refuses "export description 'aaaa" -k "$T/e.sock" -D "$long"
refuses "--socket: an empty value" -k ""
refuses "--pid-file: an empty value" -k "$T/e.sock" --pid-file=
refuses "Could not create '$T/no/such/dir/p'" -k "$T/e.sock" --pid-file "$T/no/such/dir/p"
# Usage errors the command-line parser finds exit 1 too (qnbd exited with
# CLI11's codes, 109 and 104).
refuses "--no-such-option" -k "$T/e.sock" --no-such-option
refuses "--shared" -k "$T/e.sock" -e many

# The zero-payload WRITEs: aligned 1 MiB, unaligned 32 KiB, a FUA 64 KiB,
# 128 KiB into never-written space, and one nonzero write beside them.
writes() {
  "$PY" - "$1" <<'PY' || fail "writes on $1 failed"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
Z = bytes
h.pwrite(Z(1 << 20), 0)
h.pwrite(Z(32 << 10), (2 << 20) + 512)
h.pwrite(Z(64 << 10), 3 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(Z(128 << 10), 5 << 20)
h.pwrite(b"\x01" * 4096, (3 << 20) + (256 << 10))
h.flush()
PY
}

# img_runs QCOW2: `qemu-img map --output=json` as merged runs "START END
# data zero allocated" (allocated: the range has host clusters, as zero
# clusters keep theirs with detect-zeroes=on and lose them with unmap;
# nbdinfo --map shows both as hole,zero).
img_runs() {
  qemu-img map --output=json -f qcow2 "$1" | python3 -c '
import json, sys
runs = []
for e in json.load(sys.stdin):
    cls = (e["data"], e["zero"], "offset" in e)
    if runs and runs[-1][2] == cls and runs[-1][1] == e["start"]:
        runs[-1][1] += e["length"]
    else:
        runs.append([e["start"], e["start"] + e["length"], cls])
for a, b, (d, z, al) in runs:
    print(a, b, "data" if d else "-", "zero" if z else "-", "allocated" if al else "-")
'
}

# zero_case FMT MODE [serve args...]
zero_case() {
  local fmt=$1 mode=$2
  shift 2
  local name=$fmt-$mode a b
  a=$T/$name.qemu.$fmt
  b=$T/$name.qnbd.$fmt
  if [[ $fmt == qcow2 ]]; then
    qemu-img create -q -f qcow2 "$a" 8M
    qemu-img bitmap --add "$a" b0
  else
    truncate -s 8M "$a"
  fi
  qemu-io -f "$fmt" -c 'write -P 0x55 0 4M' "$a" >/dev/null
  cp "$a" "$b"
  local bm=()
  [[ $fmt == qcow2 ]] && bm=(-B b0)
  # qemu-nbd checks --detect-zeroes=unmap against the --discard given
  # before it: the serve args (--discard) come first.
  start_server "$T/q.pid" qemu-nbd -t -f "$fmt" "$@" --detect-zeroes="$mode" "${bm[@]}" \
    -k "$T/q.sock" --pid-file "$T/q.pid" "$a" || fail "$name: qemu-nbd did not start"
  local qpid=$SERVER_PID quri="nbd+unix:///?socket=$T/q.sock"
  start_serve -f "$fmt" "$@" --detect-zeroes="$mode" "${bm[@]}" "$b"
  writes "$quri"
  writes "$SERVE_URI"
  nbdinfo --map "$quri" >"$T/$name.qemu.map"
  nbdinfo --map "$SERVE_URI" >"$T/$name.qnbd.map"
  if [[ $fmt == qcow2 ]]; then
    nbdinfo --json --map=qemu:dirty-bitmap:b0 "$quri" >"$T/$name.qemu.bm"
    nbdinfo --json --map=qemu:dirty-bitmap:b0 "$SERVE_URI" >"$T/$name.qnbd.bm"
  fi
  stop_server "$qpid" || fail "$name: qemu-nbd did not stop cleanly"
  stop_serve
  if [[ $fmt == qcow2 ]]; then
    # (raw: what SEEK_HOLE reports for a FALLOC_FL_ZERO_RANGE'd range on
    # ext4 depends on the page cache, so the two servers' raw maps may
    # differ run to run; the raw cases compare data, and the hole below)
    python3 "$cmp_map" nbdinfo "$T/$name.qemu.map" "$T/$name.qnbd.map" >"$T/$name.cmp" ||
      { cat "$T/$name.cmp" >&2; fail "$name: base:allocation map differs from qemu-nbd's"; }
    expect_eq "$(python3 "$cmp_map" bitmap "$T/$name.qnbd.bm")" "$(python3 "$cmp_map" bitmap "$T/$name.qemu.bm")" \
      "$name: dirty bitmap b0"
    [[ $(python3 "$cmp_map" bitmap "$T/$name.qnbd.bm") == *dirty* ]] || fail "$name: the writes left b0 clean"
    img_runs "$a" >"$T/$name.qemu.img"
    img_runs "$b" >"$T/$name.qnbd.img"
    diff -u "$T/$name.qemu.img" "$T/$name.qnbd.img" >&2 ||
      fail "$name: qemu-img map of the file (data, zero, allocated) differs from qemu-nbd's"
    qemu-img check -q "$b" || fail "$name: qemu-img check finds errors"
  fi
  qemu-img compare -q -f "$fmt" -F "$fmt" "$a" "$b" || fail "$name: data differs from qemu-nbd's"
  echo "$name: $(head -n 1 "$T/$name.cmp" 2>/dev/null || echo "same data")"
}

zero_case qcow2 off
zero_case qcow2 on
zero_case qcow2 unmap --discard=unmap
zero_case raw off
zero_case raw on
zero_case raw unmap --discard=unmap
# The flag is not ignored: with it, the zeroed MiB at 0 of the qcow2 is
# zero clusters (allocated ones with on, released with unmap), without it
# stored data.
expect_eq "$(head -n 1 "$T/qcow2-off.qnbd.img")" "0 4194304 data - allocated" "qcow2 detect-zeroes=off: first run"
expect_eq "$(head -n 1 "$T/qcow2-on.qnbd.img")" "0 1048576 - zero allocated" "qcow2 detect-zeroes=on: first run"
expect_eq "$(head -n 1 "$T/qcow2-unmap.qnbd.img")" "0 1048576 - zero -" "qcow2 detect-zeroes=unmap: first run"
# raw: the aligned zero MiB at 0 is a punched hole with unmap, the stored
# bytes without the flag.
first_run() { head -n 1 "$1" | awk '{print $1, $2, $4}'; }
expect_eq "$(first_run "$T/raw-unmap.qnbd.map")" "0 1048576 hole,zero" "raw --detect-zeroes=unmap: first run"
expect_eq "$(first_run "$T/raw-off.qnbd.map")" "0 4194304 data" "raw --detect-zeroes=off: first run"

# The config file's keys do the same as the flags.
cfg_img=$T/cfg.qcow2
qemu-img create -q -f qcow2 "$cfg_img" 8M
qemu-io -f qcow2 -c 'write -P 0x55 0 4M' "$cfg_img" >/dev/null
cat >"$T/cfg.json" <<EOF
{"exports": [{"name": "", "image": "$cfg_img", "format": "qcow2", "discard": "unmap",
              "detect_zeroes": "unmap", "cache": "none", "aio": "native"}]}
EOF
start_serve --config "$T/cfg.json"
writes "$SERVE_URI"
nbdinfo --map "$SERVE_URI" >"$T/cfg.map"
stop_serve
python3 "$cmp_map" nbdinfo "$T/qcow2-unmap.qemu.map" "$T/cfg.map" >"$T/cfg.cmp" ||
  { cat "$T/cfg.cmp" >&2; fail "config detect_zeroes=unmap: map differs from qemu-nbd --detect-zeroes=unmap"; }

version=$("$QNBD" serve -V) || fail "qnbd serve -V failed"
[[ $version == "qnbd "[0-9]* ]] || fail "qnbd serve -V printed '$version'"
echo PASS
