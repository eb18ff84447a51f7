#!/usr/bin/env python3
"""Normalise a bitmap map to merged runs, one "START LENGTH DIRTY" per line.

usage: norm-bitmap-map.py FILE.json
       norm-bitmap-map.py --named NAME=FILE.json...   (each map after a "NAME:" line)
Accepts `nbdinfo --map=qemu:dirty-bitmap:NAME --json` output (offset, type)
and `qnbd map --bitmap NAME --output=json` output (start, dirty). Runs must
be consecutive from 0; neighbours with the same state are merged, since how
a server splits runs is its own choice.
"""
import json
import sys


def normalise(path):
    with open(path) as f:
        entries = json.load(f)
    runs = []
    pos = 0
    for e in entries:
        start = e["offset"] if "offset" in e else e["start"]
        dirty = bool(e["type"] & 1) if "type" in e else bool(e["dirty"])
        if start != pos:
            sys.exit(f"{path}: run at {start} does not follow the previous one (expected {pos})")
        if e["length"] <= 0:
            sys.exit(f"{path}: empty run at {start}")
        if runs and runs[-1][2] == dirty:
            runs[-1][1] += e["length"]
        else:
            runs.append([start, e["length"], dirty])
        pos = start + e["length"]
    for start, length, dirty in runs:
        print(start, length, "dirty" if dirty else "clean")


def main():
    # --named: several maps in one run (a test comparing many bitmaps pays
    # one interpreter start, not one per bitmap).
    if sys.argv[1] == "--named":
        for arg in sys.argv[2:]:
            name, path = arg.split("=", 1)
            print(f"{name}:")
            normalise(path)
    else:
        normalise(sys.argv[1])


main()
