#!/usr/bin/env python3
"""Side-by-side NBD server benchmark: qnbd vs qemu-nbd vs nbdkit (file and null).

Every workload runs against each server in turn, alternating servers within
each repetition, so drift on the machine hits all of them alike. Servers:
qnbd and qemu-nbd on the row's image (qcow2, or raw for the raw rows),
nbdkit's file plugin on the same bytes as a raw file (the peer that does no
format work), and nbdkit's null plugin with the noextents filter (the NBD
transport with no disk work at all: the ceiling). Prints the median per
server and qnbd / qemu-nbd, qnbd / nbdkit file, qnbd / nbdkit null from the
same run (above 1 = qnbd faster; for times, the other's time / qnbd's). A
peer that does not apply to a row (nbdkit cannot serve a qcow2 map, a null
device has no holes) shows "-".

Usage: bench/bench.py [--qnbd build/qnbd] [--qnbd-before OLD/qnbd] [--reps 3] [--runtime 5]
                      [--only ROW,... | --only 'ROW|ROW'] [--scale] [--no-pin] [--server-cpus LIST] [--client-cpus LIST]
                      [--workdir DIR] [--shmdir DIR] [--json out.json] [--nbdkit-plugin-dir DIR]

--qnbd-before runs a second qnbd binary (an older build) as one more server
in the same alternating rounds, and prints qnbd ÷ before: a change's
before/after from one run. --scale runs only the scaling rows: fio 4 KiB
random read and random write at qd32 over 1, 2, 4, 8 and 16 connections
(fio jobs, one NBD connection each) for qnbd, qemu-nbd and nbdkit file
(and nbdkit null for reads), fio 1 MiB sequential reads at qd8 over 1, 8
and 16, and nbdcopy over 1 and 8; bench/scale-bundle.sh packs it with
every binary it runs for a machine that has none of them.

Rows with "tmpfs" in their name keep their images in --shmdir (default
/dev/shm/qnbd-bench; up to 4.3 GiB of memory, removed at exit); the others in
--workdir. Servers and clients are pinned to separate CPUs (taskset: server
on CPU 1, clients on CPU 0) unless --no-pin: on a 2-core machine that keeps
the client from stealing the server's core. With 4 or more CPUs the servers
get the first half and the clients the second (--server-cpus and
--client-cpus override, taskset lists). Never gates anything: it reports.
"""
import argparse
import errno
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30
MiB = 1 << 20


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def have(tool):
    return shutil.which(tool) is not None


class Server:
    """One NBD server process on a Unix socket, stopped by its own PID."""

    def __init__(self, kind, image, fmt, sock, args, writable, size):
        self.kind, self.image, self.fmt, self.sock = kind, image, fmt, sock
        self.args, self.writable, self.size = args, writable, size
        self.proc = None

    def argv(self):
        ro = [] if self.writable else ["-r"]
        if self.kind in ("qnbd", "qnbd-before"):
            binary = self.args.qnbd if self.kind == "qnbd" else self.args.qnbd_before
            return [binary, "serve", "-t", "-e", "16", "-f", self.fmt, "-k", self.sock, *ro, self.image]
        if self.kind == "qemu-nbd":
            return ["qemu-nbd", "-t", "-e", "16", "-f", self.fmt, "-k", self.sock, *ro, self.image]
        # nbdkit takes a plugin or filter by name, or as the path of its
        # .so (--nbdkit-plugin-dir: a bundle's own, bench/scale-bundle.sh).
        d = self.args.nbdkit_plugin_dir
        plugin = (lambda n: os.path.join(d, f"nbdkit-{n}-plugin.so")) if d else (lambda n: n)
        noextents = os.path.join(d, "nbdkit-noextents-filter.so") if d else "noextents"
        if self.kind == "nbdkit-file":
            return ["nbdkit", "-f", "-U", self.sock, *ro, plugin("file"), f"file={self.image}"]
        if self.kind == "nbdkit-null":
            return ["nbdkit", "-f", "-U", self.sock, f"--filter={noextents}", plugin("null"), f"size={self.size}"]
        raise ValueError(self.kind)

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        argv = self.argv()
        if self.args.pin:
            argv = ["taskset", "-c", self.args.server_cpus] + argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited: {self.proc.stderr.read().decode(errors='replace')}")
            if time.time() > deadline:
                raise RuntimeError(f"{self.kind} did not create {self.sock}")
            time.sleep(0.02)
        return self

    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


