#!/usr/bin/env bash
# NBD_CMD_FLUSH with a nonzero offset or length (NBD proto.md: reserved,
# MUST be zero) gets NBD_EINVAL and the connection goes on, in simple,
# structured and extended mode; beside qemu-nbd over the same raw-socket
# client. qemu-nbd 7.2 answers EINVAL only when offset + length runs past
# the export (its generic range check) and flushes otherwise; qnbd refuses
# every nonzero value, as the spec reads.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-nbd python3
requires_qnbd

T=$TMPDIR_TEST
head -c 1M /dev/urandom >"$T/d.raw"
start_server "$T/q.pid" qemu-nbd -t -f raw -k "$T/q.sock" --pid-file "$T/q.pid" "$T/d.raw" ||
  fail "qemu-nbd did not start"
start_serve -f raw "$T/d.raw"

# flushes SOCK MODES: the error of each flush below, then of a READ and a
# plain flush after them (the connection still serves), per mode.
flushes() {
  PYTHONPATH=$INTEGRATION_DIR python3 - "$@" <<'PY'
import struct, sys, nbdwire
sock, modes = sys.argv[1], sys.argv[2:]
cases = [(0, 0), (512, 0), (0, 512), (4096, 4096), (1 << 40, 0), (0, 1 << 30)]
for mode in modes:
    s, _, _, _ = nbdwire.connect(sock, mode == "extended", [])
    ext = mode == "extended"
    got = []
    for off, ln in cases:
        nbdwire.send(s, ext, 3, off, ln)
        got.append(nbdwire.status(s, ext))
    nbdwire.send(s, ext, 0, 0, 512)
    got.append(sum(len(d) - 8 for t, d in nbdwire.chunks(s, ext) if t == 1))  # 512 bytes read
    nbdwire.send(s, ext, 3, 0, 0)
    got.append(nbdwire.status(s, ext))
    s.close()  # one client at a time (-e 1)
    print(mode, *got)
PY
}
q=$(flushes "$T/q.sock" structured) || fail "qemu-nbd session failed"
n=$(flushes "$SERVE_SOCK" structured extended) || fail "qnbd session failed"
stop_server "$SERVER_PID" || fail "qemu-nbd did not stop cleanly"
stop_serve
# Columns: (0,0) (512,0) (0,512) (4096,4096) (2^40,0) (0,2^30), read, flush.
expect_eq "$q" "structured 0 0 0 0 22 22 512 0" "qemu-nbd's answers (its behaviour changed?)"
expect_eq "$n" "structured 0 22 22 22 22 22 512 0
extended 0 22 22 22 22 22 512 0" "qnbd's answers"
echo PASS
