#!/usr/bin/env python3
"""Checkpoint benchmark: what writers pay for live checkpoints (docs/control.md).

Rows (medians over --reps; each rep runs both modes, alternating the order):
  pause     the longest time a checkpoint held writes back (pause_us reported
            by `qnbd ctl checkpoint`), over every checkpoint of the run
  iops      fio 4 KiB random write IOPS (ioengine=nbd, --iodepth, one job)
            on a writable qcow2 export, with a checkpoint every second
            (`checkpoint --name cN --disable cN-1`) vs. none
  max-lat   fio's longest write completion latency in each mode: the
            checkpoint pause as a writer sees it
  p99-lat   fio's 99th percentile write completion latency in each mode
The image (1 GiB qcow2, preallocated with qemu-img so overwrites do not
allocate) is copied fresh for every run.

Usage: bench/checkpoint.py [--qnbd build/qnbd] [--reps 3] [--runtime 5] [--iodepth 32] [--workdir DIR]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time


def run(args, mode, work):
    img = os.path.join(work, "run.qcow2")
    shutil.copyfile(os.path.join(work, "base.qcow2"), img)
    sock, ctl, pid = (os.path.join(work, n) for n in ("nbd.sock", "ctl.sock", "pid"))
    for p in (sock, ctl, pid):
        if os.path.exists(p):
            os.unlink(p)
    srv = subprocess.Popen([args.qnbd, "serve", "-t", "-f", "qcow2", "-k", sock, "--control", ctl,
                            "--pid-file", pid, img], stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(pid) and os.path.getsize(pid) > 0:
            break
        time.sleep(0.05)
    pauses = []
    stop = threading.Event()

    def checkpoints():
        n = 0
        subprocess.run([args.qnbd, "ctl", "-s", ctl, "checkpoint", "--name", "c0", ""], check=True,
                       capture_output=True)
        while not stop.wait(1.0):
            n += 1
            out = subprocess.run([args.qnbd, "ctl", "-s", ctl, "--output=json", "checkpoint", "--name", f"c{n}",
                                  "--disable", f"c{n - 1}", ""], capture_output=True, text=True, check=True)
            pauses.append(json.loads(out.stdout)["result"]["pause_us"])

    t = threading.Thread(target=checkpoints) if mode == "checkpoints" else None
    if t:
        t.start()
    fio = subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                          "--rw=randwrite", "--bs=4k", f"--iodepth={args.iodepth}", "--size=1g",
                          f"--runtime={args.runtime}", "--time_based", "--output-format=json"],
                         capture_output=True, text=True, check=True)
    stop.set()
    if t:
        t.join()
    srv.terminate()
    srv.wait()
    w = json.loads(fio.stdout[fio.stdout.index("{"):])["jobs"][0]["write"]  # fio may print notes first
    return {"iops": w["iops"], "max_lat_ms": w["clat_ns"]["max"] / 1e6,
            "p99_lat_ms": w["clat_ns"]["percentile"]["99.000000"] / 1e6,
            "pause_us": max(pauses) if pauses else 0.0, "checkpoints": len(pauses)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qnbd", default="build/qnbd")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--iodepth", type=int, default=32)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="qnbd-bench-cp-")
    base = os.path.join(work, "base.qcow2")
    if not os.path.exists(base):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", base, "1G"], check=True)
    results = {"none": [], "checkpoints": []}
    for rep in range(args.reps):
        for mode in (["none", "checkpoints"] if rep % 2 == 0 else ["checkpoints", "none"]):
            results[mode].append(run(args, mode, work))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    print(f"{'row':<24}{'no checkpoints':>16}{'checkpoint/s':>16}")
    print(f"{'4k randwrite IOPS':<24}{med['none']['iops']:>16.0f}{med['checkpoints']['iops']:>16.0f}")
    print(f"{'max write latency ms':<24}{med['none']['max_lat_ms']:>16.2f}{med['checkpoints']['max_lat_ms']:>16.2f}")
    print(f"{'p99 write latency ms':<24}{med['none']['p99_lat_ms']:>16.2f}{med['checkpoints']['p99_lat_ms']:>16.2f}")
    print(f"{'longest pause us':<24}{'-':>16}{med['checkpoints']['pause_us']:>16.0f}")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
