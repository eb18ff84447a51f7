#!/usr/bin/env python3
"""qnbd and qemu-nbd in lock step, for test-serve-lockstep.sh.

  lockstep.py QNBD_URI QEMU_URI FORMAT SEED SIZE OPS BITMAPS

One libnbd connection to each server (each serving its own copy of the
same image, with -A, and -B NAME for each name of the comma-separated
BITMAPS unless it is "-"). The same seeded
requests go to both, one at a time: WRITEs (some FUA, some not 512-byte
aligned, some of zeroes), WRITE_ZEROES (with and without NO_HOLE, some FAST_ZERO), TRIMs,
FLUSHes, CACHEs (raw only), READs and BLOCK_STATUS of base:allocation,
qemu:allocation-depth and the dirty bitmaps, with and without REQ_ONE.
After each one both must have answered alike:
  - success or the same errno (but for a deliberate difference of
    docs/architecture.md: a write or zeroing past the end gets ENOSPC from
    qnbd, as proto.md says, and EINVAL from qemu-nbd 7.2);
  - a FAST_ZERO both refuse: qnbd's export unchanged (proto.md; qemu-nbd
    7.2 may zero part of it, so both then zero the range plainly);
  - a READ: the same bytes, and the bytes a model of the disk holds (a
    TRIMmed range is unspecified: the model adopts what qemu-nbd reads);
  - a BLOCK_STATUS: over the range both described, every 512-byte sector
    in the same class for each context (depth, dirty; base:allocation as
    compare_status says: the bits that come from the host file's holes
    only have to be true), since where each server splits its extents is
    its own choice.
Prints one summary line; exit 1 with the first difference.
"""
import os
import random
import sys

import nbd

SECTOR = 512
TRACE = os.environ.get("LOCKSTEP_TRACE") == "1"
CONTEXTS = ["base:allocation", "qemu:allocation-depth"]


def connect(uri, contexts):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    for c in contexts:
        if not h.can_meta_context(c):
            raise SystemExit(f"{uri}: context {c} not negotiated")
    return h


def call(fn):
    """(True, value) or (False, errno name)."""
    try:
        return True, fn()
    except nbd.Error as e:
        return False, e.errno or str(e.errnum)


