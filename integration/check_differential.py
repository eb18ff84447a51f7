#!/usr/bin/env python3
"""qnbd check against qemu-img check on randomly damaged images.

  check_differential.py QNBD WORKDIR CASES SEED [REPAIR]

Builds five small images with qemu-img and qemu-io (4 KiB clusters with a
snapshot and compressed clusters, 64 KiB clusters with extended L2 entries,
512-byte clusters with 1-bit refcounts, a version 2 image, 64-bit
refcounts), then per case overwrites one to three 8-byte words of the
active L1 table, an L2 table, the refcount table or a refcount block with a
value drawn from what damage looks like (zero, flags alone, aligned and
unaligned offsets inside and past the file, random bits), and runs
`check` (no repair) with both tools. The exit status and the whole output
(stdout and stderr, with the program name normalised) must be identical,
and so must the status and counts of `check --output=json`.

With REPAIR (leaks or all), each tool repairs its own copy with `check -r
REPAIR` instead, and qemu-img check then judges both results: qnbd's
repair may leave no more corruptions and leaks than qemu-img's, and qnbd
may exit 0 only when what it leaves is clean. (Where qemu-img's repair
stops on its metadata overlap check, qnbd's usually gets further; the
outputs are not compared.)

The header and the snapshot table are not damaged here: where a damaged
header stops the image from opening, qnbd's one-line reasons are worded
differently from qemu-img's on purpose (test-malformed.sh covers them), and
qemu-img's snapshot-table diagnostics at open are not all reproduced.
Prints one line per mismatch (the image is kept in WORKDIR) and a summary;
exits 1 on any mismatch.
"""
import json
import os
import random
import shutil
import struct
import subprocess
import sys

