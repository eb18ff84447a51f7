#!/usr/bin/env python3
"""One case of test-serve-prealloc-guess.sh: print what BLOCK_STATUS says
about a data cluster whose head is a hole in the host file.

  prealloc_guess.py URI FIRST

FIRST is the first request after the connection (none, read,
zero_partial, zero_full, write_partial, write_full, trim, flush,
block_status); then 60 whole clusters of data are written (the file's
allocation now matches its refcounts), then 512 bytes into a fresh cluster
(both servers zero its copy-on-write head and tail with ZERO_RANGE, which
leaves a hole in the host file), and the status of that cluster is
printed: "zero-head" where the server asks the host file (QEMU's
metadata-preallocation guess said yes when it was made), "data" where it
does not.
"""
import sys

import nbd

C = 65536


def main(uri, first):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    if first == "read":
        h.pread(4096, 0)
    elif first == "zero_partial":
        h.zero(4096, 100 * C + 4096)
    elif first == "zero_full":
        h.zero(C, 100 * C)
    elif first == "write_partial":
        h.pwrite(b"\1" * 512, 101 * C + 4096)
    elif first == "write_full":
        h.pwrite(b"\1" * C, 101 * C)
    elif first == "trim":
        h.trim(C, 100 * C)
    elif first == "flush":
        h.flush()
    elif first == "block_status":
        h.block_status(C, 0, lambda *a: 0)
    elif first != "none":
        raise SystemExit(f"unknown first request {first}")
    h.pwrite(b"\2" * (60 * C), 120 * C)
    h.pwrite(b"\3" * 512, 200 * C + 32768)
    ext = []
    h.block_status(C, 200 * C, lambda meta, off, entries, err: ext.extend(entries) or 0)
    # NBD_STATE_ZERO on the first extent: the head reads as a hole.
    print("zero-head" if ext[1] & 2 else "data")
    h.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