def status(h, length, off, flags):
    """{context: [(start, end, cls)]} from one BLOCK_STATUS."""
    got = {}

    def cb(meta, offset, entries, err):
        runs = got.setdefault(meta, [])
        pos = offset
        for i in range(0, len(entries), 2):
            runs.append((pos, pos + entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(length, off, cb, flags)
    return got


def per_sector(runs, lo, hi):
    """The class of each sector of [lo, hi) from runs that cover it."""
    out = []
    for start, end, cls in runs:
        for s in range(max(start, lo) // SECTOR, min(end, hi) // SECTOR):
            out.append(cls)
    return out


HOLE, ZERO = 1, 2


def compare_status(a, b, off, where, qcow2, model, tally):
    """None, or the first difference that matters between qnbd's (a) and
    qemu-nbd's (b) BLOCK_STATUS replies starting at off.

    What must be equal: every sector's qemu:allocation-depth and dirty
    bitmap class; for a qcow2 image, base:allocation's HOLE bit (from the
    image's metadata alone) and, where HOLE is set, its ZERO bit. What only
    has to be true: ZERO on a qcow2 data cluster, and both bits on a raw
    file. Those come from SEEK_HOLE on the host file, whose unwritten
    extents (left by fallocate's ZERO_RANGE) count as data once the kernel
    has read them ahead into the page cache, so they follow each server's
    past reads; where a server says ZERO (or HOLE) there, the model must
    hold zeroes (tally counts the sectors where the two servers differ)."""
    if set(a) != set(b):
        return f"{where}: contexts {sorted(a)} vs {sorted(b)}"
    for ctx in a:
        ra, rb = a[ctx], b[ctx]
        if not ra or not rb:
            return f"{where}: {ctx}: an empty reply ({len(ra)} vs {len(rb)} extents)"
        if ra[0][0] != off or rb[0][0] != off:
            return f"{where}: {ctx}: replies start at {ra[0][0]} and {rb[0][0]}"
        hi = min(ra[-1][1], rb[-1][1])
        lo = off
        # Whole sectors only (requests and extents are 512-aligned here; an
        # unaligned tail would be the same sector in both).
        sa, sb = per_sector(ra, lo, hi), per_sector(rb, lo, hi)
        for i in range(min(len(sa), len(sb))):
            x, y = sa[i], sb[i]
            if x == y:
                continue
            sec = lo // SECTOR + i
            if ctx == "base:allocation":
                # qcow2: HOLE comes from the metadata, and so does ZERO under
                # a hole (both servers' HOLE bits set).
                exact = qcow2 and bool((x ^ y) & HOLE or x & HOLE)
                if not exact:
                    if model[sec * SECTOR:(sec + 1) * SECTOR] == bytes(SECTOR):
                        tally[0] += 1
                        continue
                    who = "qnbd" if x & (HOLE | ZERO) else "qemu-nbd"
                    return f"{where}: {ctx}: sector {sec} (offset {sec * SECTOR}) is not zero but {who} says so"
            return (f"{where}: {ctx}: sector {sec} (offset {sec * SECTOR}): qnbd {x} qemu-nbd {y}; "
                    f"qnbd {ra[:6]} qemu-nbd {rb[:6]}")
        if len(sa) != len(sb):
            return f"{where}: {ctx}: {len(sa)} vs {len(sb)} sectors described"
    return None


def main(argv):
    if len(argv) != 8:
        print(__doc__, file=sys.stderr)
        return 2
    uri_q, uri_n, fmt, bitmap = argv[1], argv[2], argv[3], argv[7]
    seed, size, ops = int(argv[4]), int(argv[5]), int(argv[6])
    qcow2 = fmt == "qcow2"
    contexts = CONTEXTS + ([f"qemu:dirty-bitmap:{b}" for b in bitmap.split(",")] if bitmap != "-" else [])
    hq, hn = connect(uri_q, contexts), connect(uri_n, contexts)
    for h in (hq, hn):
        h.set_strict_mode(0)  # let out-of-range requests reach the servers
    for flag in ("can_trim", "can_zero", "can_fast_zero", "can_fua", "can_flush", "can_cache", "can_multi_conn",
                 "can_df", "is_read_only"):
        vq, vn = getattr(hq, flag)(), getattr(hn, flag)()
        if vq != vn:
            print(f"{flag}: qnbd {vq} qemu-nbd {vn}")
            return 1
    if hq.get_size() != hn.get_size() or hq.get_size() != size:
        print(f"size: qnbd {hq.get_size()} qemu-nbd {hn.get_size()} expected {size}")
        return 1
    rnd = random.Random(seed)
    model = bytearray(hn.pread(size, 0) if size <= 64 << 20 else b"")
    if model != hq.pread(size, 0):
        print("the two copies differ before the first request")
        return 1
    counts = {}
    tally = [0]  # sectors where only the page-cache-dependent bits differ
    for step in range(ops):
        r = rnd.random()
        big = rnd.random() < 0.15
        ln = rnd.randrange(1, (2 << 20 if big else 192 << 10) + 1)
        off = rnd.randrange(0, size)
        if rnd.random() < 0.7:
            off, ln = off // SECTOR * SECTOR, max(SECTOR, ln // SECTOR * SECTOR)
        if rnd.random() < 0.05:
            off = size - rnd.choice([0, SECTOR, 4096])  # at or near the end
        elif off + ln > size:
            ln = size - off
        ln = max(ln, 1)
        inside = off + ln <= size
        if r < 0.30:
            op = "write"
            # Some payloads are all zeroes (what --detect-zeroes looks for).
            data = bytes(ln) if rnd.random() < 0.1 else rnd.randbytes(ln)
            flags = nbd.CMD_FLAG_FUA if rnd.random() < 0.15 else 0
            res = [call(lambda h=h: h.pwrite(data, off, flags)) for h in (hq, hn)]
            if res[1][0]:
                model[off:off + ln] = data
        elif r < 0.45:
            op = "zero"
            flags = (nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.4 else 0) | \
                    (nbd.CMD_FLAG_FAST_ZERO if rnd.random() < 0.1 else 0)
            res = [call(lambda h=h: h.zero(ln, off, flags)) for h in (hq, hn)]
            if res[0] == res[1] == (False, "ENOTSUP") and flags & nbd.CMD_FLAG_FAST_ZERO and inside:
                # A refused fast zero: qnbd must have left the range as it
                # was (proto.md: SHOULD NOT modify the export when failing);
                # qemu-nbd 7.2 may have zeroed part of it (a deliberate
                # difference, docs/architecture.md). Both then zero it.
                if hq.pread(ln, off) != bytes(model[off:off + ln]):
                    print(f"step {step}: a refused FAST_ZERO {off}+{ln} changed qnbd's export")
                    return 1
                for h in (hq, hn):
                    h.zero(ln, off)
                model[off:off + ln] = bytes(ln)
                counts["fast zero refused"] = counts.get("fast zero refused", 0) + 1
            elif res[1][0]:
                model[off:off + ln] = bytes(ln)
        elif r < 0.55:
            op = "trim"
            res = [call(lambda h=h: h.trim(ln, off)) for h in (hq, hn)]
            if res[0][0] and res[1][0] and inside:
                # Unspecified contents: both must read alike, and the model
                # takes qemu-nbd's.
                a, b = hq.pread(ln, off), hn.pread(ln, off)
                if a != b:
                    i = next(k for k in range(ln) if a[k] != b[k])
                    print(f"step {step}: trim {off}+{ln}: reads differ afterwards at {off + i}")
                    return 1
                model[off:off + ln] = b
        elif r < 0.60:
            op = "flush"
            res = [call(h.flush) for h in (hq, hn)]
        elif r < 0.63 and not qcow2:
            # On a qcow2 image qemu-nbd 7.2's CACHE is a copy-on-read that
            # allocates in the image; qnbd's changes nothing (a deliberate
            # difference, docs/architecture.md; test-serve-cache.sh).
            op = "cache"
            res = [call(lambda h=h: h.cache(ln, off)) for h in (hq, hn)]
        elif r < 0.80:
            op = "read"
            res = [call(lambda h=h: h.pread(ln, off)) for h in (hq, hn)]
            if res[0][0] and res[1][0]:
                if res[0][1] != res[1][1]:
                    a, b = res[0][1], res[1][1]
                    i = next(k for k in range(ln) if a[k] != b[k])
                    print(f"step {step}: read {off}+{ln}: differ at {off + i}: qnbd {a[i]:#x} qemu-nbd {b[i]:#x}")
                    return 1
                if res[1][1] != bytes(model[off:off + ln]):
                    print(f"step {step}: read {off}+{ln}: both servers differ from the model")
                    return 1
                res = [(True, None), (True, None)]
        else:
            op = "block_status"
            flags = nbd.CMD_FLAG_REQ_ONE if rnd.random() < 0.4 else 0
            if rnd.random() < 0.3:
                off, ln = 0, size  # the whole disk
            off = min(off // SECTOR * SECTOR, size - SECTOR)
            ln = max(SECTOR, min(ln, size - off) // SECTOR * SECTOR)
            res = [call(lambda h=h: status(h, ln, off, flags)) for h in (hq, hn)]
            if res[0][0] and res[1][0]:
                why = compare_status(res[0][1], res[1][1], off, f"step {step}: block status {off}+{ln} flags {flags}",
                                     qcow2, model, tally)
                if why:
                    print(why)
                    return 1
                res = [(True, None), (True, None)]
        counts[op] = counts.get(op, 0) + 1
        if TRACE:
            print(f"step {step}: {op} {off}+{ln} -> {res[0][0]}/{res[1][0]}", file=sys.stderr)
        if not inside and op in ("write", "zero") and res[0] == (False, "ENOSPC") and res[1] == (False, "EINVAL"):
            # The one deliberate difference here (docs/architecture.md): a
            # write past the end gets NBD_ENOSPC, as proto.md says;
            # qemu-nbd 7.2 answers NBD_EINVAL.
            res = [res[1], res[1]]
        if res[0][0] != res[1][0] or (not res[0][0] and res[0][1] != res[1][1]):
            print(f"step {step}: {op} {off}+{ln}: qnbd {res[0]} qemu-nbd {res[1]}")
            return 1
        if not res[1][0]:
            counts["errors"] = counts.get("errors", 0) + 1
    if os.environ.get("LOCKSTEP_NO_FINAL") == "1":
        return 0
    # The end state: every byte and every context over the whole disk.
    for h in (hq, hn):
        h.flush()
    if hq.pread(size, 0) != bytes(model) or hn.pread(size, 0) != bytes(model):
        print("the final contents differ")
        return 1
    why = compare_status(status(hq, size, 0, 0), status(hn, size, 0, 0), 0, "final block status", qcow2, model,
                         tally)
    if why:
        print(why)
        return 1
    for h in (hq, hn):
        h.shutdown()
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) +
          f"; {tally[0]} sector answers differing only in host-file hole bits")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
