#!/usr/bin/env bash
# A server started with stdin, stdout or stderr closed (`2>&-`, a
# supervisor that closes them) must not write its log into the disk. The
# first file it opens takes the lowest free number: with stderr closed that
# was the image, and every log line landed in it (the old build wrote
# "qnbd: debug: conn 1: disconnect ..." over the client's data at offset
# 512 of a raw image).
#
# For qemu-nbd and qnbd, raw and qcow2, and each way of closing them: serve
# with -v (log lines on every connection), write 64 KiB of a pattern at 0
# and a second pattern at 1 MiB, send a request that fails (a READ past the
# end), disconnect, stop; then the image must read exactly what was
# written (qemu-io -P, including the zeroes around it) and a qcow2 must
# pass qemu-img check.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST

client() {  # SOCKET
  "$PY" - "$1" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri("nbd+unix:///?socket=" + sys.argv[1])
h.pwrite(b"\x5a" * 65536, 0)
h.pwrite(b"\x6b" * 4096, 1 << 20)
try:
    h.pread(4096, 1 << 40)
except nbd.Error:
    pass
h.flush()
h.shutdown()
PY
}

# serve_closed TOOL FMT IMAGE CLOSE: run TOOL on IMAGE with the standard
# streams CLOSE names closed, write through it, stop it by its PID.
serve_closed() {
  local tool=$1 fmt=$2 img=$3 close=$4 sock=$T/c.sock pid
  rm -f "$sock" "$T/c.pid"
  local cmd=("$tool")
  [[ $tool == qnbd ]] && cmd=("$QNBD" serve)
  cmd+=(-v -t -f "$fmt" -k "$sock" --pid-file "$T/c.pid" "$img")
  case $close in
    stderr) "${cmd[@]}" 2>&- & ;;
    stdout+stderr) "${cmd[@]}" >&- 2>&- & ;;
    all) "${cmd[@]}" <&- >&- 2>&- & ;;
  esac
  pid=$!
  cleanup_fn "kill -9 $pid 2>/dev/null"
  wait_ready -s "$T/c.pid" "$pid" || fail "$tool ($close closed) did not start"
  client "$sock" || fail "$tool ($close closed): the client failed"
  kill -TERM "$pid"
  wait "$pid" || true
}

for fmt in raw qcow2; do
  for close in stderr stdout+stderr all; do
    for tool in qemu-nbd qnbd; do
      img=$T/d-$tool.$fmt
      rm -f "$img"
      qemu-img create -q -f "$fmt" "$img" 4M
      serve_closed "$tool" "$fmt" "$img" "$close"
      out=$(qemu-io -r -f "$fmt" -c "read -P 0x5a 0 64k" -c "read -P 0 64k 960k" -c "read -P 0x6b 1M 4k" \
        -c "read -P 0 1028k 3068k" "$img" 2>&1) || fail "$tool $fmt ($close closed): the image does not hold what was written: $out"
      [[ $out != *"verification failed"* ]] || fail "$tool $fmt ($close closed): $out"
      if [[ $fmt == qcow2 ]]; then
        qemu-img check -q "$img" || fail "$tool $fmt ($close closed): qemu-img check"
      fi
      echo "$tool $fmt, $close closed: the image holds exactly the writes"
    done
  done
done
echo "PASS"
