#!/usr/bin/env python3
"""Cost of crash-safe bitmaps (docs/crash-safe-bitmaps.md), beside today's
tracking, no bitmap, and qemu-nbd with the same enabled bitmaps.

Configurations (each a writable server over its own fresh copy):
  qnbd crash-safe   `qnbd serve` (write-intent record on, the default)
  qnbd today        `qnbd serve --recover-bitmaps=no`
  qemu-nbd          `qemu-nbd` (in-memory tracking, stored at close)
each over an image with two enabled bitmaps, and qnbd / qemu-nbd over the
same image without bitmaps.

Rows (median of --reps):
  4k randwrite qd32, fresh    fio 4 KiB random overwrites of a fully
                              allocated 1 GiB qcow2, first run after start:
                              every write may dirty a new granule and touch a
                              new recovery chunk
  4k randwrite qd32, steady   the same fio run again on the same server
                              (--randrepeat: the same offsets, every granule
                              and chunk already dirty)
  1M seq write, empty qcow2   fio 1 MiB sequential allocating writes into a
                              new 1 GiB qcow2 (fresh bitmaps)
Targets (issue 11): steady within 5 % of today's tracking, fresh within 20 %.
Reported, never enforced; the shared build machine is noisy.

Usage: bench/crash_bitmaps.py [--qnbd build/qnbd] [--reps 3] [--runtime 5] [--no-pin]
                              [--workdir DIR] [--chunk BYTES]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import bitmap  # the sibling bench/bitmap.py: Server, images, fio helpers

MiB = 1 << 20
GiB = 1 << 30


def fio(uri, rw, bs, runtime, pin, size="1G"):
    argv = ["fio", "--name=cs", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", "--iodepth=32",
            "--numjobs=1", f"--size={size}", "--randrepeat=1", "--group_reporting", "--output-format=json"]
    if rw == "randwrite":
        argv += ["--time_based", f"--runtime={runtime}"]
    out = bitmap.run(bitmap.client(argv, pin)).stdout
    w = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return w["iops"] if bs == "4k" else w["bw_bytes"] / MiB


def server(kind, image, sock, args, extra):
    return bitmap.Server(kind, image, sock, args.qnbd, args.pin, True, extra=extra)


def configs(chunk):
    extra = ["--recovery-chunk-size", str(chunk)] if chunk else []
    return [
        ("qnbd crash-safe", "qnbd", True, extra),
        ("qnbd today", "qnbd", True, ["--recover-bitmaps=no"]),
        ("qemu-nbd", "qemu-nbd", True, []),
        ("qnbd no bitmap", "qnbd", False, []),
        ("qemu-nbd no bitmap", "qemu-nbd", False, []),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qnbd", default=os.path.join(os.path.dirname(__file__), "..", "build", "qnbd"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=int, default=5)
    p.add_argument("--chunk", type=int, default=0, help="--recovery-chunk-size for the crash-safe runs")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--workdir", default=os.environ.get("QNBD_BENCH_DIR", "/var/tmp/qnbd-bench-bitmap"))
    args = p.parse_args()
    args.qnbd = os.path.abspath(args.qnbd)
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    os.makedirs(args.workdir, exist_ok=True)
    images = bitmap.make_track_images(args.workdir)  # {"none": plain, "2 bitmaps": two}
    sockdir = tempfile.mkdtemp(prefix="qnbd-cs-bench-")
    rows = {"4k randwrite qd32, fresh (IOPS)": {}, "4k randwrite qd32, steady (IOPS)": {},
            "1M seq write, empty qcow2 (MiB/s)": {}}
    try:
        for rep in range(args.reps):
            for name, kind, bms, extra in bitmap.rotate(configs(args.chunk), rep):
                image = os.path.join(args.workdir, f"cs-{kind}.qcow2")
                # Random overwrites: fresh copy, synced, then two fio runs.
                shutil.copyfile(images["2 bitmaps" if bms else "none"], image)
                with open(image, "rb+") as f:
                    os.fsync(f.fileno())
                srv = server(kind, image, os.path.join(sockdir, "s.sock"), args, extra)
                try:
                    srv.start()
                    rows["4k randwrite qd32, fresh (IOPS)"].setdefault(name, []).append(
                        fio(srv.uri(), "randwrite", "4k", args.runtime, args.pin))
                    rows["4k randwrite qd32, steady (IOPS)"].setdefault(name, []).append(
                        fio(srv.uri(), "randwrite", "4k", args.runtime, args.pin))
                finally:
                    srv.stop()
                # Sequential allocating writes into an empty image.
                os.unlink(image)
                bitmap.run(["qemu-img", "create", "-f", "qcow2", image, "1G"])
                if bms:
                    for b in bitmap.TRACK_BITMAPS:
                        bitmap.run(["qemu-img", "bitmap", "--add", image, b])
                srv = server(kind, image, os.path.join(sockdir, "s.sock"), args, extra)
                try:
                    srv.start()
                    rows["1M seq write, empty qcow2 (MiB/s)"].setdefault(name, []).append(
                        fio(srv.uri(), "write", "1M", args.runtime, args.pin))
                finally:
                    srv.stop()
                    os.unlink(image)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    names = [c[0] for c in configs(args.chunk)]
    print("| row | " + " | ".join(names) + " | crash-safe / today |")
    print("|---|" + "---|" * (len(names) + 1))
    for row, samples in rows.items():
        med = {n: statistics.median(samples[n]) if samples.get(n) else None for n in names}
        cs, today = med["qnbd crash-safe"], med["qnbd today"]
        r = f"{(cs / today - 1) * 100:+.1f} %" if cs and today else "-"
        print(f"| {row} | " + " | ".join("-" if med[n] is None else f"{med[n]:,.0f}" for n in names) + f" | {r} |")


if __name__ == "__main__":
    sys.exit(main())
