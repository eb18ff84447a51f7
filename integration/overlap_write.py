#!/usr/bin/env python3
"""One WRITE (or WRITE_ZEROES, or TRIM) over NBD, then a READ on the same
connection.

usage: overlap_write.py URI OFFSET LENGTH [PAYLOAD_FILE | --zero | --trim]

Writes LENGTH bytes at OFFSET (the start of PAYLOAD_FILE, zero-padded, or
0x5a bytes; --zero: a WRITE_ZEROES without NO_HOLE, --trim: a TRIM), then
reads 4 KiB at offset 1 MiB. Prints two words: the
write's outcome ("ok" or the errno name, e.g. EIO) and the read's ("ok" or
the errno name).
"""
import errno
import sys

import nbd


def outcome(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "error"


def main():
    uri, offset, length = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0)
    op = sys.argv[4] if len(sys.argv) > 4 else None
    if op not in (None, "--zero", "--trim"):
        with open(op, "rb") as f:
            data = f.read(length)
        data += bytes(length - len(data))
    else:
        data = b"\x5a" * length
    h = nbd.NBD()
    h.connect_uri(uri)
    if op == "--zero":
        w = outcome(lambda: h.zero(length, offset))
    elif op == "--trim":
        w = outcome(lambda: h.trim(length, offset))
    else:
        w = outcome(lambda: h.pwrite(data, offset))
    r = outcome(lambda: h.pread(4096, 1 << 20))
    print(w, r)
    h.shutdown()


if __name__ == "__main__":
    main()
