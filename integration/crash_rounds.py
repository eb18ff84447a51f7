#!/usr/bin/env python3
"""SIGKILL rounds for test-bitmap-crash.sh: a writable `qnbd serve` with two
enabled bitmaps is killed (SIGKILL, by its PID) while two libnbd
connections write; the restarted server must recover the bitmaps:

  - it starts with -B for both (no in_use refusal) and exports them;
  - every granule whose data differs from the round's start is dirty;
  - every dirty granule lies in a recovery chunk some request touched
    (the bitmaps are cleared with qemu-img bitmap --clear before each round);
  - every few rounds qemu-nbd -B reports the same extents as qnbd.

Usage: crash_rounds.py QNBD IMAGE TMPDIR ROUNDS SEED CHUNK
Prints one summary line; exit 1 with the reason on the first failure.
"""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import nbd

BITMAPS = ("b0", "b1")


def wait_pidfile(proc, pidfile, what):
    for _ in range(400):
        if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0:
            return
        if proc.poll() is not None:
            sys.exit(f"{what} exited with status {proc.returncode} before listening: "
                     f"{proc.stderr.read().decode(errors='replace').strip()}")
        time.sleep(0.025)
    sys.exit(f"{what} did not start within 10 s")


def start(cmd, pidfile, what):
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    LIVE.append(proc)
    wait_pidfile(proc, pidfile, what)
    return proc


def stop(proc, what, ok=(0,)):
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    LIVE.remove(proc)
    if rc not in ok:
        sys.exit(f"{what} exited with status {rc}: {proc.stderr.read().decode(errors='replace').strip()}")


LIVE = []


def extents(h, ctx, size):
    """Dirty byte ranges of meta context ctx: list of (start, end)."""
    out = []
    off = 0
    while off < size:
        got = []

        def cb(meta, offset, entries, err):
            if meta == ctx:
                got.extend(entries)
            return 0

        h.block_status(min(size - off, 1 << 30), off, cb)
        if not got:
            sys.exit(f"no extents for {ctx} at {off}")
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            length = min(length, size - off)
            if flags & 1:
                out.append((off, off + length))
            off += length
            if off >= size:
                break
    return out


def read_export(sock, size_hint=None):
    h = nbd.NBD()
    for b in BITMAPS:
        h.add_meta_context("qemu:dirty-bitmap:" + b)
    h.connect_unix(sock)
    size = h.get_size()
    data = bytearray()
    for off in range(0, size, 4 << 20):
        data += h.pread(min(4 << 20, size - off), off)
    maps = {b: extents(h, "qemu:dirty-bitmap:" + b, size) for b in BITMAPS}
    h.shutdown()
    return bytes(data), maps


def writer(uri_sock, rng_seed, touched, lock, stop_flag):
    rng = random.Random(rng_seed)
    try:
        h = nbd.NBD()
        h.connect_unix(uri_sock)
        size = h.get_size()
        while not stop_flag.is_set():
            length = rng.randrange(1, 300000 if rng.randrange(6) == 0 else 30000)
            off = rng.randrange(0, size - length + 1)
            kind = rng.randrange(100)
            if kind < 10:
                h.flush()
                continue
            with lock:
                touched.append((off, length))
            if kind < 75:
                h.pwrite(bytes([rng.randrange(1, 256)]) * length, off)
            elif kind < 90:
                h.zero(length, off)
            else:
                h.trim(length, off)
    except nbd.Error:
        pass  # the server was killed


def main():
    qnbd, img, tmp, rounds, seed, chunk = sys.argv[1:7]
    rounds, seed, chunk = int(rounds), int(seed), int(chunk)
    rng = random.Random(seed)
    sock, pid = os.path.join(tmp, "rounds.sock"), os.path.join(tmp, "rounds.pid")
    serve = [qnbd, "serve", "-k", sock, "--pid-file", pid, "-f", "qcow2", "-e", "2", "-t",
             "--recovery-chunk-size", str(chunk)]
    export_b = []
    for b in BITMAPS:
        export_b += ["-B", b]
    granularity = {}
    for b, g in zip(BITMAPS, (65536, 524288)):
        granularity[b] = g

    proc = start(serve + export_b + [img], pid, "qnbd serve (first)")
    base, _ = read_export(sock)
    stop(proc, "qnbd serve (first)")
    totals = {"kills": 0, "changed": 0, "dirty": 0, "untouched_dirty": 0, "requests": 0, "qemu_compared": 0}
    for r in range(rounds):
        for b in BITMAPS:
            subprocess.run(["qemu-img", "bitmap", "--clear", img, b], check=True)
        proc = start(serve + [img], pid, f"round {r}: qnbd serve")
        touched, lock, stop_flag = [], threading.Lock(), threading.Event()
        threads = [threading.Thread(target=writer, args=(sock, seed * 1000 + r * 2 + k, touched, lock, stop_flag))
                   for k in range(2)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        LIVE.remove(proc)
        stop_flag.set()
        for t in threads:
            t.join(30)
        totals["kills"] += 1
        totals["requests"] += len(touched)

        proc = start(serve + export_b + [img], pid, f"round {r}: qnbd serve -B after the kill")
        data, maps = read_export(sock)
        stop(proc, f"round {r}: qnbd serve -B after the kill")
        if len(data) != len(base):
            sys.exit(f"round {r}: size changed")
        for b in BITMAPS:
            g = granularity[b]
            dirty = set()
            for s, e in maps[b]:
                dirty.update(range(s // g, (e + g - 1) // g))
            for k in range(0, len(data) // g):
                if data[k * g:(k + 1) * g] != base[k * g:(k + 1) * g]:
                    totals["changed"] += 1
                    if k not in dirty:
                        sys.exit(f"round {r}: bitmap {b}: granule {k} ({k * g}) changed but is clean "
                                 f"(under-reported; {len(touched)} requests)")
            totals["dirty"] += len(dirty)
            for k in dirty:
                s, e = k * g, (k + 1) * g
                req = any(o < e and s < o + n for o, n in touched)
                in_chunk = any(o // chunk * chunk < e and s < -(-(o + n) // chunk) * chunk for o, n in touched)
                if not in_chunk:
                    sys.exit(f"round {r}: bitmap {b}: granule {k} dirty outside every touched chunk")
                if not req:
                    totals["untouched_dirty"] += 1
        if r % 10 == 0:
            qsock, qpid = os.path.join(tmp, "q.sock"), os.path.join(tmp, "q.pid")
            q = start(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", qsock, "--pid-file", qpid] + export_b + [img],
                      qpid, "qemu-nbd -B")
            qdata, qmaps = read_export(qsock)
            stop(q, "qemu-nbd -B", ok=(0, 143, -15))
            if qmaps != maps or qdata != data:
                sys.exit(f"round {r}: qemu-nbd -B disagrees with qnbd on the recovered bitmaps")
            totals["qemu_compared"] += 1
        base = data
    print("kills {kills}, requests {requests}, changed granules {changed} (all dirty), dirty granules {dirty}, "
          "dirty without a touching request {untouched_dirty} (all inside touched chunks), "
          "qemu-nbd comparisons {qemu_compared}".format(**totals))


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in LIVE:
            p.kill()
            p.wait()
