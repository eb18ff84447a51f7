#!/usr/bin/env python3
"""Compare two `nbdinfo --map` outputs (qemu-nbd's and qnbd's).

usage: compare-nbdinfo-map.py REFERENCE.txt CANDIDATE.txt

Each line of nbdinfo --map is "OFFSET LENGTH TYPE DESCRIPTION". Semantic
agreement: after merging neighbours with the same TYPE, both list the same
ranges with the same TYPE (how a server splits extents is its choice).
Prints "exact=yes|no semantic=yes|no" first; exit 0 iff semantic agreement.
"""
import sys


def parse(path):
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(None, 3)
            if len(fields) < 3:
                raise ValueError(f"{path}:{n}: cannot parse {line!r}")
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return out


def merged(extents, label):
    out = []
    pos = 0
    for start, length, kind in extents:
        if start != pos:
            raise ValueError(f"{label}: extent at {start} does not follow the previous end {pos}")
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], start + length, kind)
        else:
            out.append((start, start + length, kind))
        pos = start + length
    return out


def main():
    with open(sys.argv[1]) as f:
        ref_text = f.read()
    with open(sys.argv[2]) as f:
        cand_text = f.read()
    exact = ref_text == cand_text
    try:
        ref = merged(parse(sys.argv[1]), "qemu-nbd")
        cand = merged(parse(sys.argv[2]), "qnbd")
    except ValueError as e:
        print(f"exact={'yes' if exact else 'no'} semantic=no")
        print(f"  {e}")
        return 1
    semantic = ref == cand
    print(f"exact={'yes' if exact else 'no'} semantic={'yes' if semantic else 'no'}")
    if not semantic:
        shown = 0
        for i in range(max(len(ref), len(cand))):
            r = ref[i] if i < len(ref) else None
            c = cand[i] if i < len(cand) else None
            if r != c:
                print(f"  qemu-nbd: {r}  qnbd: {c}")
                shown += 1
                if shown == 3:
                    break
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
