#!/usr/bin/env python3
"""Power loss at the system-call level, for test-serve-power-loss.sh.

  power_loss.py client URI EVENTS SEED SIZE THREADS OPS [QNBD CONTROL_SOCKET]
      A seeded libnbd workload on THREADS connections (one thread each,
      one request in flight per connection): 512-byte-aligned WRITEs (some
      FUA), WRITE_ZEROES, TRIMs and FLUSHes, each thread on its own 64 KiB
      chunks, so the order of the changes to a sector is known. Every
      sector a WRITE stores is tagged with the request and the sector. One
      JSON line per request to EVENTS: send and reply times
      (CLOCK_MONOTONIC), the request, and whether it succeeded. With
      QNBD and CONTROL_SOCKET, a further thread takes checkpoints while
      they run (`qnbd ctl checkpoint`: c1 disables b0, c2 disables c1...);
      with QNBD_POWER_BITMAP_EDITS=1 in the environment it edits other
      bitmaps instead (add, clear, disable, enable, merge b0 in, remove).

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
          connection, or FUA; with WRITETHROUGH=1 in the environment, for a
          server run with --cache=writethrough, every answered change, as
          qemu's writethrough promises), or a value written later, and
          nothing else (no other request's data, no stale data);
        - with BITMAP (not "-"; the image starts with the enabled bitmap
          b0): a writable `QNBD serve` must recover every bitmap
          (judge_bitmaps says what each must hold, with and without
          checkpoints), and qemu-img check is clean after that too.
      Prints one summary line; exit 1 with the reason at the first failure.

The model: a change is durable once a sync of its file that started after
the change returned has returned; anything else may be on the disk or not,
in any combination, a write torn at 512-byte sectors (a disk keeps each
sector whole). Names (a file created, renamed or removed) change in order:
those a sync of the folder covers, then any prefix of the rest. That is
what POSIX (and a journaling file system's ordered metadata) promises the
server and no more. Left out: the file system's own metadata beyond that
(a file's size follows the changes kept).
"""
import bisect
import hashlib
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
OPEN, WRITE, FALLOCATE, TRUNCATE, SYNC_START, SYNC_END, RENAME, UNLINK = 1, 2, 3, 4, 5, 6, 7, 8
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
TAG = struct.Struct("<8sII")  # magic, request id, sector


