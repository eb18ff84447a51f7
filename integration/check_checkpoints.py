#!/usr/bin/env python3
"""Check checkpoint bitmaps against the writers' log (test-control-checkpoint.sh).

usage: check_checkpoints.py LOG.json MAPDIR EXPORT...
MAPDIR/EXPORT.cI.json is `nbdinfo --json --map=qemu:dirty-bitmap:cI` for
I in 0..20. For every export and checkpoint cI (0 < I <= 20: the bitmap
disabled by checkpoint I+1, or c20 stored at the clean stop):
- each request is in exactly one bitmap cK;
- a request acknowledged before checkpoint I's call started is not in cI
  or later (it is in a bitmap before I);
- a request sent after checkpoint I's call returned is in cI or later;
- the bitmaps hold nothing but the requests' granules.
"""
import json
import sys

log_path, mapdir, *exports = sys.argv[1:]
GRANULE = 4096
log = json.load(open(log_path))
cps = log["checkpoints"]
errors = []
for export in exports:
    holder = {}
    for i in range(0, len(cps) + 1):
        for e in json.load(open(f"{mapdir}/{export}.c{i}.json")):
            if e["type"] & 1 == 0:
                continue
            for g in range(e["offset"] // GRANULE, (e["offset"] + e["length"]) // GRANULE):
                if g in holder:
                    errors.append(f"{export}: granule {g} in c{holder[g]} and c{i}")
                holder[g] = i
    written = set()
    for r in log["requests"]:
        if r["export"] != export:
            continue
        g = r["offset"] // GRANULE
        written.add(g)
        k = holder.get(g)
        if k is None:
            errors.append(f"{export}: write at {r['offset']} (sent {r['sent']:.6f}, acked {r['acked']:.6f}) missed")
            continue
        # In cK: after checkpoint K (1-based index K-1 in cps), before checkpoint K+1.
        if k >= 1 and r["acked"] < cps[k - 1]["start"]:
            errors.append(f"{export}: write at {r['offset']} acked before checkpoint c{k} started, yet in c{k}")
        if k < len(cps) and r["sent"] > cps[k]["end"]:
            errors.append(f"{export}: write at {r['offset']} sent after checkpoint c{k + 1} returned, yet in c{k}")
    extra = set(holder) - written
    if extra:
        errors.append(f"{export}: {len(extra)} dirty granules no request wrote, e.g. {sorted(extra)[:3]}")
for e in errors[:20]:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
