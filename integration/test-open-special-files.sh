#!/usr/bin/env bash
# An image names its backing and data files, so opening one must never
# block: a FIFO (or any file that is not a regular file or block device) as
# backing file, as external data file or as the image itself is refused at
# once with one line saying why, by every command; so is a --config FIFO. qemu-img info on the top
# image returns at once too (it does not open the backing file). A
# symbolic link or FIFO planted as the write-intent record is never followed.
source "$(dirname "$0")/functions.sh"
requires qemu-img timeout mkfifo
requires_qnbd

T=$TMPDIR_TEST
mkfifo "$T/b.fifo"
mkdir "$T/dir"
qemu-img create -q -f qcow2 -b "$T/b.fifo" -F raw -u "$T/top.qcow2" 1M
qemu-img create -q -f qcow2 -b "$T/b.fifo" -F qcow2 -u "$T/top-q.qcow2" 1M
# A directory as backing file.
qemu-img create -q -f qcow2 -b "$T/dir" -F raw -u "$T/top-dir.qcow2" 1M
truncate -s 1M "$T/data.raw"
qemu-img create -q -f qcow2 -o data_file="$T/data.raw" "$T/ext.qcow2" 1M
rm "$T/data.raw"
mkfifo "$T/data.raw"

run_checked 10 qemu-img info "$T/top.qcow2"
expect_eq "$RUN_KIND" ok "qemu-img info on an image whose backing file is a FIFO"

# expect_refused WHY CMD...: CMD ends at once with a clean error, one line
# on stderr naming WHY.
expect_refused() {
  local why=$1
  shift
  run_checked 10 "$@"
  [[ $RUN_KIND == error ]] || { cat "$RUN_STDERR" >&2; fail "$*: $RUN_KIND (status $RUN_STATUS), expected a clean error"; }
  expect_eq "$(wc -l <"$RUN_STDERR")" 1 "$*: lines on stderr"
  grep -q "$why" "$RUN_STDERR" || { cat "$RUN_STDERR" >&2; fail "$*: the error does not say '$why'"; }
}

fifo='b.fifo: is a FIFO, not a regular file or block device'
for top in top.qcow2 top-q.qcow2; do
  expect_refused "$fifo" "$QNBD" info "$T/$top"
  expect_refused "$fifo" "$QNBD" info --backing-chain "$T/$top"
  expect_refused "$fifo" "$QNBD" map --output=json "$T/$top"
  expect_refused "$fifo" "$QNBD" convert -O raw "$T/$top" "$T/out.raw"
  expect_refused "$fifo" "$QNBD" serve -r -k "$T/s.sock" "$T/$top"
  expect_refused "$fifo" "$QNBD" serve -k "$T/s.sock" "$T/$top"
done
expect_refused 'dir: is a directory' "$QNBD" info "$T/top-dir.qcow2"
expect_refused 'data.raw: is a FIFO' "$QNBD" info "$T/ext.qcow2"
expect_refused 'data.raw: is a FIFO' "$QNBD" serve -k "$T/s.sock" "$T/ext.qcow2"

# The image itself.
for f in "" raw qcow2; do
  fmt=()
  [[ -n $f ]] && fmt=(-f "$f")
  expect_refused "$fifo" "$QNBD" info "${fmt[@]}" "$T/b.fifo"
  expect_refused "$fifo" "$QNBD" serve -r -k "$T/s.sock" "${fmt[@]}" "$T/b.fifo"
  expect_refused 'dir: is a directory' "$QNBD" info "${fmt[@]}" "$T/dir"
done
expect_refused "$fifo" "$QNBD" check "$T/b.fifo"
expect_refused "$fifo" "$QNBD" map "$T/b.fifo"
# A config file that is a FIFO.
expect_refused 'b.fifo: not a regular file' "$QNBD" serve --config "$T/b.fifo"

# The write-intent record is a name qnbd makes beside the image: a symbolic
# link (or a FIFO) planted there is never followed, not even to create or
# truncate. A writable serve with an enabled bitmap writes through; the
# link's target is untouched; the server says it cannot keep the record
# (the bitmaps then work as without it). (The old build truncated the
# target and wrote the record into it.)
source "$INTEGRATION_DIR/lib-serve.sh"
requires_python_nbd
qemu-img create -q -f qcow2 "$T/rec.qcow2" 1M
qemu-img bitmap --add "$T/rec.qcow2" b0
printf 'do not touch\n' >"$T/victim"
for plant in symlink fifo; do
  rm -f "$T/rec.qcow2.qnbd-intent"
  if [[ $plant == symlink ]]; then ln -s "$T/victim" "$T/rec.qcow2.qnbd-intent"; else mkfifo "$T/rec.qcow2.qnbd-intent"; fi
  start_serve -f qcow2 "$T/rec.qcow2"
  timeout 20 "$PY" -c '
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x77" * 4096, 0)
h.flush()
h.shutdown()' "$SERVE_URI" || fail "a write with a planted $plant record"
  stop_serve
  expect_eq "$(cat "$T/victim")" "do not touch" "the target of a planted record $plant"
  grep -q "cannot write the write-intent record" "$SERVE_LOG" ||
    fail "no warning about the planted $plant: $(cat "$SERVE_LOG")"
  case $plant in
    symlink) [[ -L $T/rec.qcow2.qnbd-intent ]] || fail "the planted symlink was replaced" ;;
    fifo) [[ -p $T/rec.qcow2.qnbd-intent ]] || fail "the planted fifo was replaced" ;;
  esac
  qemu-img check -q "$T/rec.qcow2" || fail "qemu-img check after a planted $plant"
  echo "a planted record $plant is not followed"
done
# Nor is a link planted at the pid file's temporary name (PIDFILE.tmp, where
# the pid is written before a rename makes it appear): refused in one line.
ln -s "$T/victim" "$T/p.pid.tmp"
expect_refused "Could not create '$T/p.pid'" "$QNBD" serve -r -k "$T/p.sock" --pid-file "$T/p.pid" "$T/rec.qcow2"
expect_eq "$(cat "$T/victim")" "do not touch" "the target of a link planted at PIDFILE.tmp"
echo PASS