CLIENT_CPUS = "0"  # set from --client-cpus in main()


def client(argv, pin):
    return (["taskset", "-c", CLIENT_CPUS] + argv) if pin else argv


def warm(path):
    # Re-read the image so every server starts from the same page-cache state
    # (only its data: a sparse 1 TiB raw file is mostly holes).
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                end = size  # no SEEK_DATA here: read everything

            while pos < end:
                n = len(os.pread(fd, min(8 * MiB, end - pos), pos))
                if n == 0:
                    break
                pos += n
            pos = max(pos, end)
    finally:
        os.close(fd)


def fio_iops(uri, rw, bs, iodepth, jobs, runtime, pin, size, io_size=None):
    """IOPS (MiB/s for 1M blocks) for `runtime` seconds, or over `io_size`
    bytes (and over the whole size for sequential writes)."""
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", f"--numjobs={jobs}", f"--size={size}", "--time_based",
            f"--runtime={runtime}", "--group_reporting", "--output-format=json"]
    if rw == "write" or io_size:
        argv = [a for a in argv if not a.startswith("--time_based") and not a.startswith("--runtime")]
    if io_size:
        argv.append(f"--io_size={io_size}")
    out = run(client(argv, pin)).stdout
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    side = job["read"] if rw in ("randread", "read") else job["write"]
    if bs == "1M":
        return side["bw_bytes"] / MiB, "MiB/s"
    return side["iops"], "IOPS"


def nbdcopy_rate(uri, conns, size, pin):
    t0 = time.perf_counter()
    run(client(["nbdcopy", f"--connections={conns}", "--requests=16", uri, "null:"], pin))
    dt = time.perf_counter() - t0
    return size / MiB / dt, "MiB/s"


def map_time(uri, pin):
    t0 = time.perf_counter()
    run(client(["nbdinfo", "--map", uri], pin))
    return time.perf_counter() - t0, "s"


def qemu_img_map_time(uri, pin):
    # QEMU's NBD client asks BLOCK_STATUS with REQ_ONE, one extent per request.
    t0 = time.perf_counter()
    run(client(["qemu-img", "map", "--output=json", "-f", "raw", uri], pin))
    return time.perf_counter() - t0, "s"


def nbdcopy_write_rate(src, uri, conns, size, pin):
    t0 = time.perf_counter()
    run(client(["nbdcopy", f"--connections={conns}", "--requests=16", "--flush", src, uri], pin))
    dt = time.perf_counter() - t0
    return size / MiB / dt, "MiB/s"


def write_pattern(path, size):
    """A file of `size` bytes, every MiB different, written from one buffer."""
    buf = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            buf[0:8] = i.to_bytes(8, "little")
            f.write(buf)


