#!/usr/bin/env python3
"""Side-by-side NBD server benchmark: qnbd vs qemu-nbd vs the nbdkit null ceiling.

Every workload runs against each server in turn, alternating servers within
each repetition, so drift on the machine hits all of them alike. Prints the
median per server, the qnbd/qemu-nbd ratio and qnbd's share of the ceiling
(nbdkit's null plugin with the noextents filter: the NBD transport with no
disk work at all).

Usage: bench/bench.py [--qnbd build/qnbd] [--reps 3] [--runtime 5] [--only ROW,...]
                      [--no-pin] [--workdir DIR] [--json out.json]

Servers and clients are pinned to separate CPUs (taskset) unless --no-pin:
on a 2-core machine that keeps the client from stealing the server's core.
Never gates anything: it reports.
"""
import argparse
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

    def __init__(self, kind, image, fmt, sock, qnbd, pin, writable, size):
        self.kind, self.image, self.fmt, self.sock = kind, image, fmt, sock
        self.qnbd, self.pin, self.writable, self.size = qnbd, pin, writable, size
        self.proc = None

    def argv(self):
        ro = [] if self.writable else ["-r"]
        if self.kind == "qnbd":
            return [self.qnbd, "serve", "-t", "-e", "16", "-f", self.fmt, "-k", self.sock, *ro, self.image]
        if self.kind == "qemu-nbd":
            return ["qemu-nbd", "-t", "-e", "16", "-f", self.fmt, "-k", self.sock, *ro, self.image]
        if self.kind == "nbdkit-null":
            return ["nbdkit", "-f", "-U", self.sock, "--filter=noextents", "null", f"size={self.size}"]
        raise ValueError(self.kind)

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        argv = self.argv()
        if self.pin:
            argv = ["taskset", "-c", "1"] + argv
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


def client(argv, pin):
    return (["taskset", "-c", "0"] + argv) if pin else argv


def warm(path):
    # Re-read the image so every server starts from the same page-cache state.
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def fio_iops(uri, rw, bs, iodepth, jobs, runtime, pin, size):
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", f"--numjobs={jobs}", f"--size={size}", "--time_based",
            f"--runtime={runtime}", "--group_reporting", "--output-format=json"]
    if rw == "write":
        argv = [a for a in argv if not a.startswith("--time_based") and not a.startswith("--runtime")]
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


