#!/usr/bin/env python3
"""Writes onto a host file system that fills up, for test-serve-disk-full.sh.

  disk_full.py fill URI SEED OPS MODEL
      OPS seeded requests on 64 KiB blocks (whole, aligned: one bitmap
      granule each): WRITEs of data made from (SEED, request), some
      WRITE_ZEROES, a FLUSH now and then. Requests that fail are expected
      once the file system is full; the connection must stay up. MODEL
      (JSON) gets, per block, the data it must now hold ([seed, request],
      "zero", or null when a failed request left it unknown) and every
      block any request touched. Prints one JSON line: {"ok": N,
      "errors": {ERRNO: count}}.
  disk_full.py verify URI MODEL
      Read every block whose contents the model knows; exit 1 at the first
      difference.
  disk_full.py dirty URI BITMAP MODEL
      qemu:dirty-bitmap:BITMAP must be dirty on every touched block; exit 1
      naming the first clean one.
"""
import json
import random
import sys

import nbd

BLOCK = 64 << 10


def block_data(seed, req):
    return random.Random(seed * 1000003 + req).randbytes(BLOCK)


def connect(uri, meta=None):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(meta)
    h.connect_uri(uri)
    return h


def fill(uri, seed, ops, model_path):
    h = connect(uri)
    blocks = h.get_size() // BLOCK
    rnd = random.Random(seed)
    known, touched = {}, set()
    ok, errors = 0, {}
    for req in range(ops):
        b = rnd.randrange(blocks)
        kind = rnd.random()
        try:
            if kind < 0.85:
                touched.add(b)
                known[b] = None
                h.pwrite(block_data(seed, req), b * BLOCK)
                known[b] = [seed, req]
            elif kind < 0.95:
                touched.add(b)
                known[b] = None
                h.zero(BLOCK, b * BLOCK)
                known[b] = "zero"
            else:
                h.flush()
            ok += 1
        except nbd.Error as e:
            errors[e.errno or "?"] = errors.get(e.errno or "?", 0) + 1
    h.shutdown()
    with open(model_path, "w") as f:
        json.dump({"known": {str(k): v for k, v in known.items()}, "touched": sorted(touched)}, f)
    print(json.dumps({"ok": ok, "errors": errors}))


def verify(uri, model_path):
    model = json.load(open(model_path))
    h = connect(uri)
    checked = 0
    for k, v in sorted(model["known"].items(), key=lambda kv: int(kv[0])):
        if v is None:
            continue
        want = bytes(BLOCK) if v == "zero" else block_data(v[0], v[1])
        if h.pread(BLOCK, int(k) * BLOCK) != want:
            sys.exit(f"block {k}: does not hold what was acknowledged ({v})")
        checked += 1
    h.shutdown()
    print(f"{checked} acknowledged blocks read back")


def dirty(uri, bitmap, model_path):
    model = json.load(open(model_path))
    ctx = "qemu:dirty-bitmap:" + bitmap
    h = connect(uri, ctx)
    size = h.get_size()
    marked = []  # dirty (start, end) runs
    at = 0
    while at < size:
        step = []

        def extents(metacontext, offset, entries, err):
            if metacontext != ctx:
                return
            for i in range(0, len(entries), 2):
                if entries[i + 1] & 1:
                    marked.append((offset, offset + entries[i]))
                offset += entries[i]
            step.append(sum(entries[0::2]))

        h.block_status(min(size - at, 1 << 30), at, extents)
        if not step or step[0] == 0:
            sys.exit(f"no {ctx} extents at {at}")
        at += step[0]
    h.shutdown()
    for b in model["touched"]:
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        if not any(s <= lo and hi <= e for s, e in marked):
            sys.exit(f"block {b} was written but {bitmap} says clean")
    print(f"{bitmap} covers all {len(model['touched'])} touched blocks")


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "fill" and len(argv) == 6:
        fill(argv[2], int(argv[3]), int(argv[4]), argv[5])
    elif cmd == "verify" and len(argv) == 4:
        verify(argv[2], argv[3])
    elif cmd == "dirty" and len(argv) == 5:
        dirty(argv[2], argv[3], argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
