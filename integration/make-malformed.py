#!/usr/bin/env python3
"""Build malformed qcow2 images by patching valid ones made by qemu-img.

usage: make-malformed.py OUTDIR

Writes OUTDIR/manifest.tsv, one line per case:
  NAME<TAB>PATH<TAB>SCOPE<TAB>KEYWORDS<TAB>EXTRA_ARGS
SCOPE says which commands must refuse the image:
  open   - the defect is in metadata read when the image is opened (header,
           extensions, table locations, backing chain, bitmap directory,
           snapshot table): `qnbd info` and `qnbd convert` must both fail;
  valid  - a control: the unpatched image, both commands must succeed;
  data   - the defect is in an L1/L2 entry or in cluster data, which only a
           read of the guest data touches: `qnbd convert` must fail, and
           `qnbd info` may succeed or fail but must not crash.
KEYWORDS is a case-insensitive extended regex the error line must match.
EXTRA_ARGS are extra qnbd arguments placed before the image (e.g. -f qcow2
where probing would otherwise, correctly, treat the file as raw).

Field offsets are those of docs/interop/qcow2.txt ("Header", "Header
extensions", "Cluster mapping", "Compressed Clusters Descriptor").
"""
import os
import struct
import subprocess
import sys

MiB = 1 << 20

# Header field offsets (bytes), version 2 and 3.
MAGIC, VERSION, BACKING_FILE_OFFSET, BACKING_FILE_SIZE, CLUSTER_BITS = 0, 4, 8, 16, 20
SIZE, CRYPT_METHOD, L1_SIZE, L1_TABLE_OFFSET = 24, 32, 36, 40
REFCOUNT_TABLE_OFFSET, REFCOUNT_TABLE_CLUSTERS = 48, 56
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 60, 64
INCOMPATIBLE_FEATURES, COMPATIBLE_FEATURES, AUTOCLEAR_FEATURES = 72, 80, 88
REFCOUNT_ORDER, HEADER_LENGTH, COMPRESSION_TYPE = 96, 100, 104

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAME_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_COMPRESSED = 1 << 62
FAR = 1 << 40  # 1 TiB: cluster-aligned and far past the end of any test file


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


