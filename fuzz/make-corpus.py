#!/usr/bin/env python3
"""Write the fuzz seed corpora from real qemu-img images.

usage: make-corpus.py [FUZZ_DIR]    (default: the directory of this script)
       make-corpus.py --decode INPUT IMAGE   (write the image an input describes,
                                              to look at a reproducer with qemu-img)

- corpus/images: every image of the read matrix (integration/
  make-read-matrix.py builds them with qemu-img and qemu-io), plus images
  with persistent dirty bitmaps, in the sparse layout of fuzz_image.hpp:
  zero runs dropped, runs of one byte value stored as fills, so a seed
  describing a several-MiB image is a few KiB. Shared by the qcow2_read,
  qcow2_write and check targets.
- corpus/transmission: connection facts plus one request of every command
  in every reply mode (the layout fuzz_transmission.cpp reads).
- corpus/config: the example configurations and a few edge cases.

Crash reproducers are added by hand to corpus/TARGET (see docs/testing.md);
this script leaves those alone and rewrites only the files it owns.
"""
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

MAX_IMAGE = 16 << 20   # fuzz_image.hpp kMaxImageBytes
SLACK = 1 << 20        # fuzz_image.hpp kSlackBytes
MAX_SEQUENCE_WORDS = 1 << 18  # fuzz_image.hpp kMaxSequenceWords
MAX_SEED = 64 << 10    # keep every committed seed small


