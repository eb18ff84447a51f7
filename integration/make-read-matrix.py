#!/usr/bin/env python3
"""Build the read-matrix images with qemu-img and qemu-io.

usage: make-read-matrix.py OUTDIR

Writes every image under OUTDIR and a manifest OUTDIR/manifest.tsv with one
line per image to test: NAME<TAB>PATH<TAB>FORMAT. Images are small (a few
MiB, sparse) so the whole matrix builds in seconds. Each image gets the same
kind of content, scaled to its cluster size: full clusters, writes straddling
cluster boundaries, zeroed ranges (write -z), discarded ranges, and data in
the last partial cluster.
"""
import os
import subprocess
import sys

MiB = 1 << 20


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def qemu_io(path, fmt, commands):
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    args.append(path)
    run(*args)


def create(path, size, fmt="qcow2", backing=None, backing_fmt=None, **options):
    args = ["qemu-img", "create", "-q", "-f", fmt]
    opts = [f"{k}={v}" for k, v in options.items()]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing:
        args += ["-b", backing, "-F", backing_fmt]
    args += [path, str(size)]
    run(*args)


def pattern_commands(size, cluster, compressed=False, seed=0):
    """The usual mix of writes, scaled so it fits in SIZE bytes."""
    c = cluster
    p = lambda n: f"0x{(0x10 * n + seed) & 0xff:02x}"
    cmds = [
        f"write -q -P {p(1)} 0 {c}",                      # one full cluster
        f"write -q -P {p(2)} {c + c // 2} {c}",           # straddles a boundary
        f"write -q -P {p(3)} {3 * c} {2 * c}",
        f"write -q -z {3 * c + c // 2} {c}",              # zeroes part of written data
        f"write -q -z {6 * c} {2 * c}",                   # zero clusters on nothing
        f"write -q -P {p(4)} {9 * c} {2 * c}",
        f"discard -q {9 * c} {c}",                        # written then discarded
        f"write -q -P {p(5)} {size - 1024} 1024",         # the very end
    ]
    if compressed:
        # Compressed writes need whole clusters.
        cmds.append(f"write -q -c -P {p(6)} {12 * c} {c}")
        cmds.append(f"write -q -c -P {p(7)} {13 * c} {2 * c}")

    # Small images with big clusters: keep only what fits before the tail.
    def fits(cmd):
        *_, offset, length = cmd.split()
        return int(offset) + int(length) <= size

    return [cmd for cmd in cmds if fits(cmd)]


