#!/usr/bin/env python3
"""Seeded NBD writer for test-kill.sh: writes, zeroes, trims and flushes
until the server goes away, keeping the record the test needs to judge the
image after a SIGKILL:

  EXPECT   the whole guest view as of the last successful flush
           (replaced atomically after each flush)
  PENDING  one "offset length KIND [FILL]" line per request sent since
           that flush, written before the request goes out (KIND: w a
           write whose byte at image offset p is (FILL + p // 512) & 0xff,
           z zeroes, t a trim): after the kill each of those bytes holds
           its flushed value or the value of one of them (a trimmed byte:
           anything), never something no request wrote.

Usage: kill_writer.py URI SEED EXPECT PENDING
Exit status 0 when the connection broke (the expected end), 1 on a failed
request or a data mismatch while the server was alive.
"""
import os
import random
import sys

import nbd


def main():
    uri, seed, expect_path, pending_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    model = bytearray(h.pread(size, 0))

    def save_flushed():
        tmp = expect_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(model)
        os.replace(tmp, expect_path)
        with open(pending_path, "w"):
            pass

    save_flushed()  # what the image held at connect is durable already
    pending = open(pending_path, "a")
    try:
        while True:
            kind = rng.randrange(100)
            length = rng.randrange(1, 200000 if rng.randrange(6) == 0 else 20000)
            off = rng.randrange(0, size - length + 1)
            if rng.randrange(2) == 0:
                off -= off % 512
                length = max(512, length - length % 512)
            if kind < 12:
                h.flush()
                pending.close()
                save_flushed()
                pending = open(pending_path, "a")
                continue
            if kind < 65:
                fill = rng.randrange(256)
                pending.write(f"{off} {length} w {fill}\n")
            else:
                pending.write(f"{off} {length} {'z' if kind < 85 else 't'}\n")
            pending.flush()
            if kind < 65:
                buf = bytes((fill + (off + i) // 512) & 0xFF for i in range(length))
                h.pwrite(buf, off, nbd.CMD_FLAG_FUA if rng.randrange(8) == 0 else 0)
                model[off:off + length] = buf
            elif kind < 85:
                h.zero(length, off, 0 if rng.randrange(2) else nbd.CMD_FLAG_NO_HOLE)
                model[off:off + length] = bytes(length)
            else:
                h.trim(length, off)
                # Trimmed contents are unspecified: adopt what reads back.
                model[off:off + length] = h.pread(length, off)
            # Our own write must read back while the server lives.
            if rng.randrange(4) == 0 and h.pread(length, off) != model[off:off + length]:
                print(f"kill_writer: read-back mismatch at {off}+{length}", file=sys.stderr)
                return 1
    except nbd.Error as e:
        if h.aio_is_dead() or h.aio_is_closed():
            print(f"kill_writer: connection ended: {e}", file=sys.stderr)
            return 0  # the server was killed: the expected end
        # The server lives but refused a request: that is a bug.
        print(f"kill_writer: request failed while the server lives: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
