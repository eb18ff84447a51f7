#!/usr/bin/env python3
"""Power loss at the system-call level, for test-serve-power-loss.sh.

  power_loss.py client URI EVENTS SEED SIZE THREADS OPS
      A seeded libnbd workload on THREADS connections (one thread each,
      one request in flight per connection): 512-byte-aligned WRITEs (some
      FUA), WRITE_ZEROES, TRIMs and FLUSHes, each thread on its own 64 KiB
      chunks, so the order of the changes to a sector is known. Every
      sector a WRITE stores is tagged with the request and the sector. One
      JSON line per request to EVENTS: send and reply times
      (CLOCK_MONOTONIC), the request, and whether it succeeded.

  power_loss.py check LOG INITDIR EVENTS WORK IMAGE FMT SIZE POINTS SEED QNBD BITMAP
      LOG is what write_log_shim.c recorded while the server ran. For
      POINTS crash moments (seeded), rebuild each file below INITDIR as a
      disk could hold it after a power loss right after that log record:
      every change a completed sync covers is kept, every later one is
      kept, dropped or (a write) torn per 512-byte sector. Then judge the
      image (IMAGE, relative to INITDIR):
        - qemu-img check: exit 0 or 3 (leaked clusters only);
        - each sector holds its last value that the client had been told
          is durable (a FLUSH answered after the write was answered, on any
          connection, or FUA), or a value written later, and nothing else
          (no other request's data, no stale data);
        - with BITMAP (not "-"): `QNBD serve` (writable, -B BITMAP) must
          recover the crash-safe bitmap, and every 64 KiB granule that
          differs from the start must be dirty in it; qemu-img check is
          clean after that too.
      Prints one summary line; exit 1 with the reason at the first failure.

The model: a change is durable once a sync of its file that started after
the change returned has returned; anything else may be on the disk or not,
in any combination, a write torn at 512-byte sectors (a disk keeps each
sector whole). That is what POSIX promises the server and no more. Left
out: directory entries (a file the log names exists after the crash) and
the file system's own metadata (a file's size follows the changes kept).
"""
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

SECTOR = 512
CHUNK = 64 << 10
REC = struct.Struct("<QIIQQII")
OPEN, WRITE, FALLOCATE, TRUNCATE, SYNC_START, SYNC_END = 1, 2, 3, 4, 5, 6
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
TAG = struct.Struct("<8sII")  # magic, request id, sector