def tagged(req, first_sector, count):
    out = bytearray()
    for s in range(first_sector, first_sector + count):
        out += TAG.pack(b"QNBDPWR!", req, s) * (SECTOR // TAG.size)
    return bytes(out)


# ---------------------------------------------------------------- client


def client(uri, events_path, seed, size, threads, ops, ctl=None):
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

    done = threading.Event()

    views = os.environ.get("QNBD_POWER_VIEWS") == "1"

    def checkpoints(qnbd, sock):
        # Checkpoint c1 disables b0, c2 disables c1, ... while the writers
        # run (qnbd ctl checkpoint, docs/control.md). With
        # QNBD_POWER_VIEWS=1 each opens a point-in-time view of the export
        # (docs/backup-views.md), the one two checkpoints back ended: the
        # writers' requests save old data to the views' scratch first.
        rnd = random.Random(seed * 100 + 99)
        prev, n = "b0", 0
        while not done.wait(rnd.uniform(0.002, 0.02)):
            n += 1
            name = f"c{n}"
            t0 = time.monotonic_ns()
            view = ["--view"] if views else []
            r = subprocess.run([qnbd, "ctl", "-s", sock, "checkpoint", "--name", name, "--disable", prev] + view + [""],
                               capture_output=True, text=True)
            ev = {"id": 0, "op": "checkpoint", "name": name, "prev": prev, "ok": r.returncode == 0,
                  "t0": t0, "t1": time.monotonic_ns()}
            with lock:
                events.append(ev)
            if r.returncode:
                errors.append(f"checkpoint {name}: {r.stderr.strip()}")
                return
            if views and n > 2:
                # Two views live at a time: each write saves old data for both.
                r = subprocess.run([qnbd, "ctl", "-s", sock, "view-end", "--checkpoint", f"c{n - 2}"],
                                   capture_output=True, text=True)
                if r.returncode:
                    errors.append(f"view-end c{n - 2}: {r.stderr.strip()}")
                    return
            prev = name

    edits = []

    def bitmap_edits(qnbd, sock):
        # Live edits of other bitmaps beside b0 while the writers run: add,
        # clear, disable, enable, merge b0 in, remove (docs/control.md). b0
        # is judged as without them; every bitmap must be consistent after
        # the recovery.
        rnd = random.Random(seed * 100 + 98)
        enabled, live, n = set(), [], 0
        while not done.wait(rnd.uniform(0, 0.005)):
            if not live or (len(live) < 3 and rnd.random() < 0.3):
                n += 1
                name = f"x{n}"
                args = ["bitmap-add", "", name] + (["-g", "4096"] if rnd.random() < 0.5 else [])
                live.append(name)
                enabled.add(name)
            else:
                name = rnd.choice(live)
                op = rnd.choice(["clear", "toggle", "merge", "remove"])
                if op == "toggle":
                    args = ["bitmap-disable" if name in enabled else "bitmap-enable", "", name]
                    enabled ^= {name}
                elif op == "merge":
                    args = ["bitmap-merge", "", name, "b0"]
                elif op == "remove":
                    args = ["bitmap-remove", "", name]
                    live.remove(name)
                    enabled.discard(name)
                else:
                    args = ["bitmap-clear", "", name]
            r = subprocess.run([qnbd, "ctl", "-s", sock] + args, capture_output=True, text=True)
            if r.returncode:
                errors.append(f"{' '.join(args)}: {r.stderr.strip()}")
                return
            edits.append(args[0])

    cycles = []
    cycle_events = []

    def export_cycle(qnbd, sock):
        # A second image, E, served and closed over and over through the
        # control socket while the writers run, 16 times at least:
        # export-add (its bitmaps marked in use), a few requests on one
        # connection, export-remove (bitmaps stored, in use cleared: a
        # clean close). Its requests go to EVENTS.e; an export-remove that
        # returned is a flush of E.
        image = os.environ["QNBD_POWER_CYCLE_IMAGE"]
        rnd = random.Random(seed * 100 + 97)
        uri_e = uri.replace(":///", ":///e", 1) if ":///?" in uri else None
        if uri_e is None:
            errors.append(f"cannot name export e in {uri}")
            return
        chunks_e = size // CHUNK
        while not done.is_set() or len(cycles) < 16:
            r = subprocess.run([qnbd, "ctl", "-s", sock, "export-add", "e", image, "-B", "b0"],
                               capture_output=True, text=True)
            if r.returncode:
                errors.append(f"export-add e: {r.stderr.strip()}")
                return
            h = nbd.NBD()
            h.connect_uri(uri_e)
            for _ in range(rnd.randrange(1, 9)):
                c = rnd.randrange(chunks_e)
                first = rnd.randrange(CHUNK // SECTOR)
                count = rnd.randrange(1, CHUNK // SECTOR - first + 1)
                off, ln = c * CHUNK + first * SECTOR, count * SECTOR
                with lock:
                    rid = next_id[0]
                    next_id[0] += 1
                ev = {"id": rid, "thread": -1, "off": off, "len": ln, "fua": False}
                t0 = time.monotonic_ns()
                x = rnd.random()
                try:
                    if x < 0.7:
                        ev["op"] = "write"
                        h.pwrite(tagged(rid, off // SECTOR, count), off)
                    elif x < 0.85:
                        ev["op"] = "zero"
                        h.zero(ln, off)
                    else:
                        ev["op"] = "trim"
                        h.trim(ln, off)
                    ev["ok"] = True
                except nbd.Error as e:
                    ev["ok"] = False
                    errors.append(f"{ev} on e: {e}")
                ev["t0"], ev["t1"] = t0, time.monotonic_ns()
                cycle_events.append(ev)
            h.shutdown()
            t0 = time.monotonic_ns()
            r = subprocess.run([qnbd, "ctl", "-s", sock, "export-remove", "e", "--force"], capture_output=True, text=True)
            if r.returncode:
                errors.append(f"export-remove e: {r.stderr.strip()}")
                return
            cycle_events.append({"id": 0, "op": "flush", "off": 0, "len": 0, "fua": False, "ok": True,
                                 "t0": t0, "t1": time.monotonic_ns()})
            cycles.append(1)

    def guarded(fn):
        # An exception in a thread (a refused connection, qnbd ctl not
        # runnable) must fail the run, not end the thread quietly with
        # fewer requests or edits.
        def run(*args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{fn.__name__}: {e!r}")

        return run

    ts = [threading.Thread(target=guarded(worker), args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    side = checkpoints
    if os.environ.get("QNBD_POWER_BITMAP_EDITS") == "1":
        side = bitmap_edits
    elif os.environ.get("QNBD_POWER_CYCLE_IMAGE"):
        side = export_cycle
    cp = threading.Thread(target=guarded(side), args=ctl) if ctl else None
    if cp:
        cp.start()
    for t in ts:
        t.join()
    done.set()
    if cp:
        cp.join()
    with open(events_path, "w") as f:
        for ev in sorted(events, key=lambda e: e["t0"]):
            f.write(json.dumps(ev) + "\n")
    if cycle_events:
        with open(events_path + ".e", "w") as f:
            for ev in cycle_events:
                f.write(json.dumps(ev) + "\n")
    if errors:
        print("requests failed:", *errors[:5], sep="\n  ")
        return 1
    cps = sum(1 for e in events if e["op"] == "checkpoint")
    extra = f", {len(edits)} bitmap edits" if edits else f", {cps} checkpoints" if ctl else ""
    if cycles:
        extra = f", export e added and removed {len(cycles)} times ({len(cycle_events) - len(cycles)} requests)"
    print(f"{len(events) - cps} requests on {threads} connections{extra}")
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
        if op in (OPEN, WRITE, RENAME):
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
    """The folder as a power loss right after record `upto` may leave it:
    {name: bytes} of the files the log touched, and the names it removed."""
    durable = {}
    for end_i, file, start_i in ends:
        if end_i <= upto:
            durable[file] = max(durable.get(file, -1), start_i)
    folder = next((r[2] for r in recs[: upto + 1] if r[1] == OPEN and r[7] == b"."), None)
    # Names change in order (a journaling file system keeps its metadata
    # operations in order): those a sync of the folder covers, then any
    # prefix of the rest. Opening a file that existed before is no change.
    existed = lambda r: os.path.exists(os.path.join(init, r[7].decode()))  # noqa: E731
    name_ops = [
        i
        for i in range(upto + 1)
        if recs[i][1] in (RENAME, UNLINK) or (recs[i][1] == OPEN and recs[i][7] != b"." and not existed(recs[i]))
    ]
    covered = sum(1 for i in name_ops if i < durable.get(folder, -1))
    applied = set(name_ops[: covered + rnd.randint(0, len(name_ops) - covered)])
    names = {}
    files = {}
    removed = set()
    for i in range(upto + 1):
        t, op, file, off, ln, mode, tid, payload = recs[i]
        if op == OPEN:
            name = payload.decode()
            if name == ".":
                continue
            p = os.path.join(init, name)
            files[file] = bytearray(open(p, "rb").read()) if os.path.exists(p) else bytearray()
            names[file] = name if (os.path.exists(p) or i in applied) else None
            continue
        if op in (RENAME, UNLINK):
            if i in applied:
                if names.get(file):
                    removed.add(names[file])
                new = payload.decode() if op == RENAME else None
                for f in names:
                    if new and names[f] == new:
                        names[f] = None
                names[file] = new
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
    out = {name: files[f] for f, name in names.items() if name}
    return out, removed - set(out)


def sector_history(events, size):
    """Per sector, the successful requests that changed it, in order."""
    hist = [[] for _ in range(size // SECTOR)]
    for ev in events:
        if ev["op"] in ("flush", "checkpoint") or not ev["ok"]:
            continue
        for s in range(ev["off"] // SECTOR, (ev["off"] + ev["len"]) // SECTOR):
            hist[s].append(ev)
    return hist


def judge_data(raw, events, hist, crash_t, init_raw):
    flush_t0 = [e["t0"] for e in events if e["op"] == "flush" and e["ok"] and e["t1"] < crash_t]
    durable_before = max(flush_t0, default=-1)

    writethrough = os.environ.get("WRITETHROUGH") == "1"

    def durable(e):
        return e["t1"] < durable_before or ((e["fua"] or writethrough) and e["t1"] < crash_t)

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


def start_serve(qnbd, image, fmt, bitmaps, work, env=None, extra=()):
    """A writable `qnbd serve` of image (recovering its bitmaps as it
    opens; extra: more arguments, such as -r) on work/recover.sock, once it
    serves: (process, socket, log)."""
    sock = os.path.join(work, "recover.sock")
    pidfile = os.path.join(work, "recover.pid")
    for p in (sock, pidfile):
        if os.path.exists(p):
            os.unlink(p)
    log = open(os.path.join(work, "recover.log"), "w")
    proc = subprocess.Popen(
        [qnbd, "serve", "-k", sock, "--pid-file", pidfile, "-t", "-f", fmt]
        + list(extra)
        + [a for b in bitmaps for a in ("-B", b)]
        + [image],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    for _ in range(400):
        if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0:
            return proc, sock, log
        if proc.poll() is not None:
            log.close()
            raise RuntimeError("qnbd serve exited: " + open(log.name).read().strip())
        time.sleep(0.025)
    proc.kill()
    proc.wait()
    log.close()
    raise RuntimeError("qnbd serve did not start")


def serve_and_read_bitmaps(qnbd, image, fmt, bitmaps, work, extra=()):
    """Recover (a writable `qnbd serve`; with extra=["-r"], a read-only one,
    which recovers in memory only) and read each bitmap's dirty extents."""
    proc, sock, log = start_serve(qnbd, image, fmt, bitmaps, work, extra=extra)
    try:
        return {b: bitmap_dirty(f"nbd+unix:///?socket={sock}", b) for b in bitmaps}
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


def crash_during_recovery(d, image, fmt, qnbd, work, shim, rnd):
    """Run `qnbd serve` (which recovers the bitmaps as it opens) on the
    crashed folder d under the write-log shim, SIGKILL it once it serves,
    and rebuild the folder at a random record of that log, as rebuild()
    does. Returns the new folder, the record and the log's length."""
    log2 = os.path.join(work, "recovery.wlog")
    if os.path.exists(log2):
        os.unlink(log2)
    # The serve below changes d in place: the disk's state before it, from
    # which its log is replayed, is a copy taken first.
    before = os.path.join(work, "before-recovery")
    materialise(d, before, {}, set())
    env = dict(os.environ, LD_PRELOAD=shim, QNBD_WLOG=log2, QNBD_WLOG_DIR=d)
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"
    proc, _, log = start_serve(qnbd, os.path.join(d, image), fmt, [], work, env)
    proc.kill()
    proc.wait()
    log.close()
    recs = read_log(log2)
    d2 = os.path.join(work, "crash2")
    if not recs:
        materialise(before, d2, {}, set())
        return d2, 0, 0
    k = rnd.randrange(len(recs))
    materialise(before, d2, *rebuild(recs, k, covered_until(recs), before, rnd))
    return d2, k, len(recs)


def materialise(src, dst, files, removed):
    """dst: a copy of the folder src with rebuild()'s files and removals."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for name, content in files.items():
        with open(os.path.join(dst, name), "wb") as f:
            f.write(content)
    for name in removed:
        if os.path.exists(os.path.join(dst, name)):
            os.unlink(os.path.join(dst, name))


def bitmap_flags(d, image):
    out = run(["qemu-img", "info", "-U", "--output=json", image], cwd=d)
    out.check_returncode()
    data = json.loads(out.stdout).get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


# How many crash points' read-only exports judge_bitmaps compared, and how
# many of those had the bitmaps hidden from QEMU (AUTOCLEAR_BITMAPS clear).
READ_ONLY_MATCHED = [0]
READ_ONLY_HIDDEN = [0]


def folder_digest(d):
    """{name: sha256} of the files in folder d."""
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p) and not os.path.islink(p):
            with open(p, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def covered(extents, a, b):
    """Whether the sorted, merged extents cover [a, b)."""
    i = bisect.bisect_right(extents, (a, float("inf"))) - 1
    return i >= 0 and extents[i][0] <= a and extents[i][1] >= b


def merged(*lists):
    out = []
    for off, ln in sorted(x for lst in lists for x in lst):
        if out and off <= out[-1][1]:
            out[-1][1] = max(out[-1][1], off + ln)
        else:
            out.append([off, off + ln])
    return [tuple(x) for x in out]


def judge_bitmaps(d, image, fmt, qnbd, work, events, crash_t, got, init_raw, size):
    """The crash-safe bitmaps after recovery. Without checkpoints: every
    granule whose data changed is dirty in b0. With them (c1 disables b0, c2
    disables c1, ...): each checkpoint that returned exists and its PREV is
    disabled, consistent, and dirty wherever a request answered before the
    checkpoint was called (and started after the one before it returned)
    wrote; and the bitmaps newer than the last checkpoint that returned are
    dirty, between them, wherever a request started after it returned was
    answered, or left its data in the image."""
    names = bitmap_flags(d, image)
    hidden = False
    if not names:
        # A crash inside the open's in-use marking (between clearing the
        # bitmaps autoclear bit and setting it again, as QEMU marks them)
        # hides every bitmap from QEMU; the write-intent record lets qnbd
        # restore them. Their names come from a recovery of a copy, so that
        # the read-only serve below still sees the crashed folder.
        names_copy = os.path.join(work, "names-copy")
        materialise(d, names_copy, {}, set())
        serve_and_read_bitmaps(qnbd, os.path.join(names_copy, image), fmt, [], work)
        names = bitmap_flags(names_copy, image)
        shutil.rmtree(names_copy)
        hidden = bool(names)
    # A read-only serve first: it exports what the writable open below will
    # store (the record's recovery, in memory) and writes nothing. It
    # refuses the whole set when some bitmap is inconsistent and not
    # recoverable; that is judged by the writable open.
    ro = None
    if names:
        before = folder_digest(d)
        try:
            ro = serve_and_read_bitmaps(qnbd, os.path.join(d, image), fmt, sorted(names), work, ["-r"])
        except RuntimeError as e:
            if "inconsistent" not in str(e):
                raise
        if folder_digest(d) != before:
            return "a read-only qnbd serve changed the crashed folder"
    dirty = serve_and_read_bitmaps(qnbd, os.path.join(d, image), fmt, sorted(names), work)
    for name, extents in (ro or {}).items():
        if merged(extents) != merged(dirty[name]):
            return f"bitmap {name}: the read-only export differs from what the recovery stored"
    if ro is not None:
        READ_ONLY_MATCHED[0] += 1
        READ_ONLY_HIDDEN[0] += hidden
    elif hidden:
        # The record vouches for every bitmap here (no guest write was
        # issued before arming finished): a read-only serve exports them.
        return "the read-only serve refused the bitmaps a crash inside arming hid from QEMU"
    after = bitmap_flags(d, image)
    for name, flags in after.items():
        if "in-use" in flags:
            return f"bitmap {name} is still in use after the recovery"
    cps = sorted((e for e in events if e["op"] == "checkpoint" and e["ok"]), key=lambda e: e["t0"])
    returned = [c for c in cps if c["t1"] < crash_t]
    data_reqs = [e for e in events if e["op"] not in ("flush", "checkpoint") and e["ok"]]
    start = -1
    for c in returned:
        for n in (c["name"], c["prev"]):
            if n not in after:
                return f"checkpoint {c['name']} returned but bitmap {n} is gone: {sorted(after)}"
        if "auto" in after[c["prev"]]:
            return f"checkpoint {c['name']} returned but {c['prev']} is still enabled"
        prev = merged(dirty[c["prev"]])
        for r in data_reqs:
            if start < r["t0"] and r["t1"] < c["t0"] and not covered(prev, r["off"], r["off"] + r["len"]):
                return f"{r['op']} {r['id']} at {r['off']}+{r['len']}, answered before {c['name']}, not dirty in {c['prev']}"
        start = c["t1"]
    newest = returned[-1]["name"] if returned else "b0"
    if newest not in dirty:
        return f"bitmap {newest} is gone after the recovery: {sorted(after)}"
    newer = [c["name"] for c in cps if c["t1"] >= crash_t and c["name"] in after]
    live = merged(*(dirty[n] for n in [newest] + newer))
    for r in data_reqs:
        if r["t0"] > start and r["t1"] < crash_t and not covered(live, r["off"], r["off"] + r["len"]):
            return f"{r['op']} {r['id']} at {r['off']}+{r['len']}, answered after the last checkpoint, not dirty in {newest}"
    # Data that reached the image, answered or not.
    later = {r["id"] for r in data_reqs if r["t0"] > start}
    for s in range(size // SECTOR):
        magic, rid, _ = TAG.unpack_from(got, s * SECTOR)
        if magic == b"QNBDPWR!" and rid in later and not covered(live, s * SECTOR, (s + 1) * SECTOR):
            return f"sector {s} holds request {rid}'s data but is not dirty in {newest}"
        if not returned and got[s * SECTOR : (s + 1) * SECTOR] != init_raw[s * SECTOR : (s + 1) * SECTOR]:
            if not covered(live, s * SECTOR, (s + 1) * SECTOR):
                return f"sector {s} changed but is not dirty in b0"
    return len(returned)


def check_and_read(d, image, fmt, raw):
    """The image in folder d: qemu-img check (qcow2: exit 0, or 3 for leaks
    only) and its guest view (qemu-img convert to raw). (check exit
    status, bytes), or what failed."""
    status = 0
    if fmt == "qcow2":
        c = run(["qemu-img", "check", "-q", "-f", "qcow2", image], cwd=d)
        if c.returncode not in (0, 3):
            return f"qemu-img check exit {c.returncode}: {(c.stdout + c.stderr).strip()[:2000]}"
        status = c.returncode
    c = run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, raw], cwd=d)
    if c.returncode:
        return f"qemu-img convert: {c.stderr.strip()}"
    return status, open(raw, "rb").read()


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
    total_checked = leaks = recovered = checkpoints_seen = double = 0
    # QNBD_DOUBLE_CRASH_SHIM=PATH (write_log_shim.c built): crash the
    # recovery too (crash_during_recovery).
    shim = os.environ.get("QNBD_DOUBLE_CRASH_SHIM")
    for k in picks:
        crash_t = recs[k][0]
        d = os.path.join(work, "crash")
        materialise(init, d, *rebuild(recs, k, ends, init, rnd))
        where = f"crash after record {k} of {n}"
        raw = os.path.join(work, "crash.raw")
        res = check_and_read(d, image, fmt, raw)
        if isinstance(res, str):
            print(f"{where}: {res}")
            return 1
        check_status, got = res
        leaks += check_status == 3
        res = judge_data(got, events, hist, crash_t, init_raw)
        if isinstance(res, str):
            print(f"{where}: {res}")
            return 1
        total_checked += res
        if bitmap != "-" and shim:
            # A second power loss, this time while the next `qnbd serve`
            # recovers: the bitmaps judged below are those a third open
            # recovers from what that left, and the data must not change.
            try:
                d, k2, n2 = crash_during_recovery(d, image, fmt, qnbd, work, shim, rnd)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"{where}: the recovery under the log: {e}")
                return 1
            where += f", then after record {k2} of {n2} of the recovery"
            res = check_and_read(d, image, fmt, raw)
            if isinstance(res, str) or res[1] != got:
                print(f"{where}: {res if isinstance(res, str) else 'the guest data changed'}")
                return 1
            double += 1
        if bitmap != "-":
            try:
                res = judge_bitmaps(d, image, fmt, qnbd, work, events, crash_t, got, init_raw, size)
            except (RuntimeError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
                res = str(e)
            if isinstance(res, str):
                print(f"{where}: {res}")
                return 1
            checkpoints_seen += res
            c = run(["qemu-img", "check", "-q", "-f", "qcow2", image], cwd=d)
            if c.returncode not in (0, 3):
                print(f"{where}: after the recovery: qemu-img check exit {c.returncode}: {c.stdout.strip()[:2000]}")
                return 1
            recovered += 1
    print(
        f"{len(picks)} crash points over {n} records ({writes} writes, {syncs} syncs); "
        f"{total_checked} sector checks; {leaks} with leaks only; {recovered} bitmap recoveries"
        + (f" ({checkpoints_seen} checkpoints judged)" if checkpoints_seen else "")
        + (f"; {double} of them crashed again during the recovery" if double else "")
        + (f"; {READ_ONLY_MATCHED[0]} read-only exports matched it ({READ_ONLY_HIDDEN[0]} with the bitmaps hidden "
           "from QEMU)" if recovered else "")
    )
    return 0


def main(argv):
    if len(argv) in (8, 10) and argv[1] == "client":
        ctl = (argv[8], argv[9]) if len(argv) == 10 else None
        return client(argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]), int(argv[7]), ctl)
    if len(argv) == 13 and argv[1] == "check":
        a = argv[2:]
        return check(a[0], a[1], a[2], a[3], a[4], a[5], int(a[6]), int(a[7]), int(a[8]), a[9], a[10])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
