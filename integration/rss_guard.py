#!/usr/bin/env python3
"""Peak memory of a process, with a hard stop.

  rss_guard.py run LIMIT_MB TIMEOUT_S CMD...
      Run CMD (stdout/stderr inherited), polling its VmRSS every 20 ms; kill
      it (SIGKILL) once it passes LIMIT_MB or runs past TIMEOUT_S, so a
      regression fails fast instead of eating the machine's memory. Prints
      "peak_kib N" (ru_maxrss from wait4) on the last line of stderr and exits
      with CMD's status, 3 if it was killed for memory, 4 for time.
  rss_guard.py watch PID LIMIT_MB
      Poll a running PID the same way (kill it past LIMIT_MB); exits when it
      is gone. For servers started elsewhere; read VmHWM yourself before
      stopping them.
"""
import os
import signal
import subprocess
import sys
import time


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0


def main():
    mode = sys.argv[1]
    if mode == "watch":
        pid, limit = int(sys.argv[2]), int(sys.argv[3]) * 1024
        while True:
            r = rss_kib(pid)
            if r is None:
                return 0
            if r > limit:
                print(f"rss_guard: pid {pid} passed {limit // 1024} MB (VmRSS {r} kB); killed", file=sys.stderr)
                os.kill(pid, signal.SIGKILL)
                return 3
            time.sleep(0.02)
    limit, timeout, cmd = int(sys.argv[2]) * 1024, float(sys.argv[3]), sys.argv[4:]
    p = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    why = 0
    while True:
        wpid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if wpid == p.pid:
            break
        r = rss_kib(p.pid) or 0
        if r > limit or time.monotonic() > deadline:
            why = 3 if r > limit else 4
            print(f"rss_guard: {cmd[0]} " + (f"passed {limit // 1024} MB (VmRSS {r} kB)" if why == 3 else
                  f"ran past {timeout} s") + "; killed", file=sys.stderr)
            p.kill()
            _, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.02)
    print(f"peak_kib {ru.ru_maxrss}", file=sys.stderr)
    if why:
        return why
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