def tagged(req, first_sector, count):
    out = bytearray()
    for s in range(first_sector, first_sector + count):
        out += TAG.pack(b"QNBDPWR!", req, s) * (SECTOR // TAG.size)
    return bytes(out)


# ---------------------------------------------------------------- client


def client(uri, events_path, seed, size, threads, ops):
    import nbd

    chunks = size // CHUNK
    lock = threading.Lock()
    events = []
    next_id = [1]
    errors = []

    def worker(t):
        rnd = random.Random(seed * 100 + t)
        h = nbd.NBD()
        h.connect_uri(uri)
        mine = [c for c in range(chunks) if c % threads == t]
        for _ in range(ops):
            c = rnd.choice(mine)
            first = rnd.randrange(CHUNK // SECTOR)
            count = rnd.randrange(1, CHUNK // SECTOR - first + 1)
            off = c * CHUNK + first * SECTOR
            ln = count * SECTOR
            r = rnd.random()
            with lock:
                rid = next_id[0]
                next_id[0] += 1
            ev = {"id": rid, "thread": t, "off": off, "len": ln, "fua": False}
            t0 = time.monotonic_ns()
            try:
                if r < 0.6:
                    ev["op"] = "write"
                    ev["fua"] = rnd.random() < 0.15
                    h.pwrite(tagged(rid, off // SECTOR, count), off, nbd.CMD_FLAG_FUA if ev["fua"] else 0)
                elif r < 0.72:
                    ev["op"] = "zero"
                    flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.3 else 0
                    h.zero(ln, off, flags)
                elif r < 0.82:
                    ev["op"] = "trim"
                    h.trim(ln, off)
                else:
                    ev["op"] = "flush"
                    ev["off"] = ev["len"] = 0
                    h.flush()
                ev["ok"] = True
            except nbd.Error as e:
                ev["ok"] = False
                errors.append(f"{ev}: {e}")
            ev["t0"], ev["t1"] = t0, time.monotonic_ns()
            with lock:
                events.append(ev)
        h.shutdown()

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(events_path, "w") as f:
        for ev in sorted(events, key=lambda e: e["t0"]):
            f.write(json.dumps(ev) + "\n")
    if errors:
        print("requests failed:", *errors[:5], sep="\n  ")
        return 1
    print(f"{len(events)} requests on {threads} connections")
    return 0


# ---------------------------------------------------------------- check


def read_log(path):
    recs = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + REC.size <= len(data):
        t, op, file, off, ln, mode, tid = REC.unpack_from(data, pos)
        pos += REC.size
        payload = None
        if op in (OPEN, WRITE):
            if pos + ln > len(data):
                break  # the SIGKILL came in the middle of this record
            payload = data[pos : pos + ln]
            pos += ln
        recs.append((t, op, file, off, ln, mode, tid, payload))
    return recs


def covered_until(recs):
    """For each record index k: per file, the index of the latest SYNC_START
    whose SYNC_END (same file and thread) is at or before k. A change logged
    before that index is durable at a crash right after record k."""
    open_starts = {}
    ends = []  # (end index, file, start index)
    for i, r in enumerate(recs):
        if r[1] == SYNC_START:
            open_starts[(r[2], r[6])] = i
        elif r[1] == SYNC_END:
            ends.append((i, r[2], open_starts.pop((r[2], r[6]))))
    return ends


def rebuild(recs, upto, ends, init, rnd):
    """The files as a power loss right after record `upto` may leave them."""
    durable = {}
    for end_i, file, start_i in ends:
        if end_i <= upto:
            durable[file] = max(durable.get(file, -1), start_i)
    names = {}
    files = {}
    for i in range(upto + 1):
        t, op, file, off, ln, mode, tid, payload = recs[i]
        if op == OPEN:
            name = payload.decode()
            names[file] = name
            p = os.path.join(init, name)
            files[file] = bytearray(open(p, "rb").read()) if os.path.exists(p) else bytearray()
            continue
        if op not in (WRITE, FALLOCATE, TRUNCATE):
            continue
        buf = files[file]
        keep = i < durable.get(file, -1)
        if not keep:
            choice = rnd.random()
            if choice < 0.35:
                continue  # lost
            if op == WRITE and choice < 0.6:
                # torn: each sector independently
                for s in range(0, ln, SECTOR):
                    if rnd.random() < 0.5:
                        end = off + min(ln, s + SECTOR)
                        if len(buf) < end:
                            buf.extend(bytes(end - len(buf)))
                        buf[off + s : end] = payload[s : min(ln, s + SECTOR)]
                continue
        if op == WRITE:
            if len(buf) < off + ln:
                buf.extend(bytes(off + ln - len(buf)))
            buf[off : off + ln] = payload
        elif op == TRUNCATE:
            if off < len(buf):
                del buf[off:]
            else:
                buf.extend(bytes(off - len(buf)))
        elif op == FALLOCATE:
            end = off + ln
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                z = min(end, len(buf))
                if z > off:
                    buf[off:z] = bytes(z - off)
            if not (mode & FALLOC_FL_KEEP_SIZE) and len(buf) < end:
                buf.extend(bytes(end - len(buf)))
    return names, files


def sector_history(events, size):
    """Per sector, the successful requests that changed it, in order."""
    hist = [[] for _ in range(size // SECTOR)]
    for ev in events:
        if ev["op"] == "flush" or not ev["ok"]:
            continue
        for s in range(ev["off"] // SECTOR, (ev["off"] + ev["len"]) // SECTOR):
            hist[s].append(ev)
    return hist


def judge_data(raw, events, hist, crash_t, init_raw):
    flush_t0 = [e["t0"] for e in events if e["op"] == "flush" and e["ok"] and e["t1"] < crash_t]
    durable_before = max(flush_t0, default=-1)

    def durable(e):
        return e["t1"] < durable_before or (e["fua"] and e["t1"] < crash_t)

    checked = 0
    for s, h in enumerate(hist):
        if not h:
            continue
        g = -1  # index in h of the last request known durable; -1: the start
        for j, e in enumerate(h):
            if durable(e):
                g = j
        allowed = ([None] if g < 0 else [h[g]]) + [e for e in h[g + 1 :] if e["t0"] < crash_t]
        got = raw[s * SECTOR : (s + 1) * SECTOR]
        if any(e is not None and e["op"] == "trim" for e in allowed):
            continue  # a TRIM leaves the sector's content unspecified
        ok = False
        for e in allowed:
            if e is None:
                ok = got == init_raw[s * SECTOR : (s + 1) * SECTOR]
            elif e["op"] == "zero":
                ok = got == bytes(SECTOR)
            else:
                ok = got == tagged(e["id"], s, 1)
            if ok:
                break
        if not ok:
            magic, rid, sec = TAG.unpack_from(got)
            what = f"request {rid} sector {sec}" if magic == b"QNBDPWR!" else got[:16].hex()
            want = ["start" if e is None else f"{e['op']} {e['id']}" for e in allowed]
            return f"sector {s} (offset {s * SECTOR}) holds {what}; allowed: {', '.join(want)}"
        checked += 1
    return checked


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def bitmap_dirty(uri, bitmap):
    out = run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri], timeout=60)
    if out.returncode:
        raise RuntimeError(f"nbdinfo --map: {out.stderr.strip()}")
    return [(e["offset"], e["length"]) for e in json.loads(out.stdout) if e["type"] & 1]


def serve_and_read_bitmap(qnbd, image, fmt, bitmap, work):
    sock = os.path.join(work, "recover.sock")
    pidfile = os.path.join(work, "recover.pid")
    for p in (sock, pidfile):
        if os.path.exists(p):
            os.unlink(p)
    log = open(os.path.join(work, "recover.log"), "w")
    proc = subprocess.Popen(
        [qnbd, "serve", "-k", sock, "--pid-file", pidfile, "-t", "-f", fmt, "-B", bitmap, image],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(400):
            if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0:
                break
            if proc.poll() is not None:
                raise RuntimeError("qnbd serve exited: " + open(log.name).read().strip())
            time.sleep(0.025)
        else:
            raise RuntimeError("qnbd serve did not start")
        return bitmap_dirty(f"nbd+unix:///?socket={sock}", bitmap)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError("qnbd serve did not stop on SIGTERM")
        log.close()
        if proc.returncode != 0:
            raise RuntimeError(f"qnbd serve exited {proc.returncode}: " + open(log.name).read().strip())


def check(log, init, events_path, work, image, fmt, size, points, seed, qnbd, bitmap):
    recs = read_log(log)
    if not recs:
        print("the log is empty")
        return 1
    events = [json.loads(line) for line in open(events_path)]
    hist = sector_history(events, size)
    ends = covered_until(recs)
    rnd = random.Random(seed)
    os.makedirs(work, exist_ok=True)
    init_raw_path = os.path.join(work, "init.raw")
    # From the image's folder: QEMU 7.2 opens a relative data file name
    # from its working directory.
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, init_raw_path], cwd=init).check_returncode()
    init_raw = open(init_raw_path, "rb").read()
    # Crash moments: spread over the log, the last record included.
    n = len(recs)
    picks = sorted({rnd.randrange(n) for _ in range(points - 1)} | {n - 1})
    syncs = sum(1 for r in recs if r[1] == SYNC_END)
    writes = sum(1 for r in recs if r[1] == WRITE)
    total_checked = leaks = recovered = 0
    for k in picks:
        crash_t = recs[k][0]
        names, files = rebuild(recs, k, ends, init, rnd)
        d = os.path.join(work, "crash")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(init, d)
        for fid, name in names.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(files[fid])
        img = os.path.join(d, image)
        where = f"crash after record {k} of {n}"
        if fmt == "qcow2":
            c = run(["qemu-img", "check", "-q", "-f", "qcow2", image], cwd=d)
            if c.returncode not in (0, 3):
                print(f"{where}: qemu-img check exit {c.returncode}: {(c.stdout + c.stderr).strip()[:2000]}")
                return 1
            leaks += c.returncode == 3
        raw = os.path.join(work, "crash.raw")
        c = run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, raw], cwd=d)
        if c.returncode:
            print(f"{where}: qemu-img convert: {c.stderr.strip()}")
            return 1
        got = open(raw, "rb").read()
        res = judge_data(got, events, hist, crash_t, init_raw)
        if isinstance(res, str):
            print(f"{where}: {res}")
            return 1
        total_checked += res
        if bitmap != "-":
            try:
                dirty = serve_and_read_bitmap(qnbd, img, fmt, bitmap, work)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"{where}: {e}")
                return 1
            marked = bytearray(size // CHUNK)
            for off, ln in dirty:
                for c_ in range(off // CHUNK, (off + ln + CHUNK - 1) // CHUNK):
                    marked[c_] = 1
            for c_ in range(size // CHUNK):
                a, b = c_ * CHUNK, (c_ + 1) * CHUNK
                if got[a:b] != init_raw[a:b] and not marked[c_]:
                    print(f"{where}: granule {a} changed but is not dirty in bitmap {bitmap}")
                    return 1
            c = run(["qemu-img", "check", "-q", "-f", "qcow2", image], cwd=d)
            if c.returncode not in (0, 3):
                print(f"{where}: after the recovery: qemu-img check exit {c.returncode}: {c.stdout.strip()[:2000]}")
                return 1
            recovered += 1
    print(
        f"{len(picks)} crash points over {n} records ({writes} writes, {syncs} syncs); "
        f"{total_checked} sector checks; {leaks} with leaks only; {recovered} bitmap recoveries"
    )
    return 0


def main(argv):
    if len(argv) == 8 and argv[1] == "client":
        return client(argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]), int(argv[7]))
    if len(argv) == 13 and argv[1] == "check":
        a = argv[2:]
        return check(a[0], a[1], a[2], a[3], a[4], a[5], int(a[6]), int(a[7]), int(a[8]), a[9], a[10])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
