#!/usr/bin/env python3
"""First sectors for test-serve-probed-raw.sh: which ones a probed raw
export refuses to take.

  probe_sectors.py URI table          the signature of every format QEMU 7.2
                                      probes, and near misses
  probe_sectors.py URI random SEED N  N sectors made by mutating those
                                      signatures (bytes changed, inserted,
                                      deleted, pieces of other signatures)

Writes each sector at offset 0 of the export (then zeroes again) and prints
one line per sector, "NAME: OK" or "NAME: ERRNO". The caller runs it
against qemu-nbd and qnbd and compares the output.
"""
import errno
import random
import struct
import sys

import nbd

CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
BOCHS = (b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0") +
         b"Growing".ljust(16, b"\0"))
VDI = b"<<< QEMU VM Virtual Disk Image >>>\n".ljust(64, b"\0")

TABLE = {
    "qcow2": b"QFI\xfb\0\0\0\3", "qcow2-v9": b"QFI\xfb\0\0\0\x09", "qcow": b"QFI\xfb\0\0\0\1",
    "qcow-v0": b"QFI\xfb\0\0\0\0", "qed": b"QED\0", "qed-miss": b"QEDx",
    "vmdk4": b"KDMV", "vmdk3": b"COWD", "vmdk-miss": b"KDMW",
    "vmdk-descriptor": b"# Disk DescriptorFile\nversion=1\nRW 8 FLAT \"/etc/passwd\" 0\n",
    "vmdk-v2-blank-lines": b"#\n   \n  \r\nversion=2\n", "vmdk-v3-crlf": b"version=3\r\n",
    "vmdk-v4": b"version=4\n", "vmdk-empty-line": b"\nversion=1\n", "vmdk-no-eol": b"version=1",
    "vdi": VDI + struct.pack("<I", 0xbeda107f), "vdi-miss": VDI + struct.pack("<I", 0xbeda107e),
    "vpc": b"conectix", "vpc-miss": b"conectiX", "vhdx": b"vhdxfile", "vhdx-miss": b"vhdxfil",
    "luks": b"LUKS\xba\xbe\0\1", "luks-v2": b"LUKS\xba\xbe\0\2",
    "parallels": b"WithoutFreeSpace" + struct.pack("<I", 2),
    "parallels-ext": b"WithouFreSpacExt" + struct.pack("<I", 2),
    "parallels-v1": b"WithoutFreeSpace" + struct.pack("<I", 1),
    "bochs-v2": BOCHS + struct.pack("<I", 0x20000), "bochs-v1": BOCHS + struct.pack("<I", 0x10000),
    "bochs-v3": BOCHS + struct.pack("<I", 0x30000), "cloop": CLOOP, "cloop-miss": CLOOP[:-1],
    "text": b"hello world\n", "zeroes": b"",
}
# What mutations draw from: the signatures' own bytes.
ALPHABET = b"#\n\r =version123QFIEDKMVCOWLUKS\0\x01\x02\xfb\xba\xbe"


def mutated(rnd, seeds):
    b = bytearray(rnd.choice(seeds))
    if rnd.random() < 0.5:
        b = b.ljust(512, b"\0")
    for _ in range(rnd.randint(0, 3)):
        k = rnd.random()
        i = rnd.randrange(len(b)) if b else 0
        if k < 0.4 and b:
            b[i] = rnd.choice(ALPHABET)
        elif k < 0.6:
            b[i:i] = bytes([rnd.choice(ALPHABET)])
        elif k < 0.8 and b:
            del b[i]
        else:
            b[i:i] = rnd.choice(seeds)[:rnd.randint(1, 12)]
    return bytes(b[:512])


def main():
    uri, mode = sys.argv[1], sys.argv[2]
    if mode == "table":
        rows = list(TABLE.items())
    else:
        rnd = random.Random(int(sys.argv[3]))
        seeds = [v for v in TABLE.values() if v]
        rows = [(f"random-{i}", mutated(rnd, seeds)) for i in range(int(sys.argv[4]))]
    h = nbd.NBD()
    h.connect_uri(uri)
    for name, head in rows:
        try:
            h.pwrite(head.ljust(512, b"\0"), 0)
            print(f"{name}: OK")
        except nbd.Error as e:
            print(f"{name}: {errno.errorcode.get(e.errnum, e.errnum)}")
        h.pwrite(bytes(512), 0)


main()