class Images:
    """Images made on first use with qemu-img/qemu-io (the reference tools).

    Each key gives {"qcow2": path or None, "raw": path (the same guest bytes
    as a raw file, for nbdkit file), "size": bytes}. Images in workdir are
    kept between runs; those in shmdir are removed at exit.
    """

    def __init__(self, work, shm):
        self.work, self.shm, self.made = work, shm, {}

    def get(self, key):
        if key not in self.made:
            self.made[key] = getattr(self, "make_" + key.replace("-", "_"))()
        return self.made[key]

    def make_full(self):
        raw = os.path.join(self.work, "full-2g.raw")
        full = os.path.join(self.work, "full-2g.qcow2")
        if not os.path.exists(raw):
            write_pattern(raw + ".tmp", 2 * GiB)
            os.rename(raw + ".tmp", raw)
            if os.path.exists(full):  # made from other bytes by an older bench.py
                os.unlink(full)
        if not os.path.exists(full):
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, full + ".tmp"])
            os.rename(full + ".tmp", full)
        return {"qcow2": full, "raw": raw, "size": 2 * GiB}

    def make_sparse(self):
        sparse = os.path.join(self.work, "scattered-1t.qcow2")
        raw = os.path.join(self.work, "scattered-1t.raw")
        import random
        rng = random.Random(20000)
        slots = sorted(rng.sample(range((1 << 40) // (1 << 20)), 20000))
        if not os.path.exists(sparse):
            run(["qemu-img", "create", "-f", "qcow2", sparse + ".tmp", "1T"])
            cmds = "".join(f"write -q {s << 20} 4k\n" for s in slots)
            subprocess.run(["qemu-io", "-f", "qcow2", sparse + ".tmp"], input=cmds, text=True, check=True,
                           stdout=subprocess.DEVNULL)
            os.rename(sparse + ".tmp", sparse)
        if not os.path.exists(raw):
            # The same 20,000 4 KiB extents in a sparse raw file (qemu-io
            # writes 0xcd; the bytes do not matter for a map).
            with open(raw + ".tmp", "wb") as f:
                f.truncate(1 << 40)
                block = b"\xcd" * 4096
                for s in slots:
                    f.seek(s << 20)
                    f.write(block)
            os.rename(raw + ".tmp", raw)
        return {"qcow2": sparse, "raw": raw, "size": 1 << 40}

    def make_frag(self):
        # 64 MiB, 512-byte clusters, every other one allocated: every extent
        # is one cluster. No raw equivalent: file systems map 4 KiB blocks.
        frag = os.path.join(self.work, "frag-64m-512.qcow2")
        if not os.path.exists(frag):
            raw = frag + ".raw"
            block = os.urandom(512)
            with open(raw, "wb") as f:
                f.write((block + bytes(512)) * (64 * MiB // 1024))
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", "-S", "512",
                 raw, frag + ".tmp"])
            os.unlink(raw)
            os.rename(frag + ".tmp", frag)
        return {"qcow2": frag, "raw": None, "size": 64 * MiB}

    def _raw(self, where, size):
        d = self.shm if where == "tmpfs" else self.work
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"raw-{size // MiB}m.raw")
        if not os.path.exists(path) or os.path.getsize(path) != size:
            write_pattern(path + ".tmp", size)
            os.rename(path + ".tmp", path)
        return {"qcow2": None, "raw": path, "size": size}

    def make_raw_256m_tmpfs(self):
        return self._raw("tmpfs", 256 * MiB)

    def make_raw_4g_tmpfs(self):
        return self._raw("tmpfs", 4 * GiB)

    def make_raw_256m_disk(self):
        return self._raw("disk", 256 * MiB)

    def make_raw_4g_disk(self):
        return self._raw("disk", 4 * GiB)

    def make_src_1g(self):
        # Source of the nbdcopy write rows: a local raw file.
        return self._raw("disk", GiB)

    def cleanup(self):
        shutil.rmtree(self.shm, ignore_errors=True)


class Row:
    """One workload. image: an Images key. fmt "qcow2": qnbd and qemu-nbd
    serve the qcow2, nbdkit file the raw equivalent; "raw": all serve the raw
    file. fresh: each server gets a new empty image of that size. peers: the
    servers beside qnbd this row runs (nbdkit null needs no image). create:
    qemu-img create options for the fresh qcow2 images."""

    def __init__(self, name, measure, image=None, fmt="qcow2", writable=False, fresh=None,
                 peers=("qemu-nbd", "nbdkit-file", "nbdkit-null"), create=()):
        self.name, self.measure, self.image, self.fmt = name, measure, image, fmt
        self.writable, self.fresh, self.peers, self.create = writable, fresh, peers, create


def fio_row(name, image, rw, bs, qd, jobs, size, fmt="qcow2"):
    return Row(name, lambda s, a: fio_iops(s.uri(), rw, bs, qd, jobs, a.runtime, a.pin, size),
               image=image, fmt=fmt, writable=rw in ("randwrite", "write"))


def raw_randread_row(key):
    size = key.split("-")[1].upper()
    return Row(f"fio 4k randread qd32, {key}", lambda s, a: fio_iops(s.uri(), "randread", "4k", 32, 1, a.runtime,
                                                                      a.pin, size),
               image=key, fmt="raw")


ROWS = [
    Row("nbdcopy seq read, 1 conn", lambda s, a: nbdcopy_rate(s.uri(), 1, 2 * GiB, a.pin), image="full"),
    Row("nbdcopy seq read, 4 conns", lambda s, a: nbdcopy_rate(s.uri(), 4, 2 * GiB, a.pin), image="full"),
    fio_row("fio 1M seq read qd8", "full", "read", "1M", 8, 1, "2G"),
    fio_row("fio 4k randread qd1", "full", "randread", "4k", 1, 1, "2G"),
    fio_row("fio 4k randread qd32", "full", "randread", "4k", 32, 1, "2G"),
    fio_row("fio 4k randread 4 jobs qd32", "full", "randread", "4k", 32, 4, "2G"),
    fio_row("fio 4k randwrite qd1", "full", "randwrite", "4k", 1, 1, "2G"),
    fio_row("fio 4k randwrite qd32", "full", "randwrite", "4k", 32, 1, "2G"),
    fio_row("fio 4k randwrite 4 jobs qd32", "full", "randwrite", "4k", 32, 4, "2G"),
    Row("fio 1M seq write, empty qcow2", lambda s, a: fio_iops(s.uri(), "write", "1M", 8, 1, a.runtime, a.pin, "1G"),
        writable=True, fresh=GiB),
    # 16,384 writes over 4,096 clusters of 2 MiB: most first writes into a
    # cluster that reads as zeroes, which the file system zeroes (QEMU's
    # handle_alloc_space) instead of 2 MiB copied per write.
    Row("fio 4k randwrite qd16, empty qcow2 2M clusters",
        lambda s, a: fio_iops(s.uri(), "randwrite", "4k", 16, 1, a.runtime, a.pin, "8G", io_size="64M"),
        writable=True, fresh=8 * GiB, create=("-o", "cluster_size=2M"), peers=("qemu-nbd", "nbdkit-file")),
    Row("nbdcopy 1 GiB into empty qcow2, 1 conn",
        lambda s, a: nbdcopy_write_rate(a.images.get("src-1g")["raw"], s.uri(), 1, GiB, a.pin),
        writable=True, fresh=GiB),
    Row("nbdcopy 1 GiB into empty qcow2, 4 conns",
        lambda s, a: nbdcopy_write_rate(a.images.get("src-1g")["raw"], s.uri(), 4, GiB, a.pin),
        writable=True, fresh=GiB),
    # No per-request cost may grow with the image: 4 GiB within 10 % of 256 MiB.
    raw_randread_row("raw-256m-tmpfs"),
    raw_randread_row("raw-4g-tmpfs"),
    raw_randread_row("raw-256m-disk"),
    raw_randread_row("raw-4g-disk"),
    Row("nbdinfo --map, 1 TiB, 20k extents", lambda s, a: map_time(s.uri(), a.pin), image="sparse",
        peers=("qemu-nbd", "nbdkit-file")),
    Row("qemu-img map (REQ_ONE), 64M 512B clusters", lambda s, a: qemu_img_map_time(s.uri(), a.pin),
        image="frag", peers=("qemu-nbd",)),
]

def scale_rows():
    """Issue 10's many-core rows: 4 KiB random reads (nbdkit null beside, the
    transport's ceiling) and writes over 1-16 connections, 1 MiB sequential
    reads and nbdcopy over several."""
    def conns_name(n):
        return f"{n} conn{'s' if n > 1 else ''}"

    rows = []
    for rw in ("randread", "randwrite"):
        for conns in (1, 2, 4, 8, 16):
            rows.append(Row(f"scale: fio 4k {rw} qd32, {conns_name(conns)}",
                            (lambda rw, conns: lambda s, a: fio_iops(s.uri(), rw, "4k", 32, conns, a.runtime, a.pin,
                                                                      "2G"))(rw, conns),
                            image="full", writable=rw == "randwrite",
                            peers=("qemu-nbd", "nbdkit-file") + (("nbdkit-null",) if rw == "randread" else ())))
    for conns in (1, 8, 16):
        rows.append(Row(f"scale: fio 1M seq read qd8, {conns_name(conns)}",
                        (lambda conns: lambda s, a: fio_iops(s.uri(), "read", "1M", 8, conns, a.runtime, a.pin,
                                                             "2G"))(conns),
                        image="full"))
    for conns in (1, 8):
        rows.append(Row(f"scale: nbdcopy seq read, {conns_name(conns)}",
                        (lambda conns: lambda s, a: nbdcopy_rate(s.uri(), conns, 2 * GiB, a.pin))(conns),
                        image="full"))
    return rows


KINDS = ["qnbd", "qnbd-before", "qemu-nbd", "nbdkit-file", "nbdkit-null"]


def server_image(row, kind, imgs, workdir):
    """(path, format) the server `kind` serves for `row`; made fresh if asked."""
    if kind == "nbdkit-null":
        return None, None
    if row.fresh:
        if kind == "nbdkit-file":
            path = os.path.join(workdir, "empty-nbdkit-file.raw")
            if os.path.exists(path):
                os.unlink(path)
            with open(path, "wb") as f:
                f.truncate(row.fresh)
            return path, "raw"
        path = os.path.join(workdir, f"empty-{kind}.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", *row.create, path, str(row.fresh)])
        return path, "qcow2"
    img = imgs.get(row.image)
    fmt = "raw" if (row.fmt == "raw" or kind == "nbdkit-file") else "qcow2"
    path = img[fmt]
    if row.writable:
        copy = os.path.join(workdir, f"rw-{kind}.{fmt}")
        shutil.copyfile(path, copy)
        path = copy
    return path, fmt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qnbd", default=os.path.join(os.path.dirname(__file__), "..", "build", "qnbd"))
    p.add_argument("--qnbd-before", default="", help="an older qnbd binary to run beside --qnbd")
    p.add_argument("--scale", action="store_true", help="only the connection-scaling rows")
    p.add_argument("--server-cpus", default="")
    p.add_argument("--client-cpus", default="")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=int, default=5)
    p.add_argument("--only", default="")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--workdir", default=os.environ.get("QNBD_BENCH_DIR", "/var/tmp/qnbd-bench"))
    p.add_argument("--shmdir", default="/dev/shm/qnbd-bench")
    p.add_argument("--json", default="")
    p.add_argument("--nbdkit-plugin-dir", default="",
                   help="the folder of nbdkit's file and null plugins and noextents filter (default: nbdkit's own)")
    args = p.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy", "nbdinfo", "fio", "nbdkit", "taskset"):
        if not have(tool):
            sys.exit(f"bench: {tool} is required")
    ncpu = os.cpu_count() or 1
    if args.pin and ncpu < 2:
        args.pin = False
    if not args.server_cpus:
        args.server_cpus = "1" if ncpu < 4 else f"0-{ncpu // 2 - 1}"
    if not args.client_cpus:
        args.client_cpus = "0" if ncpu < 4 else f"{ncpu // 2}-{ncpu - 1}"
    global CLIENT_CPUS
    CLIENT_CPUS = args.client_cpus
    if args.qnbd_before and not os.access(args.qnbd_before, os.X_OK):
        sys.exit(f"bench: --qnbd-before {args.qnbd_before} is not an executable")
    os.makedirs(args.workdir, exist_ok=True)
    args.images = imgs = Images(args.workdir, args.shmdir)
    sockdir = tempfile.mkdtemp(prefix="qnbd-bench-")
    # Row names hold commas ("nbdcopy seq read, 1 conn"): with a "|" in
    # --only, "|" separates the names, so a whole name can be given.
    only = [o.strip() for o in args.only.split("|" if "|" in args.only else ",") if o.strip()]
    results = []
    try:
        for row in (scale_rows() if args.scale else ROWS):
            if only and not any(o in row.name for o in only):
                continue
            kinds = ["qnbd", *(["qnbd-before"] if args.qnbd_before else []), *row.peers]
            samples = {k: [] for k in KINDS}
            unit = ""
            errors = {}
            for rep in range(args.reps):
                order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                for kind in order:
                    if kind in errors:
                        continue
                    try:
                        image, fmt = server_image(row, kind, imgs, args.workdir)
                        if image and not row.fresh:
                            warm(image)
                        size = row.fresh or imgs.get(row.image)["size"]
                        srv = Server(kind, image, fmt, os.path.join(sockdir, f"{kind}.sock"), args,
                                     row.writable, size)
                        try:
                            srv.start()
                            value, unit = row.measure(srv, args)
                            samples[kind].append(value)
                        finally:
                            srv.stop()
                    except Exception as e:  # a server that cannot do the row is reported, not fatal
                        errors[kind] = str(e).strip().splitlines()[-1][:120] if str(e).strip() else repr(e)
            med = {k: (statistics.median(v) if v else None) for k, v in samples.items()}
            results.append({"row": row.name, "unit": unit, "median": med, "samples": samples, "errors": errors})
            print_row(results[-1])
    finally:
        imgs.cleanup()
        shutil.rmtree(sockdir, ignore_errors=True)
    print_table(results, bool(args.qnbd_before))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def fmt(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:,.0f}")


