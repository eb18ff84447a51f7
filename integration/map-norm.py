#!/usr/bin/env python3
"""The one map normaliser of the integration tests: block maps and bitmap
maps as each tool prints them, reduced to merged runs (how a tool or server
splits ranges is its own choice), checked to tile [0, end) without gaps or
empty runs.

usage: map-norm.py img REFERENCE.json CANDIDATE.json
           `map --output=json` of qemu-img vs qnbd: every byte in the same
           (data, zero) class in both.
       map-norm.py layout REFERENCE.json CANDIDATE.json
           `qemu-img map --output=json` of two images (one qemu-nbd wrote,
           one qnbd wrote): every byte with the same depth, presence,
           data and zero flags, and a host offset in both or in neither
           (where a host cluster lands is each writer's own choice).
       map-norm.py nbdinfo REFERENCE.txt CANDIDATE.txt
           `nbdinfo --map` ("OFFSET LENGTH TYPE DESCRIPTION") of qemu-nbd vs
           qnbd: the same ranges with the same TYPE.
       map-norm.py bitmap FILE.json
       map-norm.py bitmap --named NAME=FILE.json...
           print a bitmap map as "START LENGTH dirty|clean" lines (after a
           "NAME:" line each with --named), from `nbdinfo
           --map=qemu:dirty-bitmap:NAME --json` (offset, type) or `qnbd map
           --bitmap NAME --output=json` (start, dirty).

The compare modes print "exact=yes|no semantic=yes|no" first (exact: the
unmerged maps are identical), then the first differences; exit 0 iff the
merged maps agree. The bitmap mode exits non-zero on a malformed map.
"""
import json
import sys


def merge(runs, label):
    """[(start, length, cls)] -> [(start, end, cls)] with equal neighbours
    merged; raises ValueError unless the runs tile [0, end)."""
    out = []
    pos = 0
    for start, length, cls in runs:
        if start != pos:
            raise ValueError(f"{label}: range at {start} does not follow the previous end {pos}")
        if length <= 0:
            raise ValueError(f"{label}: empty range at {start}")
        if out and out[-1][2] == cls:
            out[-1] = (out[-1][0], start + length, cls)
        else:
            out.append((start, start + length, cls))
        pos = start + length
    return out


# --- img: qemu-img / qnbd map --output=json -------------------------------

def img_runs(path):
    with open(path) as f:
        entries = json.load(f)
    return entries, [(int(e["start"]), int(e["length"]), (bool(e["data"]), bool(e["zero"])))
                     for e in entries]


def img_describe(r):
    start, end, (data, zero) = r
    return f"[{start}, {end}) data={str(data).lower()} zero={str(zero).lower()}"


def layout_runs(path):
    with open(path) as f:
        entries = json.load(f)
    return entries, [(int(e["start"]), int(e["length"]),
                      (int(e["depth"]), bool(e["present"]), bool(e["data"]), bool(e["zero"]), "offset" in e))
                     for e in entries]


def layout_describe(r):
    start, end, (depth, present, data, zero, offset) = r
    return (f"[{start}, {end}) depth={depth} present={str(present).lower()} data={str(data).lower()} "
            f"zero={str(zero).lower()} offset={'yes' if offset else 'no'}")


# --- nbdinfo: nbdinfo --map text ------------------------------------------

def nbdinfo_runs(path):
    with open(path) as f:
        text = f.read()
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(None, 3)
        if len(fields) < 3:
            raise ValueError(f"{path}:{n}: cannot parse {line!r}")
        out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return text, out


def compare(load, labels, describe, ref_path, cand_path):
    ref_raw = cand_raw = None
    try:
        ref_raw, ref_runs = load(ref_path)
        cand_raw, cand_runs = load(cand_path)
        exact = ref_raw == cand_raw
        ref = merge(ref_runs, labels[0])
        cand = merge(cand_runs, labels[1])
    except (ValueError, KeyError, TypeError) as e:
        exact = ref_raw is not None and ref_raw == cand_raw
        print(f"exact={'yes' if exact else 'no'} semantic=no")
        print(f"  malformed map: {e}")
        return 1
    semantic = ref == cand
    print(f"exact={'yes' if exact else 'no'} semantic={'yes' if semantic else 'no'}")
    if semantic:
        return 0
    shown = 0
    width = max(len(labels[0]), len(labels[1])) + 1
    for i in range(max(len(ref), len(cand))):
        r = ref[i] if i < len(ref) else None
        c = cand[i] if i < len(cand) else None
        if r != c:
            print(f"  {labels[0] + ':':{width}} {describe(r) if r else '(none)'}")
            print(f"  {labels[1] + ':':{width}} {describe(c) if c else '(none)'}")
            shown += 1
            if shown == 3:
                break
    return 1


# --- bitmap: dirty-bitmap maps --------------------------------------------

def bitmap_print(path):
    with open(path) as f:
        entries = json.load(f)
    runs = []
    for e in entries:
        start = e["offset"] if "offset" in e else e["start"]
        dirty = bool(e["type"] & 1) if "type" in e else bool(e["dirty"])
        runs.append((start, e["length"], dirty))
    try:
        merged = merge(runs, path)
    except ValueError as e:
        sys.exit(str(e))
    for start, end, dirty in merged:
        print(start, end - start, "dirty" if dirty else "clean")


def main(argv):
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "img" and len(argv) == 4:
        return compare(img_runs, ("qemu-img", "qnbd"), img_describe, argv[2], argv[3])
    if mode == "layout" and len(argv) == 4:
        return compare(layout_runs, ("qemu-nbd", "qnbd"), layout_describe, argv[2], argv[3])
    if mode == "nbdinfo" and len(argv) == 4:
        return compare(nbdinfo_runs, ("qemu-nbd", "qnbd"), str, argv[2], argv[3])
    if mode == "bitmap" and len(argv) >= 3:
        # --named: many maps for one interpreter start.
        if argv[2] == "--named":
            for arg in argv[3:]:
                name, path = arg.split("=", 1)
                print(f"{name}:")
                sys.stdout.flush()
                bitmap_print(path)
        else:
            bitmap_print(argv[2])
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
