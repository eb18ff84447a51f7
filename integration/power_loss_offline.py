#!/usr/bin/env python3
"""Power loss inside qnbd's offline commands, for test-power-loss-offline.sh.

  power_loss_offline.py QNBD SHIM WORK SEED VARIANTS

`qnbd bitmap` (each edit) and `qnbd check -r` change an image in place with
no server around it. Each case runs one such command under the write-log
shim (write_log_shim.c), then, at every record of its log and VARIANTS
times each (the unsynced changes kept, lost or torn differently: seeded),
rebuilds the folder as a disk could hold it after a power loss there
(power_loss.rebuild: the same model of the disk as test-serve-power-loss.sh)
and asks of the image:
  - qemu-img check: exit 0, or 3 (leaked clusters only);
  - the guest data is what it was (none of these commands changes it);
  - its persistent bitmaps, as qemu-img info lists them (name, flags,
    granularity) and as qemu-nbd -B reports them (each one's dirty
    extents), are those from before the command or those from after it:
    no bitmap lost, left inconsistent (in_use) or half edited. An edit is
    atomic at a power loss, as a database's commit is; check -r changes no
    bitmap at all.
On an image a `qnbd serve` crashed with (enabled bitmaps in use, its
write-intent record pending), `qnbd bitmap` recovers the bitmaps before it
edits: there every crash state is first opened by a writable `qnbd serve`
(which recovers whatever is still pending) and its bitmaps must then be
those of the image recovered alone or recovered and edited: a power loss
inside the recovery or the edit may not lose what the record tracks.
Prints one line per case; exit 1 with the first failure.
"""
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import power_loss as pl  # noqa: E402  (the disk model and log reader)

SIZE = 16 << 20


def sh(cmd, cwd):
    out = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{cmd}: {out.stderr.strip()}")
    return out.stdout


def leak_one_cluster(path, guest_offset):
    """Make the data cluster mapped at guest_offset a leak: clear its L2
    entry and leave its refcount at 1 (what a power loss between the
    refcount update and the L2 update leaves)."""
    m = json.loads(sh(f"qemu-img map --output=json -f qcow2 {path}", os.path.dirname(path)))
    host = next(e["offset"] for e in m if e["start"] <= guest_offset < e["start"] + e["length"] and e.get("data"))
    host += guest_offset - next(e["start"] for e in m if e["start"] <= guest_offset < e["start"] + e["length"])
    want = struct.pack(">Q", host | (1 << 63))
    with open(path, "r+b") as f:
        data = f.read()
        hits = [i for i in range(0, len(data), 8) if data[i : i + 8] == want]
        if len(hits) != 1:
            raise RuntimeError(f"L2 entry of host offset {host:#x}: {len(hits)} candidates")
        f.seek(hits[0])
        f.write(bytes(8))


def make_base(d, cluster_opts):
    """An image with data and three bitmaps: b0 enabled and dirty, b1
    disabled and dirty, b2 enabled and clean."""
    sh(f"qemu-img create -q -f qcow2 {cluster_opts} d {SIZE}", d)
    sh("qemu-io -c 'write -P 0x11 0 6M' d >/dev/null", d)
    sh("qemu-img bitmap --add -g 64k d b0 && qemu-img bitmap --add -g 128k d b1", d)
    sh("qemu-io -c 'write -P 0x22 1M 512k' -c 'write -P 0x33 9M 64k' d >/dev/null", d)
    sh("qemu-img bitmap --disable d b1 && qemu-io -c 'write -P 0x44 12M 4k' d >/dev/null", d)
    sh("qemu-img bitmap --add d b2", d)


def bitmap_state_listing(d):
    """{name: (flags, granularity)} of d/d's bitmaps, as qemu-img info lists them."""
    out = pl.run(["qemu-img", "info", "-U", "--output=json", "d"], cwd=d)
    if out.returncode:
        raise RuntimeError(f"qemu-img info: {out.stderr.strip()}")
    data = json.loads(out.stdout).get("format-specific", {}).get("data", {})
    return {b["name"]: (tuple(sorted(b["flags"])), b["granularity"]) for b in data.get("bitmaps", [])}