def sparse_encode(data, ops=b""):
    """fuzz_image.hpp layout: u16 ops length, ops, u32 file size, records."""
    data = data[:MAX_IMAGE]
    out = bytearray(struct.pack("<H", len(ops)) + ops + struct.pack("<I", len(data)))

    def literal(start, end):
        # Drop zero runs inside the literal range (the file starts zeroed).
        for m in re.finditer(rb"[^\x00](?:[^\x00]|\x00{1,31}(?=[^\x00]))*", data[start:end], re.S):
            s, e = start + m.start(), start + m.end()
            while s < e:
                n = min(e - s, 0x7EFF)  # 0x7F00-0x7FFF are sequence records
                out.extend(struct.pack("<IH", s, n) + data[s:s + n])
                s += n

    pos = 0
    # Runs of one nonzero byte value, 64-byte multiples (fill records).
    for m in re.finditer(rb"([^\x00])\1{127,}", data, re.S):
        start, length = m.start(), (m.end() - m.start()) // 64 * 64
        literal(pos, start)
        value = data[start]
        done = 0
        while done < length:
            n = min(length - done, 0x7FFF * 64)
            out.extend(struct.pack("<IHB", start + done, 0x8000 + n // 64, value))
            done += n
        pos = start + length
    literal(pos, len(data))
    return bytes(out)


def sparse_decode(blob):
    """The image of a fuzz_image.hpp input (as decode_image_input builds it)."""
    pos = 0

    def take(n):
        nonlocal pos
        b = blob[pos:pos + n]
        pos += n
        return b + bytes(n - len(b))

    (ops_len,) = struct.unpack("<H", take(2))
    pos += ops_len
    (size_field,) = struct.unpack("<I", take(4))
    image = bytearray()
    sequence_words = 0

    def put(off, data):
        if off + len(data) > len(image):
            image.extend(bytes(off + len(data) - len(image)))
        image[off:off + len(data)] = data

    while pos < len(blob):
        off, n = struct.unpack("<IH", take(6))
        if 0x7F00 <= n < 0x8000:
            count, start, step, mult = struct.unpack("<HQIH", take(16))
            stride = 8 * ((n & 0xFF) + 1)
            for i in range(count):
                if sequence_words >= MAX_SEQUENCE_WORDS:
                    break
                at = off + i * stride
                if at + 8 > MAX_IMAGE:
                    break
                put(at, struct.pack(">Q", (start + (i * mult % count) * step) % (1 << 64)))
                sequence_words += 1
            continue
        if n >= 0x8000:
            data = take(1) * ((n - 0x8000) * 64)
        else:
            data = blob[pos:pos + n]
            pos += n
        if off >= MAX_IMAGE:
            continue
        data = data[:MAX_IMAGE - off]
        if not data:
            continue  # as decode_image_input: an empty record sets no size
        put(off, data)
    end = len(image)
    size = max(end, min(size_field, end + SLACK, MAX_IMAGE))
    return bytes(image) + bytes(size - end)


def run(*args, **kw):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, **kw)


def bitmap_images(tmp):
    """qcow2 images with persistent dirty bitmaps (bitmaps extension)."""
    out = []
    for name, cluster in (("bitmaps-c64k", 65536), ("bitmaps-c4k", 4096)):
        path = os.path.join(tmp, name + ".qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, "4M")
        run("qemu-img", "bitmap", "--add", "-g", "65536", path, "enabled")
        run("qemu-img", "bitmap", "--add", "--disable", "-g", "512", path, "disabled")
        run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x11 0 128k", "-c", "write -q -P 0x22 1M 4k", path)
        run("qemu-img", "bitmap", "--add", "-g", "4096", path, "after")
        out.append((name, path))
    return out


def sequence_record(offset, count, start, step, mult, stride=8):
    """A fuzz_image.hpp sequence record: big-endian words start +
    ((i * mult) % count) * step at offset + i * stride."""
    assert stride % 8 == 0 and 8 <= stride <= 2048
    return struct.pack("<IHHQIH", offset, 0x7F00 + stride // 8 - 1, count, start, step, mult)


def scattered_seeds(tmp):
    """Images whose tables name many distinct clusters in a scattered order,
    which literal and fill records cannot say within a 4 KiB input."""
    path = os.path.join(tmp, "small-c512.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "32K")
    with open(path, "rb") as f:
        base = f.read()
    (reftable,) = struct.unpack(">Q", base[48:56])
    cs = 512
    end = (len(base) + cs - 1) // cs * cs
    seeds = {}
    # A refcount table of 8,192 entries (the image's own block first, then
    # distinct blocks every other cluster in a shuffled order).
    n = 8192
    table = end
    first_block = (table + n * 8) // cs
    (block0,) = struct.unpack(">Q", base[reftable:reftable + 8])
    blob = bytearray(sparse_encode(base))
    blob += sequence_record(table + 8, n - 1, first_block * cs, 2 * cs, 4099)
    blob += struct.pack("<IH", table, 8) + struct.pack(">Q", block0)
    blob += struct.pack("<IH", 48, 12) + struct.pack(">QI", table, n * 8 // cs)
    # One byte at the end, so that the file covers every block (the size
    # field alone is capped at 1 MiB past the last record).
    blob += struct.pack("<IH", (first_block + 2 * n) * cs - 1, 1) + b"\0"
    seeds["scattered-refcount-blocks"] = bytes(blob)
    # 4,096 snapshots of 64-byte entries, each naming a 512 KiB L1 table at a
    # scattered cluster (one record per field).
    n = 4096
    snap = end
    blob = bytearray(sparse_encode(base))
    entry = [
        (0, snap + n * 64, 3 * cs, 1031),  # l1_table_offset
        (8, (64 << 10) << 32 | 1 << 16, 0, 1),  # l1_size 64 Ki entries, id_str_size 1, name_size 0
        (32, 16, 0, 1),  # vm_state_size 0, extra_data_size 16
        (48, 32 << 10, 0, 1),  # disk_size
        (56, ord("1") << 56, 0, 1),  # id "1"
    ]
    for field, start, step, mult in entry:
        blob += sequence_record(snap + field, n, start, step, mult, stride=64)
    blob += struct.pack("<IH", 60, 12) + struct.pack(">IQ", n, snap)
    blob[2:6] = struct.pack("<I", snap + n * 64)
    seeds["snapshots-scattered-l1"] = bytes(blob)
    return seeds


def image_seeds(fuzz_dir, tmp):
    spec = importlib.util.spec_from_file_location(
        "make_read_matrix", os.path.join(fuzz_dir, "..", "integration", "make-read-matrix.py"))
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    mdir = os.path.join(tmp, "matrix")
    run(sys.executable, spec.origin, mdir)
    images = []
    with open(os.path.join(mdir, "manifest.tsv")) as f:
        for line in f:
            name, path, fmt = line.rstrip("\n").split("\t")
            if fmt == "qcow2":
                images.append((name, path))
    images += bitmap_images(tmp)
    seeds = scattered_seeds(tmp)
    for name, path in images:
        with open(path, "rb") as f:
            seeds[name] = sparse_encode(f.read())
    return seeds


def transmission_seeds():
    """fuzz_transmission.cpp: facts, then request headers (28 or 32 bytes)."""
    NBD_REQUEST_MAGIC, NBD_EXTENDED_REQUEST_MAGIC = 0x25609513, 0x21E41C71
    seeds = {}
    # HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES, DF, CACHE, FAST_ZERO, BLOCK_STATUS_PAYLOAD
    tflags = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0080 | 0x0400 | 0x0800 | 0x1000
    for mode, mname in ((0, "simple"), (1, "structured"), (2, "extended")):
        facts = struct.pack("<BIHBBBI", 0, 1 << 20, tflags, mode, 3, 9, 32 << 20)
        ext = mode == 2
        for cmd in range(9):
            for flags, fname in ((0, ""), (0x01, "-fua"), (0x08, "-req-one"), (0x20, "-payload"), (0x04, "-df")):
                length = 4096
                if ext:
                    hdr = struct.pack(">IHHQQQ", NBD_EXTENDED_REQUEST_MAGIC, flags, cmd, 7, 4096, length)
                else:
                    hdr = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, 7, 4096, length)
                # Reply-encoder bytes after the header: flags, extents.
                tail = bytes([1, 8, 4]) + b"".join(struct.pack("<BQB", 12, 4096, i % 2) for i in range(4))
                seeds[f"{mname}-cmd{cmd}{fname}"] = facts + hdr + tail
    # decode() and the reply plans: each header is followed by its payload,
    # then the fuzzed device extents the plan is fed (fuzz_transmission.cpp).
    def ext_hdr(flags, cmd, offset, length):
        return struct.pack(">IHHQQQ", NBD_EXTENDED_REQUEST_MAGIC, flags, cmd, 9, offset, length)

    def extents(runs):  # (u8 selector 0: u16 length, u8 flags or hole bit)
        return bytes([len(runs)]) + b"".join(struct.pack("<BHB", 0, n, f) for n, f in runs)
    # has contexts, base:allocation, allocation-depth, two bitmaps (ids 2, 5)
    facts = struct.pack("<BIHBBBI", 0, 1 << 20, tflags, 2, 0x2D, 9, 32 << 20)
    bitmaps = bytes([0, 0]) + extents([(4096, 1), (8192, 0)]) + extents([(65535, 0)])
    seeds["status-payload-filter"] = (
        facts + ext_hdr(0x20, 7, 4096, 16) + struct.pack(">QII", 65536, 0, 5)
        + extents([(4096, 1), (4096, 1), (8192, 2), (65535, 0)]) + bitmaps)
    seeds["status-req-one"] = (
        facts + ext_hdr(0x08, 7, 0, 65536)
        + extents([(4096, 5), (4096, 5), (4096, 0)]) + bitmaps)
    seeds["status-payload-bad"] = (
        facts + ext_hdr(0x20, 7, 0, 16) + struct.pack(">QII", 4096, 5, 5)
        + ext_hdr(0x20, 7, 0, 12) + struct.pack(">QI", 4096, 4)
        + ext_hdr(0x20, 7, 0, 12) + struct.pack(">QI", 0, 0)
        + ext_hdr(0x20, 7, 0, 6) + b"\0" * 6)
    facts = struct.pack("<BIHBBBI", 0, 1 << 20, tflags, 1, 0, 9, 32 << 20)
    hdr = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 0, 9, 8192, 65536)
    seeds["read-holes"] = facts + hdr + extents([(4096, 0), (4096, 1), (512, 1), (8192, 0), (65535, 1)])
    return seeds


def config_seeds(fuzz_dir):
    seeds = {}
    examples = os.path.join(fuzz_dir, "..", "config", "examples")
    for name in sorted(os.listdir(examples)):
        with open(os.path.join(examples, name), "rb") as f:
            seeds["example-" + name] = f.read()
    cases = {
        "unix-listener": {"exports": [{"name": "a", "image": "a.qcow2", "format": "qcow2",
                                       "bitmaps": ["b0"], "allocation_depth": True}],
                          "listeners": [{"type": "unix", "path": "/tmp/q.sock"}],
                          "limits": {"max_connections": 0, "threads": 4,
                                     "max_inflight_bytes_per_connection": 65536}},
        "duplicate-names": {"exports": [{"name": "x", "image": "a"}, {"name": "x", "image": "b"}]},
        "bad-types": {"exports": [{"name": 1, "image": True, "read_only": "yes"}]},
    }
    for name, value in cases.items():
        seeds[name + ".json"] = json.dumps(value).encode()
    seeds["syntax-error.json"] = b'{"exports": [ {"image": "a", } ]'
    seeds["deep.json"] = b"[" * 200 + b"]" * 200
    return seeds


def write(dirpath, seeds, prefix):
    os.makedirs(dirpath, exist_ok=True)
    for old in os.listdir(dirpath):
        if old.startswith(prefix):
            os.unlink(os.path.join(dirpath, old))
    for name, data in sorted(seeds.items()):
        if len(data) > MAX_SEED:
            print(f"skip {name}: {len(data)} bytes", file=sys.stderr)
            continue
        with open(os.path.join(dirpath, prefix + name), "wb") as f:
            f.write(data)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--decode":
        with open(sys.argv[2], "rb") as f, open(sys.argv[3], "wb") as out:
            out.write(sparse_decode(f.read()))
        return
    fuzz_dir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
    corpus = os.path.join(fuzz_dir, "corpus")
    tmp = tempfile.mkdtemp(prefix="qnbd-corpus-")
    try:
        write(os.path.join(corpus, "images"), image_seeds(fuzz_dir, tmp), "seed-")
    finally:
        shutil.rmtree(tmp)
    write(os.path.join(corpus, "transmission"), transmission_seeds(), "seed-")
    write(os.path.join(corpus, "config"), config_seeds(fuzz_dir), "seed-")


if __name__ == "__main__":
    main()
