#!/usr/bin/env python3
"""Seeded writers and checkpoints for test-control-checkpoint.sh.

usage: checkpoint_writer.py QNBD CTL_SOCK NBD_SOCK LOG.json EXPORT...

Two libnbd connections per export write 4 KiB of seeded data, each request
at its own 4 KiB granule (a shuffled order, never a granule twice), while
the main thread takes 20 checkpoints c1..c20 with `qnbd ctl checkpoint
--name cI --disable cI-1` over all the exports (c0 exists already). Every
request's send and reply times and every checkpoint's call and return
times (one monotonic clock) go to LOG.json for the checker.
"""
import json
import random
import subprocess
import sys
import threading
import time

import nbd

qnbd, ctl, sock, log_path, *exports = sys.argv[1:]
GRANULE = 4096
stop = threading.Event()
requests = []
lock = threading.Lock()


def writer(export, conn, slots, seed):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    rnd = random.Random(seed)
    mine = []
    for g in slots:
        if stop.is_set():
            break
        data = rnd.randbytes(GRANULE)
        sent = time.monotonic()
        h.pwrite(data, g * GRANULE)
        mine.append({"export": export, "conn": conn, "offset": g * GRANULE, "sent": sent, "acked": time.monotonic()})
    h.shutdown()
    with lock:
        requests.extend(mine)


threads = []
for e_i, export in enumerate(exports):
    size = nbd.NBD()
    size.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    granules = size.get_size() // GRANULE
    size.shutdown()
    order = list(range(granules))
    random.Random(1000 + e_i).shuffle(order)
    for conn in range(2):
        t = threading.Thread(target=writer, args=(export, conn, order[conn::2], 10 * e_i + conn))
        threads.append(t)
        t.start()

checkpoints = []
time.sleep(0.05)
for i in range(1, 21):
    start = time.monotonic()
    out = subprocess.run([qnbd, "ctl", "-s", ctl, "--output=json", "checkpoint", "--name", f"c{i}", "--disable",
                          f"c{i - 1}", "-g", str(GRANULE), *exports], capture_output=True, text=True)
    end = time.monotonic()
    if out.returncode != 0:
        stop.set()
        sys.exit(f"checkpoint c{i} failed: {out.stdout} {out.stderr}")
    checkpoints.append({"name": f"c{i}", "start": start, "end": end,
                        "pause_us": json.loads(out.stdout)["result"]["pause_us"]})
    time.sleep(0.03)
stop.set()
for t in threads:
    t.join()
with open(log_path, "w") as f:
    json.dump({"requests": requests, "checkpoints": checkpoints}, f)
print(f"{len(requests)} writes, {len(checkpoints)} checkpoints, longest pause "
      f"{max(c['pause_us'] for c in checkpoints):.0f} us")