def ratio(r, peer):
    """qnbd vs peer, above 1 = qnbd better (for times: peer time / qnbd time)."""
    q, o = r["median"]["qnbd"], r["median"][peer]
    if not q or not o:
        return None
    return (o / q) if r["unit"] == "s" else (q / o)


def print_row(r):
    extra = "".join(f"  [{k}: {e}]" for k, e in r["errors"].items())
    print(f"# {r['row']}: " + ", ".join(f"{k}={fmt(v)}" for k, v in r["median"].items()) + f" {r['unit']}{extra}",
          file=sys.stderr, flush=True)


def print_table(results, before):
    kinds = [k for k in KINDS if before or k != "qnbd-before"]
    names = {"qnbd-before": "before", "nbdkit-file": "nbdkit file", "nbdkit-null": "nbdkit null"}
    cols = [names.get(k, k) for k in kinds] + ["÷ " + names.get(k, k) for k in kinds[1:]]
    print()
    print(f"| {'workload':42} | {'unit':5} | " + " | ".join(f"{c:>13}" for c in cols) + " |")
    print("|" + "-" * 44 + "|" + "-" * 7 + "|" + "|".join("-" * 15 for _ in cols) + "|")
    for r in results:
        m = r["median"]
        vals = [fmt(m[k]) for k in kinds]
        vals += [(f"{x:.2f}" if x else "-") for x in (ratio(r, k) for k in kinds[1:])]
        print(f"| {r['row']:42} | {r['unit']:5} | " + " | ".join(f"{v:>13}" for v in vals) + " |")
    print("\nqnbd ÷ peer above 1 means qnbd is faster (for times: the peer's time / qnbd's time).")


if __name__ == "__main__":
    main()