def bitmap_state(d):
    """({name: (flags, granularity)}, {name: dirty extents}) of d/d, read
    with qemu-img info and qemu-nbd -B (only consistent bitmaps can be
    exported; an inconsistent one shows in its flags)."""
    listing = bitmap_state_listing(d)
    exportable = [n for n, (flags, _) in listing.items() if "in-use" not in flags]
    sock = os.path.join(d, "..", "qemu-nbd.sock")
    sock = os.path.abspath(sock)
    if os.path.exists(sock):
        os.unlink(sock)
    args = ["qemu-nbd", "-r", "-f", "qcow2", "-k", sock, "-t"]
    for n in exportable:
        args += ["-B", n]
    proc = subprocess.Popen(args + [os.path.join(d, "d")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(400):
            if os.path.exists(sock) or proc.poll() is not None:
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            raise RuntimeError("qemu-nbd: " + proc.stderr.read().decode().strip())
        uri = f"nbd+unix:///?socket={sock}"
        dirty = {n: pl.bitmap_dirty(uri, n) for n in exportable}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    return listing, dirty


def crash_a_writer(qnbd, d, work):
    """Leave d/d as a `qnbd serve` killed while writing leaves it: guest
    writes over NBD, then SIGKILL; b0 and b2 (enabled) in use, the
    write-intent record d.qnbd-intent pending."""
    proc, sock, log = pl.start_serve(qnbd, os.path.join(d, "d"), "qcow2", [], work)
    try:
        writes = " ".join(f"-c 'write -P 0x55 {off} {n}'" for off, n in WRITER_RANGES)
        sh(f"qemu-io -f raw {writes} 'nbd+unix:///?socket={sock}' >/dev/null", d)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    listing = bitmap_state_listing(d)
    if not os.path.exists(os.path.join(d, "d.qnbd-intent")) or "in-use" not in listing["b0"][0]:
        raise RuntimeError(f"the killed writer left no pending record: {listing}")


# What crash_a_writer writes: ranges every bitmap enabled then must mark.
WRITER_RANGES = ((5 << 20, 192 << 10), (14 << 20, 4 << 10))


def recover(qnbd, d, work):
    """Open d/d with a writable `qnbd serve` and stop it: what the next
    server does to an image with a pending record (recovers its bitmaps)."""
    proc, _, log = pl.start_serve(qnbd, os.path.join(d, "d"), "qcow2", [], work)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    log.close()
    if proc.returncode:
        raise RuntimeError(f"qnbd serve exited {proc.returncode}: " + open(log.name).read().strip())


def guest_bytes(d, raw):
    """(qemu-img check's exit status, the guest data) of d/d, or what failed."""
    return pl.check_and_read(d, "d", "qcow2", raw)


def one_case(name, qnbd, shim, work, base, command, rnd, variants):
    """Run command (argv, in the image's folder) under the shim on a copy
    of base, then judge every record of its log."""
    top = os.path.join(work, name)
    shutil.rmtree(top, ignore_errors=True)
    init = os.path.join(top, "init")
    disk = os.path.join(top, "disk")
    after = os.path.join(top, "after")
    shutil.copytree(base, init)
    shutil.copytree(base, disk)
    shutil.copytree(base, after)
    raw = os.path.join(top, "raw")
    # A pending write-intent record: judge each state as the next server
    # leaves it (recovered), from a copy, so the rebuilt folder stays as it was.
    pending = os.path.exists(os.path.join(base, "d.qnbd-intent"))
    judged = os.path.join(top, "judged")

    def state(d):
        if not pending:
            return bitmap_state(d)
        shutil.rmtree(judged, ignore_errors=True)
        shutil.copytree(d, judged)
        recover(qnbd, judged, top)
        return bitmap_state(judged)

    def sound(st, what):
        """No bitmap left inconsistent; after a crashed writer, each one it
        had enabled (b0, b2) marks its writes."""
        listing, dirty = st
        if any("in-use" in flags for flags, _ in listing.values()):
            raise RuntimeError(f"{what}: a bitmap is left inconsistent (in use): {listing}")
        if pending:
            for b in ("b0", "b2"):
                if b in dirty and not all(pl.covered(pl.merged(dirty[b]), off, off + n) for off, n in WRITER_RANGES):
                    raise RuntimeError(f"{what}: {b} lost the crashed writer's writes: {dirty[b]}")

    before_state = state(init)
    sound(before_state, f"{name}: the image before")
    r = guest_bytes(init, raw)
    if isinstance(r, str):
        raise RuntimeError(f"{name}: the image before: {r}")
    init_raw = r[1]

    done = pl.run([qnbd] + command, cwd=after)
    if done.returncode:
        raise RuntimeError(f"{name}: {' '.join(command)}: {done.stderr.strip()}")
    after_state = state(after)
    sound(after_state, f"{name}: the image after {' '.join(command)}")
    if command[0] == "check":
        # The repair must have had something to do, and done it.
        repaired = guest_bytes(after, raw)
        status = repaired if isinstance(repaired, str) else repaired[0]
        if r[0] != 3 or status != 0:
            raise RuntimeError(f"{name}: qemu-img check before the repair {r[0]}, after it {status}: expected 3, then 0")
    elif after_state == before_state:
        raise RuntimeError(f"{name}: the command changed no bitmap; the case proves nothing")

    log = os.path.join(top, "wlog")
    env = dict(os.environ, LD_PRELOAD=shim, QNBD_WLOG=log, QNBD_WLOG_DIR=disk)
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"
    done = subprocess.run([qnbd] + command, cwd=disk, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name}: under the shim: {done.stderr.strip()}")
    if state(disk) != after_state:
        raise RuntimeError(f"{name}: the run under the shim ended elsewhere than the plain run")
    recs = pl.read_log(log)
    ends = pl.covered_until(recs)
    crash = os.path.join(top, "crash")
    states = {"before": 0, "after": 0}
    leaks = 0
    for k in range(-1, len(recs)):
        for v in range(variants if k >= 0 else 1):
            if k < 0:
                pl.materialise(init, crash, {}, set())
            else:
                pl.materialise(init, crash, *pl.rebuild(recs, k, ends, init, rnd))
            where = f"{name}: power lost after record {k + 1} of {len(recs)} (variant {v})"
            r = guest_bytes(crash, raw)
            if isinstance(r, str):
                raise RuntimeError(f"{where}: {r}")
            status, data = r
            leaks += status == 3
            if data != init_raw:
                n = min(len(data), len(init_raw))
                first = next((i for i in range(n) if data[i] != init_raw[i]), n)
                raise RuntimeError(f"{where}: the guest data changed (first at byte {first})")
            try:
                got = state(crash)
            except RuntimeError as e:
                raise RuntimeError(f"{where}: {e}")
            if got == before_state:
                states["before"] += 1
            elif got == after_state:
                states["after"] += 1
            else:
                raise RuntimeError(
                    f"{where}: bitmaps are neither the state before nor after:\n"
                    f"  got    {got}\n  before {before_state}\n  after  {after_state}"
                )
    print(
        f"{name}: {len(recs)} log records, {states['before']} crash states as before, "
        f"{states['after']} as after, {leaks} with leaks only"
    )


def main(argv):
    qnbd, shim, work, seed, variants = argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])
    rnd = random.Random(seed)
    os.makedirs(work, exist_ok=True)
    cases = []
    for geometry, opts in (("64k", ""), ("4k", "-o cluster_size=4k")):
        base = os.path.join(work, f"base-{geometry}")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        make_base(base, opts)
        leaky = os.path.join(work, f"leaky-{geometry}")
        shutil.rmtree(leaky, ignore_errors=True)
        shutil.copytree(base, leaky)
        leak_one_cluster(os.path.join(leaky, "d"), 3 << 20)
        # The leaked cluster's guest range now reads as zeroes: that is the
        # data every crash state must keep.
        for label, cmd in (
            ("add", ["bitmap", "--add", "-g", "64k", "d", "new"]),
            ("add-disabled", ["bitmap", "--add", "--disable", "d", "new"]),
            ("remove", ["bitmap", "--remove", "d", "b0"]),
            ("remove-last-added", ["bitmap", "--remove", "d", "b2"]),
            ("clear", ["bitmap", "--clear", "d", "b0"]),
            ("disable", ["bitmap", "--disable", "d", "b0"]),
            ("enable", ["bitmap", "--enable", "d", "b1"]),
            ("merge", ["bitmap", "--merge", "b1", "d", "b2"]),
        ):
            cases.append((f"{geometry}-{label}", base, cmd))
        cases.append((f"{geometry}-check-r-leaks", leaky, ["check", "-r", "leaks", "d"]))
        cases.append((f"{geometry}-check-r-all", leaky, ["check", "-r", "all", "d"]))
        if geometry == "64k":
            crashed = os.path.join(work, f"crashed-{geometry}")
            shutil.rmtree(crashed, ignore_errors=True)
            shutil.copytree(base, crashed)
            crash_a_writer(qnbd, crashed, work)
            for label, cmd in (
                ("add", ["bitmap", "--add", "d", "new"]),
                ("remove", ["bitmap", "--remove", "d", "b0"]),
                ("disable", ["bitmap", "--disable", "d", "b2"]),
            ):
                cases.append((f"{geometry}-pending-record-{label}", crashed, cmd))
    only = os.environ.get("QNBD_POWER_ONLY")
    for name, base, cmd in cases:
        if only and only not in name:
            continue
        one_case(name, qnbd, shim, work, base, cmd, rnd, variants)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except RuntimeError as e:
        print(e)
        sys.exit(1)
