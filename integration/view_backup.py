#!/usr/bin/env python3
"""A live backup cycle through point-in-time views (test-view-backup.sh).

usage: view_backup.py QNBD CTL_SOCK NBD_SOCK WORKDIR ROUNDS EXPORT...

Two libnbd connections per export keep writing (seeded 4 KiB data, some
write-zeroes), each connection on granules of its own, one request at a
time, every request logged with its send and reply times. Meanwhile:
checkpoint c0 --view over all exports, a full backup of each EXPORT@c0
with nbdcopy, view-end; then ROUNDS times: checkpoint cI --disable cI-1
--view, the dirty extents of qemu:dirty-bitmap:cI-1 read from EXPORT@cI
into the backup copy, view-end. After the writers stop, each round's
backup must equal the disk at that checkpoint as the log says: every
request acknowledged before the call is in it, none sent after the call
returned is, and a request in flight during the call is wholly in or out,
consistently across the exports (one that ended before another began
cannot be "after" while the other is "before").
"""
import json
import os
import random
import subprocess
import sys
import threading
import time

import nbd

qnbd, ctl, sock, work, rounds, *exports = sys.argv[1:]
rounds = int(rounds)
G = 4096
stop = threading.Event()
log = []  # (export, conn, granule, seed or None for zeroes, sent, acked), per connection in order
log_lock = threading.Lock()


def uri(name):
    return f"nbd+unix:///{name}?socket={sock}"


def data_of(seed):
    return random.Random(seed).randbytes(G)


def writer(export, conn, granules, seed):
    h = nbd.NBD()
    h.connect_uri(uri(export))
    rnd = random.Random(seed)
    mine = []
    n = 0
    while not stop.is_set():
        g = rnd.choice(granules)
        s = None if rnd.random() < 0.1 else seed * 1000003 + n
        n += 1
        sent = time.monotonic()
        if s is None:
            h.zero(G, g * G)
        else:
            h.pwrite(data_of(s), g * G)
        mine.append((export, conn, g, s, sent, time.monotonic()))
    h.shutdown()
    with log_lock:
        log.extend(mine)


def ctl_run(*args):
    start = time.monotonic()
    out = subprocess.run([qnbd, "ctl", "-s", ctl, "--output=json", *args], capture_output=True, text=True)
    end = time.monotonic()
    if out.returncode != 0:
        stop.set()
        sys.exit(f"qnbd ctl {' '.join(args)} failed: {out.stdout} {out.stderr}")
    return start, end


size = {}
for e in exports:
    h = nbd.NBD()
    h.connect_uri(uri(e))
    size[e] = h.get_size()
    h.shutdown()

threads = []
for i, e in enumerate(exports):
    granules = list(range(size[e] // G))
    for conn in range(2):
        # Daemon threads: a failure exits without waiting for them.
        t = threading.Thread(target=writer, args=(e, conn, granules[conn::2], 10 * i + conn + 1), daemon=True)
        threads.append(t)
        t.start()
time.sleep(0.1)

checkpoints = []  # (name, start, end)
backups = {}      # export -> bytearray, the backup copy
snapshots = []    # per round: {export: bytes}

# Full backup through the first views.
start, end = ctl_run("checkpoint", "--name", "c0", "-g", str(G), "--view", *exports)
checkpoints.append(("c0", start, end))
for e in exports:
    path = os.path.join(work, f"{e}.backup")
    subprocess.run(["nbdcopy", "--", uri(f"{e}@c0"), path], check=True)
    with open(path, "rb") as f:
        backups[e] = bytearray(f.read())
ctl_run("view-end", "--checkpoint", "c0")
snapshots.append({e: bytes(backups[e]) for e in exports})

pulled = 0
for r in range(1, rounds + 1):
    time.sleep(0.05)
    name, prev = f"c{r}", f"c{r - 1}"
    start, end = ctl_run("checkpoint", "--name", name, "--disable", prev, "-g", str(G), "--view", *exports)
    checkpoints.append((name, start, end))
    for e in exports:
        h = nbd.NBD()
        h.add_meta_context(f"qemu:dirty-bitmap:{prev}")
        h.connect_uri(uri(f"{e}@{name}"))
        dirty = []
        ctx = f"qemu:dirty-bitmap:{prev}"
        reached = [0]

        def cb(meta, offset, entries, err):
            if meta == ctx:
                p = offset
                for k in range(0, len(entries), 2):
                    if entries[k + 1] & 1:
                        dirty.append((p, min(entries[k], size[e] - p)))
                    p += entries[k]
                reached[0] = p
            return 0

        pos = 0
        while pos < size[e]:
            h.block_status(min(size[e] - pos, 1 << 30), pos, cb)
            if reached[0] <= pos:
                sys.exit(f"block status of {e}@{name} made no progress at {pos}")
            pos = reached[0]
        for off, length in dirty:
            backups[e][off:off + length] = h.pread(length, off)
            pulled += length
        h.shutdown()
    ctl_run("view-end", "--checkpoint", name)
    snapshots.append({e: bytes(backups[e]) for e in exports})

stop.set()
for t in threads:
    t.join()

# --- the check ---------------------------------------------------------
by_conn = {}
for req in log:
    by_conn.setdefault((req[0], req[1]), []).append(req)
for reqs in by_conn.values():
    reqs.sort(key=lambda q: q[4])

def content(q):
    return bytes(G) if q[3] is None else data_of(q[3])


# The checkpoint is one instant T within [start, end]. On one connection
# (one request at a time, granules of its own) T cuts the request sequence
# into a prefix before and a suffix after (a request in flight at T is
# wholly on one side). For each connection find the cuts the backup agrees
# with; then T must exist: the last request sent before it on any
# connection was sent before the first acknowledged after it on any other.
import itertools

bad = []
for k, (name, start, end) in enumerate(checkpoints):
    options = []  # per connection: [(last_sent_before, first_acked_after)]
    for (e, conn), reqs in sorted(by_conn.items()):
        lo = 0
        while lo < len(reqs) and reqs[lo][5] < start:
            lo += 1
        hi = lo
        while hi < len(reqs) and reqs[hi][4] <= end:
            hi += 1
        state = {}
        for q in reqs[:lo]:
            state[q[2]] = content(q)
        window = {q[2] for q in reqs[lo:hi]}
        snap = snapshots[k][e]
        wrong = [g for g in range(conn, size[e] // G, 2) if g not in window and
                 snap[g * G:(g + 1) * G] != state.get(g, bytes(G))]
        if wrong:
            bad.append(f"{name}: backup of {e} differs in granules {wrong[:8]} (written by no request near the checkpoint)")
            continue
        cuts = []
        for i in range(lo, hi + 1):
            if i > lo:
                q = reqs[i - 1]
                state[q[2]] = content(q)
            if all(snap[g * G:(g + 1) * G] == state.get(g, bytes(G)) for g in window):
                cuts.append((reqs[i - 1][4] if i > 0 else float("-inf"), reqs[i][5] if i < len(reqs) else float("inf")))
        if not cuts:
            bad.append(f"{name}: backup of {e} (connection {conn}) matches no instant of the checkpoint call: "
                       f"a request is partly in it, or one acknowledged before is missing")
        options.append(cuts)
    if len(options) == 2 * len(exports) and not any(
            max(c[0] for c in combo) < min(c[1] for c in combo) for combo in itertools.product(*options)):
        bad.append(f"{name}: no single instant explains the backups of all exports together")

print(f"{len(log)} writes, {len(checkpoints)} checkpoints, {pulled} bytes pulled incrementally, "
      f"{len(bad)} problems")
if bad:
    sys.exit("\n".join(bad[:20]))
