#!/usr/bin/env python3
"""The client half of test-bitmap-backup.sh: what an incremental backup tool
does over NBD with libnbd.

  backup_cycle.py write URI SEED GRANULARITY TRIM_DIRTIES GRANULES_OUT
      A seeded random workload on a writable export: aligned and unaligned
      writes (some FUA), zero writes with and without NBD_CMD_FLAG_NO_HOLE,
      trims and flushes, plus fixed requests at both ends of the disk and
      across a granule boundary. Every byte the client expects is kept in a
      model that must equal the whole disk at the end. GRANULES_OUT gets the
      sorted indexes of every GRANULARITY-sized granule a request touched:
      the exact set the enabled bitmap must have recorded. Trims count only
      when TRIM_DIRTIES is 1 (served with --discard=unmap: with
      --discard=ignore a trim does nothing, so it marks nothing, as in qemu).

  backup_cycle.py pull URI BITMAP BACKUP GRANULES_IN GRANULARITY
      Asks NBD_CMD_BLOCK_STATUS for qemu:dirty-bitmap:BITMAP over the whole
      disk, reads exactly the dirty extents (16 requests in flight) and writes
      them into the raw file BACKUP at the same offsets. Fails unless the
      dirty extents cover exactly the granules listed in GRANULES_IN (not
      more, not fewer); GRANULES_IN "-" skips that check (a bitmap recovered
      after a crash). Prints "extents N bytes M".
"""
import json
import random
import sys

import nbd

CHUNK = 4 << 20  # largest read or write request this client sends
IN_FLIGHT = 16


def die(msg):
    print(f"backup_cycle: {msg}", file=sys.stderr)
    sys.exit(1)


def read_all(h, size):
    out = bytearray()
    for off in range(0, size, CHUNK):
        out += h.pread(min(CHUNK, size - off), off)
    return out


def touched(granules, off, length, gran):
    granules.update(range(off // gran, (off + length - 1) // gran + 1))


def write(uri, seed, gran, trim_dirties, out_path):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    if h.is_read_only():
        die("export is read-only")
    size = h.get_size()
    model = read_all(h, size)
    granules = set()
    counts = {"write": 0, "zero": 0, "trim": 0, "flush": 0}

    def do_write(off, length, fua=False):
        buf = rng.randbytes(length)
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA if fua else 0)
        model[off:off + length] = buf
        touched(granules, off, length, gran)
        counts["write"] += 1

    # Fixed requests: the last byte, the first sector, one byte either side
    # of a granule boundary (two granules dirty from a 2-byte write).
    do_write(size - 1, 1)
    do_write(0, 512)
    b = gran * rng.randrange(1, size // gran)
    do_write(b - 1, 2)

    for _ in range(rng.randrange(40, 70)):
        kind = rng.randrange(100)
        length = rng.randrange(1, 1 << 21 if rng.randrange(8) == 0 else 150000)
        off = rng.randrange(0, size - length + 1)
        if rng.randrange(2) == 0:  # half of the requests 512-aligned
            off -= off % 512
            length = max(512, length - length % 512)
        if kind < 8:
            h.flush()
            counts["flush"] += 1
        elif kind < 60:
            do_write(off, length, fua=rng.randrange(8) == 0)
        elif kind < 80:
            h.zero(length, off, nbd.CMD_FLAG_NO_HOLE if rng.randrange(2) else 0)
            model[off:off + length] = bytes(length)
            touched(granules, off, length, gran)
            counts["zero"] += 1
        else:
            h.trim(length, off)
            # Trimmed bytes are unspecified: adopt what reads back.
            model[off:off + length] = h.pread(length, off)
            if trim_dirties:
                touched(granules, off, length, gran)
            counts["trim"] += 1
    h.flush()
    disk = read_all(h, size)
    if disk != model:
        bad = next(i for i in range(size) if disk[i] != model[i])
        die(f"disk differs from the client's model at byte {bad}")
    h.shutdown()
    with open(out_path, "w") as f:
        json.dump(sorted(granules), f)
    print(" ".join(f"{k}s {v}" for k, v in counts.items()), f"granules {len(granules)}")


def pull(uri, bitmap, backup_path, granules_path, gran):
    context = f"qemu:dirty-bitmap:{bitmap}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        die(f"server did not agree to {context}")
    size = h.get_size()

    # Dirty runs from block status, merged; each reply may end early.
    runs = []
    pos = 0
    while pos < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == context:
                got.append((offset, list(entries)))
            return 0

        h.block_status(min(size - pos, 1 << 30), pos, cb)
        if len(got) != 1 or got[0][0] != pos or not got[0][1]:
            die(f"block status at {pos}: unexpected reply {got!r:.200}")
        entries = got[0][1]
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            if length == 0:
                die(f"block status at {pos}: empty extent")
            length = min(length, size - pos)
            if pos % gran or (length % gran and pos + length != size):
                die(f"extent {pos}+{length} not aligned to the granularity {gran}")
            if flags & 1:
                if runs and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1][1] += length
                else:
                    runs.append([pos, length])
            pos += length
            if pos >= size:
                break

    have = set()
    for off, length in runs:
        touched(have, off, length, gran)
    if granules_path == "-":
        # After a crash the recovered bitmap covers whole recovery chunks:
        # no exact set to compare; qemu-img compare judges the backup.
        want = have
    else:
        with open(granules_path) as f:
            want = set(json.load(f))
    if have != want:
        extra = sorted(have - want)
        missing = sorted(want - have)
        die(f"{context}: {len(extra)} granules dirty that no request touched "
            f"(first {[g * gran for g in extra[:5]]}), {len(missing)} touched "
            f"granules not dirty (first {[g * gran for g in missing[:5]]})")

    # Read exactly the dirty runs, IN_FLIGHT requests at a time.
    pieces = [(off + o, min(CHUNK, length - o)) for off, length in runs for o in range(0, length, CHUNK)]
    pulled = 0
    with open(backup_path, "r+b") as backup:
        inflight = []
        i = 0
        while i < len(pieces) or inflight:
            while i < len(pieces) and len(inflight) < IN_FLIGHT:
                off, length = pieces[i]
                buf = nbd.Buffer(length)
                inflight.append((h.aio_pread(buf, off), buf, off, length))
                i += 1
            h.poll(-1)
            still = []
            for cookie, buf, off, length in inflight:
                if h.aio_command_completed(cookie):
                    backup.seek(off)
                    backup.write(buf.to_bytearray())
                    pulled += length
                else:
                    still.append((cookie, buf, off, length))
            inflight = still
    h.shutdown()
    if pulled != sum(min(gran, size - g * gran) for g in want):
        die(f"pulled {pulled} bytes for {len(want)} granules")
    print(f"extents {len(runs)} bytes {pulled}")


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6])
    elif len(sys.argv) == 7 and sys.argv[1] == "pull":
        pull(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
