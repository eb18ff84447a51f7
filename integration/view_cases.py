#!/usr/bin/env python3
"""Overlapping views, a scratch cap, view-end with a reader (test-view-cases.sh).

usage: view_cases.py QNBD CTL_SOCK NBD_SOCK

Export "a" (8 MiB, served with --view-scratch-max 1 MiB, 64 KiB granules)
starts with pattern 0x11 over its first 4 MiB.
"""
import errno
import json
import subprocess
import sys

import nbd

qnbd, ctl, sock = sys.argv[1:]
M = 1 << 20
K = 1 << 10


def uri(name):
    return f"nbd+unix:///{name}?socket={sock}"


def ctl_json(*args, ok=True):
    out = subprocess.run([qnbd, "ctl", "-s", ctl, "--output=json", *args], capture_output=True, text=True)
    if ok and out.returncode != 0:
        sys.exit(f"qnbd ctl {' '.join(args)} failed: {out.stdout} {out.stderr}")
    return json.loads(out.stdout) if out.stdout else None


def connect(name):
    h = nbd.NBD()
    h.connect_uri(uri(name))
    return h


def views():
    st = ctl_json("status")["result"]
    return {v["name"]: v for e in st["exports"] for v in e["views"]}


def expect(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")


orig = bytes([0x11]) * (4 * M) + bytes(4 * M)
w = connect("a")
ctl_json("checkpoint", "--name", "v1", "--view", "a")
w.pwrite(bytes([0x22]) * (512 * K), 0)
ctl_json("checkpoint", "--name", "v2", "--view", "a")  # overlaps v1
w.pwrite(bytes([0x33]) * (512 * K), 256 * K)
at_v2 = bytes([0x22]) * (512 * K) + orig[512 * K:]
r1, r2 = connect("a@v1"), connect("a@v2")
expect(r1.pread(8 * M, 0) == orig, "a@v1 is the disk at v1")
expect(r2.pread(8 * M, 0) == at_v2, "a@v2 is the disk at v2")
expect(r1.is_read_only() and r2.is_read_only(), "views are read-only")
v = views()
expect(v["a@v1"]["scratch_bytes"] == 768 * K, f"a@v1 saved 768 KiB: {v['a@v1']}")
expect(v["a@v2"]["scratch_bytes"] == 512 * K, f"a@v2 saved 512 KiB: {v['a@v2']}")

# The cap: 384 KiB more of first touches takes v1 past 1 MiB (768 + 384),
# not v2 (512 + 384). The write itself succeeds.
w.pwrite(bytes([0x44]) * (384 * K), 2 * M)
expect(w.pread(384 * K, 2 * M) == bytes([0x44]) * (384 * K), "the writer's data is in the image")
v = views()
expect(v["a@v1"]["state"] == "failed" and "scratch cap" in v["a@v1"].get("error", ""),
       f"a@v1 failed at its cap and status says why: {v['a@v1']}")
expect(v["a@v2"]["state"] == "live", f"a@v2 is still live: {v['a@v2']}")
try:
    r1.pread(4096, 0)
    expect(False, "a read of the failed view fails")
except nbd.Error as e:
    expect(e.errno == errno.EIO or "(EIO)" in str(e), f"a read of the failed view gets EIO, got {e}")
expect(r2.pread(8 * M, 0) == at_v2, "a@v2 is still the disk at v2")

# view-end with a reader connected: its reads fail from then on, the view
# is gone from the list, the server goes on serving.
ctl_json("view-end", "a@v2")
try:
    r2.pread(4096, 0)
    expect(False, "a read after view-end fails")
except nbd.Error:
    pass
expect("a@v2" not in views(), "a@v2 is gone")
try:
    connect("a@v2")
    expect(False, "a@v2 can no longer be opened")
except nbd.Error:
    pass
ctl_json("view-end", "--checkpoint", "v1")
expect(views() == {}, "no view left")
out = subprocess.run([qnbd, "ctl", "-s", ctl, "view-end", "a@v1"], capture_output=True, text=True)
expect(out.returncode != 0 and "not-found" in out.stderr, f"ending it again: not-found, got {out.stderr}")
w.pwrite(bytes([0x55]) * 4096, 0)
expect(connect("a").pread(4096, 0) == bytes([0x55]) * 4096, "the export still serves")

# At most 16 views of one export at once (each write copies for every live
# one): the 17th checkpoint with --view is refused as busy, before it
# creates its bitmap; once one view ends, the next one starts.
for i in range(16):
    ctl_json("checkpoint", "--name", f"m{i}", "--view", "a")
expect(len(views()) == 16, f"16 views: {sorted(views())}")
bitmaps_before = [b["name"] for e in ctl_json("status")["result"]["exports"] for b in e["bitmaps"]]
out = subprocess.run([qnbd, "ctl", "-s", ctl, "checkpoint", "--name", "m16", "--view", "a"],
                     capture_output=True, text=True)
expect(out.returncode != 0 and "busy" in out.stderr, f"a 17th view: busy, got {out.returncode} {out.stderr}")
bitmaps_after = [b["name"] for e in ctl_json("status")["result"]["exports"] for b in e["bitmaps"]]
expect(bitmaps_after == bitmaps_before, f"the refused checkpoint made no bitmap: {bitmaps_after}")
ctl_json("view-end", "a@m0")
ctl_json("checkpoint", "--name", "m16", "--view", "a")
expect("a@m16" in views() and len(views()) == 16, f"after a view-end, the next view starts: {sorted(views())}")
w.pwrite(bytes([0x66]) * (64 * K), 6 * M)
expect(connect("a@m16").pread(64 * K, 6 * M) == bytes(64 * K), "the newest view is the disk at m16")
for i in range(1, 17):
    ctl_json("view-end", f"a@m{i}")
expect(views() == {}, "no view left")
w.shutdown()
print("view cases: ok")
