#!/usr/bin/env bash
# A structured READ of a raw image must not cost more the bigger the file.
# Every READ asks the host file where its holes are; lseek(SEEK_HOLE) on tmpfs
# walks the page cache to the next hole (for a fully written file: to EOF),
# so probing once per READ served 4 KiB reads of a 1 GiB file on /dev/shm at
# ~300 IOPS (qemu-nbd: ~51,000). Without timing anything: serve fully written
# raw files of two sizes (64 and 512 MiB) from /dev/shm under strace, do 200 random 4 KiB reads
# with structured replies, check the bytes, and count the lseek probes the
# server made: a handful for the whole run (what SEEK_HOLE reported is kept),
# not one or two per READ, and no more for the big file than for the small.
source "$(dirname "$0")/functions.sh"
requires_qnbd
requires_strace
requires_python_nbd

shm=/dev/shm
if [[ ! -d $shm || ! -w $shm || $(stat -f -c %T "$shm" 2>/dev/null) != tmpfs ]]; then
  echo "SKIP: $0: no writable tmpfs at $shm"
  exit 77
fi
shmdir=$(mktemp -d "$shm/qnbd-probes.XXXXXX")
cleanup_fn rm -rf "$shmdir"

READS=200
# Most probes the whole run may make: the first READ learns the data run
# (SEEK_DATA + SEEK_HOLE); a few more if requests race it on pool threads.
MAX_PROBES=8

# probes SIZE_MIB [STRIDE]: sets PROBE_DATA and PROBE_HOLE, the SEEK_DATA and
# SEEK_HOLE calls qnbd made while serving $READS reads. STRIDE 1 (default):
# fully written, every page present, no hole before EOF; STRIDE 2: data in
# every other MiB, holes between.
probes() {
  local mib=$1 stride=${2:-1}
  local img=$shmdir/disk-$mib.raw
  "$PY" - "$img" "$mib" "$stride" <<'PY'
import os, sys
path, mib, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = bytearray(os.urandom(1 << 20))  # one buffer: fresh memory per MiB is slow
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for i in range(0, mib, stride):
        buf[0:8] = i.to_bytes(8, "little")  # each MiB differs
        f.seek(i << 20)
        f.write(buf)
PY
  local trace=$TMPDIR_TEST/trace-$mib.txt sock=$TMPDIR_TEST/probe-$mib.sock pidfile=$TMPDIR_TEST/probe-$mib.pid
  start_traced_server "$pidfile" "$trace" lseek "$QNBD" serve -r -f raw -k "$sock" --pid-file "$pidfile" "$img" ||
    fail "server did not start"
  "$PY" - "nbd+unix:///?socket=$sock" "$img" "$READS" <<'PY' || fail "random reads of ${mib} MiB file"
import os, random, sys
import nbd
uri, path, reads = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_structured_replies_negotiated(), "structured replies were not negotiated"
size = h.get_size()
assert size == os.path.getsize(path), (size, os.path.getsize(path))
rng = random.Random(size)
with open(path, "rb") as f:
    for _ in range(reads):
        off = rng.randrange(size // 4096) * 4096
        got = h.pread(4096, off)
        f.seek(off)
        assert got == f.read(4096), f"data differs at {off}"
h.shutdown()
PY
  end_traced_server
  rm -f "$img"
  PROBE_DATA=$(grep -c SEEK_DATA "$trace" || true)
  PROBE_HOLE=$(grep -c SEEK_HOLE "$trace" || true)
}

probes 64
small_data=$PROBE_DATA small_hole=$PROBE_HOLE
probes 512
big_data=$PROBE_DATA big_hole=$PROBE_HOLE
echo "64 MiB: $small_data SEEK_DATA, $small_hole SEEK_HOLE; 512 MiB: $big_data SEEK_DATA, $big_hole SEEK_HOLE (for $READS READs each)"
for n in "$small_data" "$small_hole" "$big_data" "$big_hole"; do
  ((n <= MAX_PROBES)) || fail "$n lseek probes for $READS READs (at most $MAX_PROBES): the server probes holes per request"
done
((big_hole <= small_hole + 2)) || fail "the 512 MiB file took $big_hole SEEK_HOLE probes, the 64 MiB one $small_hole"

# Fragmented: 32 data runs of 1 MiB with holes between. Reads in holes read
# zeroes (checked above against the file) and may probe once each; each data
# run is learned at most twice (its tail first, when the run before it was
# not known yet). Probing per READ would cost one SEEK_DATA per READ
# plus a SEEK_HOLE per data READ (about 1.5 x $READS in all).
probes 64 2
echo "64 MiB, 32 data runs: $PROBE_DATA SEEK_DATA, $PROBE_HOLE SEEK_HOLE"
((PROBE_HOLE <= 2 * 32)) || fail "$PROBE_HOLE SEEK_HOLE probes for 32 data runs"
((PROBE_DATA + PROBE_HOLE <= READS + 2 * 32 + MAX_PROBES)) ||
  fail "$((PROBE_DATA + PROBE_HOLE)) lseek probes for $READS READs over 32 data runs"
echo PASS
