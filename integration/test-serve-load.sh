#!/usr/bin/env bash
# Load: 200 clients at once, each writing and reading back its own region
# (python libnbd, one handle per thread), all succeed; then 1000
# connect/disconnect cycles do not grow the server's open descriptors or
# RSS (measured after 100 and after 1000 cycles).
source "$(dirname "$0")/lib-serve.sh"
requires_python_nbd

qemu-img create -q -f raw "$TMPDIR_TEST/disk.raw" 200M
# Under ASan, freed memory sits in a quarantine (256 MiB by default) and
# would read as RSS growth; without the quarantine, growth is real growth.
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=0
start_serve -f raw -e 0 "$TMPDIR_TEST/disk.raw"

"$PY" - "$SERVE_URI" <<'PY' || fail "concurrent clients"
import os, sys, threading, nbd
uri = sys.argv[1]
N = 200
MiB = 1 << 20
barrier = threading.Barrier(N)
errors = []
def client(i):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        barrier.wait(timeout=60)  # all 200 connected at the same time
        data = os.urandom(64 << 10)
        for k in range(8):
            h.pwrite(data, i * MiB + k * len(data))
        h.flush()
        for k in range(8):
            if h.pread(len(data), i * MiB + k * len(data)) != data:
                errors.append(f"client {i}: read back differs")
        h.shutdown()
    except Exception as e:  # reported below; a thread must not die silently
        errors.append(f"client {i}: {e}")
threads = [threading.Thread(target=client, args=(i,)) for i in range(N)]
for t in threads: t.start()
for t in threads: t.join()
if errors:
    print(len(errors), "errors; first:", errors[:5])
    sys.exit(1)
print(f"{N} concurrent clients ok")
PY

# Descriptor count and RSS of the server after 100 and after 1000 cycles.
"$PY" - "$SERVE_URI" "$SERVE_PID" <<'PY' || fail "connect/disconnect cycles leak"
import os, sys, time, nbd
uri, pid = sys.argv[1], int(sys.argv[2])
def fds(): return len(os.listdir(f"/proc/{pid}/fd"))
def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1])
def settled_fds():
    # The server closes a connection's descriptor just after the client
    # sees the disconnect: wait until the count holds still.
    last, stable = fds(), 0
    for _ in range(200):
        time.sleep(0.01)
        now = fds()
        stable = stable + 1 if now == last else 0
        last = now
        if stable >= 10: break
    return last
def cycle():
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, 0)
    h.shutdown()
    del h
for _ in range(100): cycle()
f100, r100 = settled_fds(), rss_kib()
for _ in range(900): cycle()
f1000, r1000 = settled_fds(), rss_kib()
print(f"fds {f100} -> {f1000}, RSS {r100} -> {r1000} KiB")
assert f1000 <= f100, "descriptors grew"
# Allocator noise is allowed; per-connection growth (900 x even 4 KiB) is not.
assert r1000 - r100 <= 2048, "RSS grew by more than 2 MiB"
PY
serve_alive || fail "server died under load"
stop_serve
echo PASS