def make_images(work, qnbd_ok):
    """The images the rows need, made with qemu-img/qemu-io (the reference tools)."""
    imgs = {}
    full = os.path.join(work, "full-2g.qcow2")
    if not os.path.exists(full):
        raw = os.path.join(work, "full-2g.raw")
        with open(raw, "wb") as f:
            block = os.urandom(MiB)
            for _ in range(2 * 1024):
                f.write(block)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, full])
        os.unlink(raw)
    imgs["full"] = full
    sparse = os.path.join(work, "scattered-1t.qcow2")
    if not os.path.exists(sparse):
        run(["qemu-img", "create", "-f", "qcow2", sparse, "1T"])
        import random
        rng = random.Random(20000)
        slots = rng.sample(range((1 << 40) // (1 << 20)), 20000)
        cmds = "".join(f"write -q {s << 20} 4k\n" for s in sorted(slots))
        subprocess.run(["qemu-io", "-f", "qcow2", sparse], input=cmds, text=True, check=True,
                       stdout=subprocess.DEVNULL)
    imgs["sparse"] = sparse
    return imgs


ROWS = [
    # name, image, writable, fresh-empty-image, measure
    ("nbdcopy seq read, 1 conn", "full", False, False, lambda s, a: nbdcopy_rate(s.uri(), 1, 2 * GiB, a.pin)),
    ("nbdcopy seq read, 4 conns", "full", False, False, lambda s, a: nbdcopy_rate(s.uri(), 4, 2 * GiB, a.pin)),
    ("fio 4k randread qd1", "full", False, False,
     lambda s, a: fio_iops(s.uri(), "randread", "4k", 1, 1, a.runtime, a.pin, "2G")),
    ("fio 4k randread qd32", "full", False, False,
     lambda s, a: fio_iops(s.uri(), "randread", "4k", 32, 1, a.runtime, a.pin, "2G")),
    ("fio 4k randread 4 jobs qd32", "full", False, False,
     lambda s, a: fio_iops(s.uri(), "randread", "4k", 32, 4, a.runtime, a.pin, "2G")),
    ("fio 4k randwrite qd1", "full", True, False,
     lambda s, a: fio_iops(s.uri(), "randwrite", "4k", 1, 1, a.runtime, a.pin, "2G")),
    ("fio 4k randwrite qd32", "full", True, False,
     lambda s, a: fio_iops(s.uri(), "randwrite", "4k", 32, 1, a.runtime, a.pin, "2G")),
    ("fio 4k randwrite 4 jobs qd32", "full", True, False,
     lambda s, a: fio_iops(s.uri(), "randwrite", "4k", 32, 4, a.runtime, a.pin, "2G")),
    ("fio 1M seq write, empty qcow2", None, True, True,
     lambda s, a: fio_iops(s.uri(), "write", "1M", 8, 1, a.runtime, a.pin, "1G")),
    ("nbdinfo --map, 1 TiB, 20k extents", "sparse", False, False, lambda s, a: map_time(s.uri(), a.pin)),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qnbd", default=os.path.join(os.path.dirname(__file__), "..", "build", "qnbd"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=int, default=5)
    p.add_argument("--only", default="")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--workdir", default=os.environ.get("QNBD_BENCH_DIR", "/var/tmp/qnbd-bench"))
    p.add_argument("--json", default="")
    args = p.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy", "nbdinfo", "fio", "nbdkit", "taskset"):
        if not have(tool):
            sys.exit(f"bench: {tool} is required")
    if args.pin and os.cpu_count() < 2:
        args.pin = False
    os.makedirs(args.workdir, exist_ok=True)
    imgs = make_images(args.workdir, True)
    sockdir = tempfile.mkdtemp(prefix="qnbd-bench-")
    kinds = ["qnbd", "qemu-nbd", "nbdkit-null"]
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    results = []
    for name, img_key, writable, fresh, measure in ROWS:
        if only and not any(o in name for o in only):
            continue
        samples = {k: [] for k in kinds}
        unit = ""
        errors = {}
        for rep in range(args.reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
            for kind in order:
                if kind in errors:
                    continue
                if fresh:
                    image = os.path.join(args.workdir, f"empty-{kind}.qcow2")
                    run(["qemu-img", "create", "-f", "qcow2", image, "1G"])
                elif writable:
                    image = os.path.join(args.workdir, f"rw-{kind}.qcow2")
                    if kind != "nbdkit-null":
                        shutil.copyfile(imgs[img_key], image)
                else:
                    image = imgs[img_key]
                if kind != "nbdkit-null":
                    warm(image)
                size = "1G" if fresh else ("1T" if img_key == "sparse" else "2G")
                srv = Server(kind, image, "qcow2", os.path.join(sockdir, f"{kind}.sock"),
                             args.qnbd, args.pin, writable, size)
                try:
                    srv.start()
                    value, unit = measure(srv, args)
                    samples[kind].append(value)
                except Exception as e:  # a server that cannot do the row is reported, not fatal
                    errors[kind] = str(e).strip().splitlines()[-1][:120] if str(e).strip() else repr(e)
                finally:
                    srv.stop()
        med = {k: (statistics.median(v) if v else None) for k, v in samples.items()}
        results.append({"row": name, "unit": unit, "median": med, "samples": samples, "errors": errors})
        print_row(results[-1])
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    shutil.rmtree(sockdir, ignore_errors=True)


def fmt(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:,.0f}")


def ratios(r):
    q, m, c = r["median"]["qnbd"], r["median"]["qemu-nbd"], r["median"]["nbdkit-null"]
    lower_is_better = r["unit"] == "s"
    vs_qemu = vs_ceiling = None
    if q and m:
        vs_qemu = (m / q) if lower_is_better else (q / m)
    if q and c and not lower_is_better:
        vs_ceiling = q / c
    return vs_qemu, vs_ceiling


def print_row(r):
    vs_qemu, vs_ceiling = ratios(r)
    extra = "".join(f"  [{k}: {e}]" for k, e in r["errors"].items())
    print(f"# {r['row']}: " + ", ".join(f"{k}={fmt(v)}" for k, v in r["median"].items()) + f" {r['unit']}{extra}",
          file=sys.stderr, flush=True)


def print_table(results):
    print()
    print(f"| {'workload':36} | {'unit':5} | {'qnbd':>10} | {'qemu-nbd':>10} | {'nbdkit null':>11} | "
          f"{'qnbd/qemu-nbd':>13} | {'qnbd/ceiling':>12} |")
    print("|" + "-" * 38 + "|" + "-" * 7 + "|" + "-" * 12 + "|" + "-" * 12 + "|" + "-" * 13 + "|" + "-" * 15 + "|"
          + "-" * 14 + "|")
    for r in results:
        vs_qemu, vs_ceiling = ratios(r)
        m = r["median"]
        print(f"| {r['row']:36} | {r['unit']:5} | {fmt(m['qnbd']):>10} | {fmt(m['qemu-nbd']):>10} | "
              f"{fmt(m['nbdkit-null']):>11} | {(f'{vs_qemu:.2f}x' if vs_qemu else '-'):>13} | "
              f"{(f'{vs_ceiling:.0%}' if vs_ceiling else '-'):>12} |")
    print("\nqnbd/qemu-nbd > 1 means qnbd is faster (for times: qemu-nbd time / qnbd time).")


if __name__ == "__main__":
    main()
