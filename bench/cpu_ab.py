#!/usr/bin/env python3
"""Server CPU per unit of work, two qnbd binaries side by side.

Throughput on a shared 2-core machine moves by ±10 % between rounds of the
same binary (bench.py's rows show it); the CPU time the server spends per
request or per GiB moves far less, so it is the fairer way to ask "did
this change make the server cheaper or dearer". Each row runs a fixed
amount of work (not a time base) against --a and --b in alternating order,
server and client pinned to separate CPUs, and reads the server's user +
system time from /proc/PID/stat just before stopping it.

  bench/cpu_ab.py --a build/qnbd --b /path/to/older/qnbd [--reps 5] [--only ROW]

Prints, per row: median server CPU per unit for each binary, b ÷ a (above
1: --a is cheaper), and the median rate as a cross-check. Reports only;
gates nothing. Images come from bench.py (same workdir, made on first use).
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (its Images class makes the same images)

GiB = 1 << 30


def fio(uri, *args):
    return ["fio", "--name=cpu", "--ioengine=nbd", f"--uri={uri}", "--output-format=terse", *args]


# name, image key ("full" or "frag" read-only, "rw" a writable copy of
# "full"), client argv
# builder, units of work per run, unit label.
ROWS = [
    ("nbdcopy seq read, 1 conn", "full",
     lambda u: ["nbdcopy", "--connections=1", "--requests=16", u, "null:"], 2, "GiB"),
    ("nbdcopy seq read, 4 conns", "full",
     lambda u: ["nbdcopy", "--connections=4", "--requests=16", u, "null:"], 2, "GiB"),
    ("fio 1M seq read qd8", "full",
     lambda u: fio(u, "--rw=read", "--bs=1M", "--iodepth=8", "--size=2G", "--loops=2"), 4096, "request"),
    ("fio 4k randread qd1", "full",
     lambda u: fio(u, "--rw=randread", "--bs=4k", "--iodepth=1", "--size=2G", "--number_ios=50000"), 50000,
     "request"),
    ("fio 4k randread qd32", "full",
     lambda u: fio(u, "--rw=randread", "--bs=4k", "--iodepth=32", "--size=2G", "--number_ios=200000"), 200000,
     "request"),
    # QEMU's client sends BLOCK_STATUS with REQ_ONE: one request per extent,
    # 131,072 of them on this image (every other 512-byte cluster allocated).
    ("qemu-img map (REQ_ONE), 64M 512B clusters", "frag",
     lambda u: ["qemu-img", "map", "--output=json", "-f", "raw", u], 131072, "request"),
    ("fio 4k randwrite qd32", "rw",
     lambda u: fio(u, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=2G", "--number_ios=200000"), 200000,
     "request"),
]


def server_cpu_seconds(pid):
    # Fields 14 and 15 of /proc/PID/stat (utime, stime), after the ")" of comm.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(binary, image, writable, client_argv, args, sock):
    if os.path.exists(sock):
        os.unlink(sock)
    argv = ["taskset", "-c", args.server_cpus, binary, "serve", "-t", "-e", "16", "-f", "qcow2", "-k", sock]
    proc = subprocess.Popen(argv + ([] if writable else ["-r"]) + [image], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{binary} did not start: {proc.stderr.read().decode(errors='replace')}")
            time.sleep(0.02)
        t0 = time.perf_counter()
        subprocess.run(["taskset", "-c", args.client_cpus, *client_argv(f"nbd+unix:///?socket={sock}")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        cpu = server_cpu_seconds(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return cpu, wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="qnbd binary (e.g. today's build)")
    p.add_argument("--b", required=True, help="qnbd binary to compare with (e.g. an older build)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default="", help="run rows whose name contains this")
    p.add_argument("--server-cpus", default="1")
    p.add_argument("--client-cpus", default="0")
    p.add_argument("--workdir", default=os.environ.get("QNBD_BENCH_DIR", "/var/tmp/qnbd-bench"))
    args = p.parse_args()
    for tool in ("nbdcopy", "fio", "qemu-img", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"cpu_ab.py: {tool} not found")
    os.makedirs(args.workdir, exist_ok=True)
    images = bench.Images(args.workdir, tempfile.mkdtemp(prefix="qnbd-cpu-ab-shm-"))
    full = images.get("full")["qcow2"]
    rw = os.path.join(args.workdir, "cpu-ab-rw.qcow2")
    sockdir = tempfile.mkdtemp(prefix="qnbd-cpu-ab-")
    sock = os.path.join(sockdir, "s.sock")
    print(f"# server CPU per unit: a = {args.a}, b = {args.b}; {args.reps} reps, medians, "
          f"server on CPU {args.server_cpus}, client on CPU {args.client_cpus}")
    print()
    print("| workload | unit | a: server CPU | b: server CPU | b ÷ a | a: MiB/s or req/s | b: MiB/s or req/s |")
    print("|---|---|---|---|---|---|---|")
    for name, key, client_argv, units, unit in ROWS:
        if args.only and args.only not in name:
            continue
        if key == "rw":
            shutil.copyfile(full, rw)  # both binaries overwrite the same allocated clusters
        image = {"full": full, "rw": rw}.get(key) or images.get(key)["qcow2"]
        bench.warm(image)
        samples = {"a": [], "b": []}
        rate_scale = 1024 if unit == "GiB" else 1  # GiB rows: MiB/s
        for rep in range(args.reps):
            for which in (("a", "b") if rep % 2 == 0 else ("b", "a")):
                binary = args.a if which == "a" else args.b
                cpu, wall = one_run(binary, image, key == "rw", client_argv, args, sock)
                samples[which].append((cpu / units, units * rate_scale / wall))
        med = {w: (statistics.median(c for c, _ in s), statistics.median(r for _, r in s)) for w, s in samples.items()}
        scale, label = (1e3, "ms") if unit == "GiB" else (1e6, "µs")
        print(f"| {name} | {label} per {unit} | {med['a'][0] * scale:.2f} | {med['b'][0] * scale:.2f} | "
              f"{med['b'][0] / med['a'][0]:.2f} | {med['a'][1]:,.0f} | {med['b'][1]:,.0f} |", flush=True)
    if os.path.exists(rw):
        os.unlink(rw)
    shutil.rmtree(sockdir, ignore_errors=True)


if __name__ == "__main__":
    main()
