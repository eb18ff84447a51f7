#!/usr/bin/env python3
"""Point-in-time view benchmark: what writers pay for copy-before-write
(docs/backup-views.md).

Rows (medians over --reps; modes alternate their order per rep):
  4k randwrite IOPS     fio (ioengine=nbd, --iodepth, one job) over the
                        whole disk: no view / a view taken just before the
                        run (first touches copy 64 KiB each) / a view whose
                        granules are all copied already (warm)
  1M seqwrite MiB/s     the same with 1 MiB sequential writes
  first-touch lat us    qd1 4 KiB writes (python3-libnbd), each to a 64 KiB
                        granule not written since the view: median latency
                        without a view, on first touch, on second touch
The image (qcow2, preallocated so overwrites do not allocate) is copied
fresh for every run. The copy a first touch costs is one extra read of
the granule from the image and one write to the scratch file, what
QEMU's copy-before-write filter does per cluster.

Usage: bench/views.py [--qnbd build/qnbd] [--reps 3] [--runtime 4] [--iodepth 32] [--size-mib 256] [--workdir DIR]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

G = 64 << 10


class Server:
    def __init__(self, args, work):
        self.args, self.work = args, work
        self.sock, self.ctl, self.pid = (os.path.join(work, n) for n in ("nbd.sock", "ctl.sock", "pid"))

    def __enter__(self):
        img = os.path.join(self.work, "run.qcow2")
        shutil.copyfile(os.path.join(self.work, "base.qcow2"), img)
        for p in (self.sock, self.ctl, self.pid):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen([self.args.qnbd, "serve", "-t", "-e", "8", "-f", "qcow2", "-k", self.sock,
                                      "--control", self.ctl, "--pid-file", self.pid, img], stderr=subprocess.DEVNULL)
        for _ in range(400):
            if os.path.exists(self.pid) and os.path.getsize(self.pid) > 0:
                break
            time.sleep(0.05)
        return self

    def ctl_cmd(self, *a):
        subprocess.run([self.args.qnbd, "ctl", "-s", self.ctl, *a], check=True, capture_output=True)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()

    def fio(self, rw, bs):
        out = subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={self.sock}",
                              f"--rw={rw}", f"--bs={bs}", f"--iodepth={self.args.iodepth}",
                              f"--size={self.args.size_mib}m", f"--runtime={self.args.runtime}", "--time_based",
                              "--output-format=json"], capture_output=True, text=True, check=True)
        w = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["write"]
        return w["iops"], w["bw_bytes"] / (1 << 20)


def fill(srv):
    # Every granule written once: a warm view has copied them all.
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={srv.sock}", "--rw=write",
                    "--bs=1m", "--iodepth=8", f"--size={srv.args.size_mib}m"], check=True, capture_output=True)


def throughput(args, work, mode, rw, bs):
    with Server(args, work) as srv:
        if mode != "none":
            srv.ctl_cmd("checkpoint", "--name", "v", "--view", "")
        if mode == "warm":
            fill(srv)
        return srv.fio(rw, bs)


def first_touch(args, work):
    import nbd
    n = 400
    with Server(args, work) as srv:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={srv.sock}")
        buf = b"\x5a" * 4096

        def lat(granules):
            out = []
            for g in granules:
                t = time.perf_counter()
                h.pwrite(buf, g * G)
                out.append((time.perf_counter() - t) * 1e6)
            return statistics.median(out)

        base = lat(range(0, n))
        srv.ctl_cmd("checkpoint", "--name", "v", "--view", "")
        first = lat(range(n, 2 * n))
        second = lat(range(n, 2 * n))
        h.shutdown()
    return base, first, second


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qnbd", default="build/qnbd")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--iodepth", type=int, default=32)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="qnbd-bench-views-")
    base = os.path.join(work, "base.qcow2")
    if not os.path.exists(base):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", base,
                        f"{args.size_mib}M"], check=True)
    modes = ["none", "view", "warm"]
    rows = {("rand", m): [] for m in modes} | {("seq", m): [] for m in modes}
    lats = []
    for rep in range(args.reps):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        for m in order:
            rows[("rand", m)].append(throughput(args, work, m, "randwrite", "4k")[0])
            rows[("seq", m)].append(throughput(args, work, m, "write", "1m")[1])
        lats.append(first_touch(args, work))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{'row':<24}{'no view':>12}{'view (cold)':>14}{'view (warm)':>14}")
    print(f"{'4k randwrite IOPS':<24}{med[('rand', 'none')]:>12.0f}{med[('rand', 'view')]:>14.0f}"
          f"{med[('rand', 'warm')]:>14.0f}")
    print(f"{'1M seqwrite MiB/s':<24}{med[('seq', 'none')]:>12.0f}{med[('seq', 'view')]:>14.0f}"
          f"{med[('seq', 'warm')]:>14.0f}")
    b, f, s = (statistics.median(x[i] for x in lats) for i in range(3))
    print(f"{'qd1 4k write lat us':<24}{b:>12.0f}{f:>14.0f}{s:>14.0f}   (view: first touch / second touch)")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