class Image:
    """A qcow2 file held in memory, patched field by field, then written."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = bytearray(f.read())

    def u32(self, off):
        return struct.unpack_from(">I", self.data, off)[0]

    def u64(self, off):
        return struct.unpack_from(">Q", self.data, off)[0]

    def set_u32(self, off, v):
        struct.pack_into(">I", self.data, off, v)

    def set_u64(self, off, v):
        struct.pack_into(">Q", self.data, off, v)

    @property
    def cluster_size(self):
        return 1 << self.u32(CLUSTER_BITS)

    def l1_entry_offset(self, index=0):
        return self.u64(L1_TABLE_OFFSET) + 8 * index

    def l2_entry_offset(self, index=0):
        l2 = self.u64(self.l1_entry_offset(0)) & L1E_OFFSET_MASK
        assert l2, "the base image must have an L2 table for guest cluster 0"
        return l2 + 8 * index

    def extensions(self):
        """[(type, data)] up to the end marker."""
        off = self.u32(HEADER_LENGTH)
        exts = []
        while True:
            ext_type, length = struct.unpack_from(">II", self.data, off)
            if ext_type == EXT_END:
                return exts
            exts.append((ext_type, bytes(self.data[off + 8: off + 8 + length])))
            off += 8 + (length + 7) // 8 * 8

    def set_extensions(self, exts, raw_lengths=None):
        """Rewrite the extension area; raw_lengths overrides declared lengths."""
        off = self.u32(HEADER_LENGTH)
        limit = self.cluster_size
        if self.u64(BACKING_FILE_OFFSET):
            limit = self.u64(BACKING_FILE_OFFSET)
        area = bytearray()
        for i, (ext_type, payload) in enumerate(exts):
            length = raw_lengths[i] if raw_lengths and raw_lengths[i] is not None else len(payload)
            area += struct.pack(">II", ext_type, length) + payload
            area += bytes((8 - len(payload) % 8) % 8)
        area += bytes(8)
        assert off + len(area) <= limit, "extensions do not fit"
        self.data[off: off + len(area)] = area
        self.data[off + len(area): limit] = bytes(limit - off - len(area))

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.data)


class Cases:
    def __init__(self, outdir):
        self.outdir = outdir
        self.rows = []
        self.base = self.make_base("base.qcow2")

    def path(self, name):
        return os.path.join(self.outdir, name)

    def make_base(self, name, size=4 * MiB, writes=("write -q -P 0x11 0 128k",), **options):
        path = self.path(name)
        opts = ",".join(f"{k}={v}" for k, v in options.items())
        run("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, str(size))
        if writes:
            args = ["qemu-io", "-f", "qcow2"]
            for w in writes:
                args += ["-c", w]
            run(*args, path)
        return path

    def add(self, name, scope, keywords, patch=None, source=None, extra=""):
        """Copy SOURCE (default: the base image), apply PATCH, record the case."""
        img = Image(source or self.base)
        if patch:
            patch(img)
        path = self.path(name + ".qcow2")
        img.save(path)
        self.rows.append((name, path, scope, keywords, extra))

    def add_file(self, name, path, scope, keywords, extra=""):
        self.rows.append((name, path, scope, keywords, extra))


def build(outdir):
    c = Cases(outdir)

    # --- the header
    c.add("truncated-header", "open", "truncat|short|end of file|eof|header",
          lambda i: i.data.__delitem__(slice(40, None)))
    c.add("bad-magic", "open", "magic|not a qcow2", lambda i: i.set_u32(MAGIC, 0x51464921), extra="-f qcow2")
    c.add("bad-version-1", "open", "version", lambda i: i.set_u32(VERSION, 1))
    c.add("bad-version-4", "open", "version", lambda i: i.set_u32(VERSION, 4))
    c.add("header-length-too-small", "open", "header.?length|header length",
          lambda i: i.set_u32(HEADER_LENGTH, 72))
    c.add("header-length-unaligned", "open", "header.?length|header length|align",
          lambda i: i.set_u32(HEADER_LENGTH, 105))
    c.add("cluster-bits-too-small", "open", "cluster", lambda i: i.set_u32(CLUSTER_BITS, 8))
    c.add("cluster-bits-too-large", "open", "cluster", lambda i: i.set_u32(CLUSTER_BITS, 22))
    c.add("refcount-order-too-large", "open", "refcount", lambda i: i.set_u32(REFCOUNT_ORDER, 7))
    c.add("size-overflow", "open", "size|overflow|too (large|big)", lambda i: i.set_u64(SIZE, 1 << 63))
    c.add("encrypted-aes", "open", "encrypt", lambda i: i.set_u32(CRYPT_METHOD, 1))
    c.add("encrypted-luks", "open", "encrypt", lambda i: i.set_u32(CRYPT_METHOD, 2))
    c.add("unknown-crypt-method", "open", "encrypt|crypt", lambda i: i.set_u32(CRYPT_METHOD, 3))

    # --- the L1 table
    c.add("l1-beyond-eof", "open", "l1", lambda i: i.set_u64(L1_TABLE_OFFSET, FAR))
    c.add("l1-unaligned", "open", "l1", lambda i: i.set_u64(L1_TABLE_OFFSET, i.u64(L1_TABLE_OFFSET) + 512))
    c.add("l1-size-over-limit", "open", "l1", lambda i: i.set_u32(L1_SIZE, 0x02000000))
    c.add("l1-too-small-for-size", "open", "l1|size", lambda i: i.set_u64(SIZE, 64 << 30))

    # --- the refcount table
    c.add("refcount-table-overlaps-header", "open", "refcount|overlap",
          lambda i: i.set_u64(REFCOUNT_TABLE_OFFSET, 0))
    c.add("refcount-table-unaligned", "open", "refcount|align",
          lambda i: i.set_u64(REFCOUNT_TABLE_OFFSET, i.u64(REFCOUNT_TABLE_OFFSET) + 512))
    c.add("refcount-table-too-big", "open", "refcount",
          lambda i: i.set_u32(REFCOUNT_TABLE_CLUSTERS, 0x00800000))
    c.add("refcount-table-beyond-eof", "open", "refcount",
          lambda i: i.set_u64(REFCOUNT_TABLE_OFFSET, FAR))

    # --- cluster mapping (read only when guest data is read)
    c.add("l2-offset-unaligned", "data", "l2|align",
          lambda i: i.set_u64(i.l1_entry_offset(0), i.u64(i.l1_entry_offset(0)) + 512))
    c.add("l2-table-beyond-eof", "data", "l2|beyond|past|end of file|eof",
          lambda i: i.set_u64(i.l1_entry_offset(0), (1 << 63) | FAR))
    c.add("l1-entry-reserved-bits", "data", "reserved|l1",
          lambda i: i.set_u64(i.l1_entry_offset(0), i.u64(i.l1_entry_offset(0)) | (1 << 56)))
    c.add("l2-entry-reserved-bits", "data", "reserved|l2",
          lambda i: i.set_u64(i.l2_entry_offset(0), i.u64(i.l2_entry_offset(0)) | (1 << 56)))
    c.add("l2-data-offset-unaligned", "data", "align|l2",
          lambda i: i.set_u64(i.l2_entry_offset(0), i.u64(i.l2_entry_offset(0)) + 512))

    compressed = c.path("compressed-src.qcow2")
    c.make_base("compressed-plain.qcow2", writes=("write -q -P 0x11 0 128k",))
    run("qemu-img", "convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2",
        c.path("compressed-plain.qcow2"), compressed)
    os.unlink(c.path("compressed-plain.qcow2"))

    def compressed_past_eof(i):
        e = i.u64(i.l2_entry_offset(0))
        assert e & L2E_COMPRESSED
        x = 62 - (i.u32(CLUSTER_BITS) - 8)
        offset_mask = (1 << x) - 1
        i.set_u64(i.l2_entry_offset(0), (e & ~offset_mask) | (len(i.data) + MiB))

    def compressed_garbage(i):
        e = i.u64(i.l2_entry_offset(0))
        x = 62 - (i.u32(CLUSTER_BITS) - 8)
        host = e & ((1 << x) - 1)
        i.data[host: host + 64] = b"\xff" * 64  # deflate block type 3: invalid

    c.add("compressed-past-eof", "data", "compress|beyond|past|end of file|eof", compressed_past_eof,
          source=compressed)
    c.add("compressed-bad-zlib-data", "data", "decompress|compress|zlib|inflate", compressed_garbage,
          source=compressed)

    # --- header extensions and feature bits
    def unknown_named_incompatible(i):
        exts = i.extensions()
        table = [(t, d) for t, d in exts if t == EXT_FEATURE_NAME_TABLE]
        names = table[0][1] if table else b""
        names += struct.pack(">BB46s", 0, 20, b"h3-test-feature")
        exts = [(t, d) for t, d in exts if t != EXT_FEATURE_NAME_TABLE] + [(EXT_FEATURE_NAME_TABLE, names)]
        i.set_extensions(exts)
        i.set_u64(INCOMPATIBLE_FEATURES, i.u64(INCOMPATIBLE_FEATURES) | (1 << 20))

    c.add("unknown-incompatible-named", "open", "h3-test-feature", unknown_named_incompatible)
    c.add("unknown-incompatible-unnamed", "open", "incompatible|feature|unsupported|unknown",
          lambda i: i.set_u64(INCOMPATIBLE_FEATURES, i.u64(INCOMPATIBLE_FEATURES) | (1 << 30)))

    def extension_past_cluster(i):
        exts = i.extensions()
        i.set_extensions([(0x12345678, b"x" * 8)] + exts, raw_lengths=[i.cluster_size] + [None] * len(exts))

    c.add("extension-past-header-cluster", "open", "extension|header", extension_past_cluster)

    def compression_bit_without_field(i):
        # Header ends before the compression_type byte, but the bit that says
        # it is meaningful is set.
        i.set_u32(HEADER_LENGTH, 104)
        i.data[104:112] = bytes(8)  # read as the end-of-extensions marker
        i.set_u64(INCOMPATIBLE_FEATURES, i.u64(INCOMPATIBLE_FEATURES) | INCOMPAT_COMPRESSION)

    c.add("compression-bit-without-type-field", "open", "compression", compression_bit_without_field)
    c.add("compression-type-unknown", "open", "compression",
          lambda i: (i.set_u64(INCOMPATIBLE_FEATURES, i.u64(INCOMPATIBLE_FEATURES) | INCOMPAT_COMPRESSION),
                     i.data.__setitem__(COMPRESSION_TYPE, 7)))
    c.add("data-file-bit-without-data-file", "open", "data.?file|external",
          lambda i: i.set_u64(INCOMPATIBLE_FEATURES, i.u64(INCOMPATIBLE_FEATURES) | INCOMPAT_DATA_FILE))

    # --- bitmaps
    bitmapped = c.make_base("bitmap-src.qcow2")
    run("qemu-img", "bitmap", "--add", bitmapped, "b0")

    def bitmap_ext(i, change):
        exts = i.extensions()
        assert any(t == EXT_BITMAPS for t, _ in exts), "qemu-img bitmap --add made no bitmaps extension"
        i.set_extensions([(t, change(d) if t == EXT_BITMAPS else d) for t, d in exts])

    c.add("bitmap-directory-past-eof", "open", "bitmap",
          lambda i: bitmap_ext(i, lambda d: d[:16] + struct.pack(">Q", FAR)), source=bitmapped)
    c.add("bitmaps-extension-bad-length", "open", "bitmap",
          lambda i: bitmap_ext(i, lambda d: d[:16]), source=bitmapped)
    c.add("bitmap-directory-unaligned", "open", "bitmap|align",
          lambda i: bitmap_ext(i, lambda d: d[:16] + struct.pack(">Q", struct.unpack(">Q", d[16:24])[0] + 8)),
          source=bitmapped)

    # --- snapshots
    c.add("snapshot-table-past-eof", "open", "snapshot",
          lambda i: (i.set_u32(NB_SNAPSHOTS, 1), i.set_u64(SNAPSHOTS_OFFSET, FAR)))
    c.add("snapshot-table-unaligned", "open", "snapshot|align",
          lambda i: (i.set_u32(NB_SNAPSHOTS, 1), i.set_u64(SNAPSHOTS_OFFSET, i.cluster_size + 8)))

    # --- backing files
    c.add("backing-name-too-long", "open", "backing",
          lambda i: (i.set_u64(BACKING_FILE_OFFSET, 0x1000), i.set_u32(BACKING_FILE_SIZE, 2000)))
    c.add("backing-name-past-eof", "open", "backing",
          lambda i: (i.set_u64(BACKING_FILE_OFFSET, FAR), i.set_u32(BACKING_FILE_SIZE, 10)))
    missing = c.path("backing-missing.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "does-not-exist.qcow2", "-F", "qcow2",
        missing, "4M")
    c.add_file("backing-missing", missing, "open", "backing|no such file|not found|does-not-exist")
    loop_a, loop_b = c.path("loop-a.qcow2"), c.path("loop-b.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", loop_b, "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "loop-b.qcow2", "-F", "qcow2", loop_a, "4M")
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", loop_b)
    c.add_file("backing-loop", loop_a, "open", "loop|recurs|chain|depth|cycle")
    self_loop = c.path("loop-self.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "loop-self.qcow2", "-F", "qcow2",
        self_loop, "4M")
    c.add_file("backing-self-loop", self_loop, "open", "loop|recurs|chain|depth|cycle")

    # Controls: the unpatched sources must read fine, or the cases above
    # prove nothing.
    c.add_file("valid-base", c.base, "valid", ".")
    c.add_file("valid-compressed", compressed, "valid", ".")
    c.add_file("valid-bitmap", bitmapped, "valid", ".")

    with open(os.path.join(outdir, "manifest.tsv"), "w") as f:
        for row in c.rows:
            f.write("\t".join(row) + "\n")


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    build(sys.argv[1])