qnbd, work, cases, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
repair = sys.argv[5] if len(sys.argv) > 5 else None
os.makedirs(work, exist_ok=True)


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def make(name, opts, cmds, snapshot=False):
    path = os.path.join(work, name + ".qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, "4M")
    run("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], path)
    if snapshot:
        run("qemu-img", "snapshot", "-c", "s1", path)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 9 8k 4k", path)
    return path


bases = [
    make("std4k", "cluster_size=4k",
         ["write -P 1 0 32k", "write -c -P 2 64k 4k", "write -P 4 1M 8k", "write -z 2M 8k"], snapshot=True),
    make("ext64k", "cluster_size=64k,extended_l2=on",
         ["write -P 1 0 8k", "write -P 2 100k 4k", "write -z 1M 64k", "write -P 4 2M 64k"]),
    make("c512", "cluster_size=512,refcount_bits=1", ["write -P 1 0 3k", "write -P 2 9k 2k", "write -c -P 3 20k 512"]),
    make("v2", "compat=0.10,cluster_size=4k", ["write -P 1 0 16k", "write -P 2 1M 4k"], snapshot=True),
    make("rc64", "cluster_size=4k,refcount_bits=64", ["write -P 1 0 16k", "write -c -P 2 64k 4k"]),
]
for b in bases:
    r = run("qemu-img", "check", b)
    if r.returncode != 0:
        sys.exit(f"base image {b} is not clean: {r.stdout}{r.stderr}")


def be64(d, o):
    return struct.unpack_from(">Q", d, o)[0]


def be32(d, o):
    return struct.unpack_from(">I", d, o)[0]


def regions(d):
    """(offset, length) of the metadata this test damages."""
    cs = 1 << be32(d, 20)
    l1, l1_size = be64(d, 40), be32(d, 36)
    out = [(l1, l1_size * 8)]
    for i in range(l1_size):
        o = be64(d, l1 + 8 * i) & 0x00FFFFFFFFFFFE00
        if o and o + cs <= len(d):
            out.append((o, cs))
    rt = be64(d, 48)
    out.append((rt, min(be32(d, 56) * cs, 4096)))
    for i in range(64):
        o = be64(d, rt + 8 * i) & ~0x1FF
        if o and o + cs <= len(d):
            out.append((o, min(cs, 4096)))
    return out, cs


def damage(rng, size, cs):
    clusters = size // cs + 4
    kind = rng.randrange(10)
    return [
        0,
        rng.getrandbits(64),
        (1 << 63) | rng.randrange(clusters) * cs,
        (1 << 63) | (rng.randrange(clusters) * cs + rng.choice([512, 1, 8])),
        rng.randrange(clusters) * cs,
        (1 << 62) | rng.getrandbits(40),
        1,
        rng.choice([1 << 63, 1 << 62, 0x8000000000000001, 0xFFFFFFFFFFFFFFFF]),
        rng.randrange(1, 8),
        rng.getrandbits(16),
    ][kind]


def json_counts(result):
    """The exit status and the counts of a `check --output=json` run."""
    try:
        j = json.loads(result.stdout)
    except ValueError:
        return (result.returncode, None)
    keys = ("check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "image-end-offset",
            "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters")
    return (result.returncode,) + tuple(j.get(k) for k in keys)


def problems_left(path):
    """corruptions + leaks that qemu-img check finds, None if it cannot say."""
    r = run("qemu-img", "check", "--output=json", path)
    try:
        j = json.loads(r.stdout)
    except ValueError:
        return None
    if j.get("check-errors", 0):
        return None
    return j.get("corruptions", 0) + j.get("leaks", 0)


rng = random.Random(seed)
mismatches = 0
for case in range(cases):
    base = rng.choice(bases)
    d = bytearray(open(base, "rb").read())
    where, cs = regions(d)
    for _ in range(rng.randrange(1, 4)):
        offset, length = rng.choice(where)
        at = offset + rng.randrange(length // 8) * 8
        struct.pack_into(">Q", d, at, damage(rng, len(d), cs))
    path = os.path.join(work, "case.qcow2")
    with open(path, "wb") as f:
        f.write(d)
    if repair:
        theirs_path = os.path.join(work, "case-qemu.qcow2")
        shutil.copy(path, theirs_path)
        ours = run(qnbd, "check", "-r", repair, path)
        run("qemu-img", "check", "-r", repair, theirs_path)
        left, theirs_left = problems_left(path), problems_left(theirs_path)
        why = None
        if left is None and theirs_left is not None:
            why = "qemu-img check cannot read qnbd's result (it can read qemu-img's)"
        elif theirs_left is not None and left > theirs_left:
            why = f"qnbd leaves {left} corruptions + leaks, qemu-img {theirs_left}"
        elif ours.returncode == 0 and left != 0:  # (None too: unreadable)
            why = f"qnbd exits 0 but leaves {left} corruptions + leaks"
        if why:
            mismatches += 1
            kept = os.path.join(work, f"mismatch-{seed}-{case}.qcow2")
            with open(kept, "wb") as f:
                f.write(d)
            print(f"MISMATCH case {case} ({os.path.basename(base)}), -r {repair}: {why}; image kept: {kept}")
        continue
    ours_json = run(qnbd, "check", "--output=json", path)
    theirs_json = run("qemu-img", "check", "--output=json", path)
    if json_counts(ours_json) != json_counts(theirs_json):
        mismatches += 1
        kept = os.path.join(work, f"mismatch-{seed}-{case}.qcow2")
        shutil.copy(path, kept)
        print(f"MISMATCH case {case} ({os.path.basename(base)}), --output=json: qnbd {json_counts(ours_json)}, "
              f"qemu-img {json_counts(theirs_json)}; image kept: {kept}")
        continue
    ours, theirs = run(qnbd, "check", path), run("qemu-img", "check", path)
    a = (ours.returncode, ours.stdout, ours.stderr.replace("qnbd: ", "PROG: "))
    b = (theirs.returncode, theirs.stdout, theirs.stderr.replace("qemu-img: ", "PROG: "))
    if a != b:
        mismatches += 1
        kept = os.path.join(work, f"mismatch-{seed}-{case}.qcow2")
        shutil.copy(path, kept)
        first = next((x for x, y in zip((a[2] + a[1]).splitlines(), (b[2] + b[1]).splitlines()) if x != y), "")
        print(f"MISMATCH case {case} ({os.path.basename(base)}): status qnbd={a[0]} qemu-img={b[0]}; "
              f"first differing line of qnbd: {first[:160]!r}; image kept: {kept}")
print(f"{cases} cases (seed {seed}{', -r ' + repair if repair else ''}), {mismatches} mismatches")
sys.exit(1 if mismatches else 0)
