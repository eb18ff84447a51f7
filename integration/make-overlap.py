#!/usr/bin/env python3
"""Build the four corrupt qcow2 images of the metadata overlap test.

usage: make-overlap.py OUTDIR

Each image is made by qemu-img (64 KiB clusters, 4 MiB: header at 0, refcount
table at 0x10000, refcount block at 0x20000, L1 table at 0x30000), written to
by qemu-io where the case needs an L2 table, then patched so that
`qemu-img check` reports corruptions:
  a.qcow2  refcount(cluster 0) = 0, no L2 table: the first allocation (a new
           L2 table) would land on the header;
  b.qcow2  refcount(cluster 0) = 0 with an L2 table: a new data cluster
           would land on the header;
  c.qcow2  L2 entry of guest cluster 0 = 0x20000 | COPIED: an in-place
           write would overwrite the refcount block;
  d.qcow2  refcount table entry 0 = 0x30000: the L1 table would be read and
           rewritten as a refcount block.
Field offsets are those of docs/interop/qcow2.txt ("Header", "Host cluster
management", "Cluster mapping").
"""
import os
import struct
import subprocess
import sys

CS = 1 << 16
REFTABLE, REFBLOCK, L1 = 0x10000, 0x20000, 0x30000
COPIED = 1 << 63


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def read_be64(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def create(path, data=False):
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", path, "4M")
    if data:
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", path)
    # The layout the patches below rely on.
    assert read_be64(path, 40) == L1 and read_be64(path, 48) == REFTABLE
    assert read_be64(path, REFTABLE) == REFBLOCK


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    p = lambda name: os.path.join(out, name)

    create(p("a.qcow2"))
    patch(p("a.qcow2"), REFBLOCK, ">H", 0)  # refcount_bits 16: entry 0

    create(p("b.qcow2"), data=True)
    patch(p("b.qcow2"), REFBLOCK, ">H", 0)

    create(p("c.qcow2"), data=True)
    l2 = read_be64(p("c.qcow2"), L1) & 0x00FFFFFFFFFFFE00
    assert l2 != 0
    patch(p("c.qcow2"), l2, ">Q", REFBLOCK | COPIED)

    create(p("d.qcow2"), data=True)
    patch(p("d.qcow2"), REFTABLE, ">Q", L1)


if __name__ == "__main__":
    main()
