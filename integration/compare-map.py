#!/usr/bin/env python3
"""Compare two `map --output=json` listings (qemu-img's and qnbd's).

usage: compare-map.py REFERENCE.json CANDIDATE.json [SIZE]

Exit 0 when both describe the same guest bytes the same way: every byte
falls in the same (data, zero) class in both, after adjacent ranges of one
class are merged (so how each tool splits ranges does not matter). Exit 1
otherwise, printing the first differences. The first stdout line is always
"exact=yes|no semantic=yes|no": exact means the parsed JSON is identical
(every key, including depth, present and offset, and the same range splits).
"""
import json
import sys


def load(path):
    with open(path) as f:
        text = f.read()
    return json.loads(text)


def classes(entries, label):
    """[(start, end, data, zero)] merged, checking the ranges tile [0, end)."""
    out = []
    pos = 0
    for e in entries:
        start, length = int(e["start"]), int(e["length"])
        if start != pos:
            raise ValueError(f"{label}: range at {start} does not follow the previous end {pos}")
        if length <= 0:
            raise ValueError(f"{label}: empty range at {start}")
        cls = (bool(e["data"]), bool(e["zero"]))
        if out and out[-1][2:] == cls:
            out[-1] = (out[-1][0], start + length) + cls
        else:
            out.append((start, start + length) + cls)
        pos = start + length
    return out


def describe(c):
    start, end, data, zero = c
    return f"[{start}, {end}) data={str(data).lower()} zero={str(zero).lower()}"


def main():
    ref_raw, cand_raw = load(sys.argv[1]), load(sys.argv[2])
    exact = ref_raw == cand_raw
    try:
        ref = classes(ref_raw, "reference")
        cand = classes(cand_raw, "candidate")
    except (ValueError, KeyError, TypeError) as e:
        print(f"exact={'yes' if exact else 'no'} semantic=no")
        print(f"  malformed map: {e}")
        return 1
    semantic = ref == cand
    print(f"exact={'yes' if exact else 'no'} semantic={'yes' if semantic else 'no'}")
    if not semantic:
        shown = 0
        for i in range(max(len(ref), len(cand))):
            r = ref[i] if i < len(ref) else None
            c = cand[i] if i < len(cand) else None
            if r != c:
                print(f"  qemu-img: {describe(r) if r else '(none)'}")
                print(f"  qnbd:     {describe(c) if c else '(none)'}")
                shown += 1
                if shown == 3:
                    break
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