class Matrix:
    def __init__(self, outdir):
        self.outdir = outdir
        self.manifest = []

    def path(self, name):
        return os.path.join(self.outdir, name)

    def add(self, name, path, fmt="qcow2"):
        self.manifest.append((name, path, fmt))

    def simple(self, name, cluster, size=None, compressed=False, **options):
        size = size or max(4 * MiB, 16 * cluster)
        path = self.path(name + ".qcow2")
        create(path, size, cluster_size=cluster, **options)
        qemu_io(path, "qcow2", pattern_commands(size, cluster, compressed))
        self.add(name, path)

    def recompressed(self, name, cluster, compression_type):
        """Every data cluster compressed, via qemu-img convert -c."""
        size = max(4 * MiB, 16 * cluster)
        src = self.path(name + "-src.qcow2")
        create(src, size, cluster_size=cluster)
        qemu_io(src, "qcow2", pattern_commands(size, cluster) + [
            # Incompressible-ish data too: qemu stores a cluster uncompressed
            # when compression does not save space.
            f"write -q -P 0x5a {14 * cluster} {cluster}",
        ])
        path = self.path(name + ".qcow2")
        run("qemu-img", "convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o",
            f"cluster_size={cluster},compression_type={compression_type}", src, path)
        os.unlink(src)
        self.add(name, path)

    def chain(self):
        """raw base (shortest) <- qcow2 v2, 4 KiB clusters <- qcow2 v3, 64 KiB."""
        base = self.path("chain-base.raw")
        with open(base, "wb") as f:
            f.write(bytes([0xb1]) * (MiB + 512))   # ends mid-cluster of every overlay
            f.truncate(2 * MiB)                     # a hole at its end
        mid = self.path("chain-mid.qcow2")
        create(mid, 4 * MiB, backing="chain-base.raw", backing_fmt="raw",
               compat="0.10", cluster_size=4096)
        qemu_io(mid, "qcow2", [
            "write -q -P 0xc1 4096 8192",
            "write -q -z 65536 4096",          # v2: zeros must hide the raw base
            "write -q -P 0xc2 3145728 65536",  # beyond the base's end
        ])
        top = self.path("chain-top.qcow2")
        create(top, 6 * MiB, backing="chain-mid.qcow2", backing_fmt="qcow2", cluster_size=65536)
        qemu_io(top, "qcow2", [
            "write -q -P 0xd1 0 1024",          # partial cluster: COW from below
            "write -q -z 131072 65536",        # zero cluster hides the base
            "discard -q 196608 65536",         # discard over backed data
            "write -q -P 0xd2 5242880 65536",  # beyond the middle's end
            "write -q -P 0xd3 1048576 1024",   # across the base's end
        ])
        self.add("chain-3-level", top)
        self.add("chain-mid-v2-on-raw", mid)

    def extended_l2(self):
        cluster = 65536
        sub = cluster // 32
        base = self.path("extl2-base.qcow2")
        create(base, 4 * MiB, cluster_size=cluster)
        qemu_io(base, "qcow2", [f"write -q -P 0xe0 0 {4 * cluster}"])
        for name, backing in (("extl2", None), ("extl2-backed", "extl2-base.qcow2")):
            path = self.path(name + ".qcow2")
            create(path, 4 * MiB, backing=backing, backing_fmt="qcow2" if backing else None,
                   extended_l2="on", cluster_size=cluster)
            qemu_io(path, "qcow2", [
                f"write -q -P 0xe1 {sub} {sub}",              # one subcluster
                f"write -q -P 0xe2 {5 * sub + 100} 300",      # inside one subcluster
                f"write -q -z {8 * sub} {3 * sub}",           # zero subclusters
                f"write -q -P 0xe3 {cluster - sub} {2 * sub}", # across a cluster edge
                f"write -q -P 0xe4 {2 * cluster} {cluster}",
                f"write -q -z {2 * cluster + 4 * sub} {2 * sub}",
                f"discard -q {3 * cluster} {cluster}",
                f"write -q -c -P 0xe5 {5 * cluster} {cluster}",  # compressed
            ])
            self.add(name, path)

    def data_file(self):
        for raw in ("on", "off"):
            name = f"data-file-raw-{raw}"
            path = self.path(name + ".qcow2")
            # Absolute: qemu 7.2 resolves a relative data file name against its
            # current directory, not the image's, at create and at open.
            create(path, 4 * MiB, data_file=os.path.abspath(self.path(name + ".data")), data_file_raw=raw)
            qemu_io(path, "qcow2", pattern_commands(4 * MiB, 65536))
            self.add(name, path)

    def lazy_refcounts(self):
        path = self.path("lazy-refcounts.qcow2")
        create(path, 4 * MiB, lazy_refcounts="on")
        qemu_io(path, "qcow2", pattern_commands(4 * MiB, 65536))
        self.add("lazy-refcounts", path)
        # Killed without closing: the dirty bit stays set and refcounts are
        # stale, but the guest data must still read back.
        path = self.path("lazy-refcounts-dirty.qcow2")
        create(path, 4 * MiB, lazy_refcounts="on")
        args = ["qemu-io", "-f", "qcow2"]
        for c in pattern_commands(4 * MiB, 65536, seed=3) + ["abort"]:
            args += ["-c", c]
        subprocess.run(args + [path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.add("lazy-refcounts-dirty", path)

    def snapshot(self):
        path = self.path("snapshot.qcow2")
        create(path, 4 * MiB)
        qemu_io(path, "qcow2", pattern_commands(4 * MiB, 65536))
        run("qemu-img", "snapshot", "-c", "snap1", path)
        # Overwrite after the snapshot: shared clusters are copied on write.
        qemu_io(path, "qcow2", [
            "write -q -P 0xf1 0 4096",
            "write -q -z 196608 65536",
            "discard -q 720896 65536",
            "write -q -P 0xf2 2097152 131072",
        ])
        self.add("snapshot-overwritten", path)

    def raw(self):
        path = self.path("sparse.raw")
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
        qemu_io(path, "raw", pattern_commands(4 * MiB, 65536))
        self.add("raw-sparse", path, "raw")


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    m = Matrix(outdir)
    m.simple("v2-c64k", 65536, compat="0.10")
    m.simple("v2-c512", 512, compat="0.10")
    for cluster in (512, 4096, 65536, 2 * MiB):
        m.simple(f"v3-c{cluster}", cluster, compat="1.1", compressed=True)
    m.simple("refcount-1", 65536, refcount_bits=1)
    m.simple("refcount-64", 65536, refcount_bits=64)
    m.simple("zstd-mixed", 65536, compressed=True, compression_type="zstd")
    m.recompressed("zlib-all-c64k", 65536, "zlib")
    m.recompressed("zstd-all-c64k", 65536, "zstd")
    m.recompressed("zlib-all-c4k", 4096, "zlib")
    m.recompressed("zstd-all-c2m", 2 * MiB, "zstd")
    m.simple("size-not-cluster-multiple", 65536, size=4 * MiB + 3 * 512)
    m.simple("size-not-cluster-multiple-c2m", 2 * MiB, size=5 * MiB + 512)
    m.chain()
    m.extended_l2()
    m.data_file()
    m.lazy_refcounts()
    m.snapshot()
    m.raw()
    with open(os.path.join(outdir, "manifest.tsv"), "w") as f:
        for name, path, fmt in m.manifest:
            f.write(f"{name}\t{path}\t{fmt}\n")


if __name__ == "__main__":
    main()
