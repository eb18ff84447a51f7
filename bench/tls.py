#!/usr/bin/env python3
"""TLS benchmark: qnbd and qemu-nbd, each in clear and over TLS with the same
X.509 credentials, on the same raw image, in one run (docs/tls.md).

Rows: nbdcopy sequential read (1 connection) in MiB/s and fio 4 KiB random
read at queue depth 32 in IOPS (fio's nbd engine, libnbd underneath, so the
TLS is GnuTLS on both ends). Each measure runs --rounds times, servers in
alternating order; the best round counts.

The servers use verify-peer=off: fio's nbd engine cannot pass
tls-certificates= (libnbd refuses local files in URIs unless the program
allows them), so the clients connect without a client certificate and with
libnbd's default server check. Both servers get exactly the same setup.

  bench/tls.py [--qnbd build/qnbd] [--size 1G] [--runtime 10] [--rounds 2]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def make_creds(d):
    os.makedirs(d)
    w = d + ".work"
    os.makedirs(w)
    ct = ["certtool"]
    run(ct + ["--generate-privkey", "--key-type", "ecdsa", "--outfile", f"{w}/ca-key.pem"])
    open(f"{w}/ca.info", "w").write('cn = "bench CA"\nca\ncert_signing_key\nexpiration_days = 2\n')
    run(ct + ["--generate-self-signed", "--load-privkey", f"{w}/ca-key.pem", "--template", f"{w}/ca.info",
              "--outfile", f"{d}/ca-cert.pem"])
    run(ct + ["--generate-privkey", "--key-type", "ecdsa", "--outfile", f"{d}/server-key.pem"])
    open(f"{w}/s.info", "w").write('cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\n'
                                   'tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n')
    run(ct + ["--generate-certificate", "--load-privkey", f"{d}/server-key.pem", "--load-ca-certificate",
              f"{d}/ca-cert.pem", "--load-ca-privkey", f"{w}/ca-key.pem", "--template", f"{w}/s.info",
              "--outfile", f"{d}/server-cert.pem"])


class Server:
    def __init__(self, kind, tls, image, sock, qnbd, creds):
        self.kind, self.tls, self.image, self.sock, self.qnbd, self.creds = kind, tls, image, sock, qnbd, creds
        self.proc = None

    @property
    def name(self):
        return f"{self.kind}{' TLS' if self.tls else ''}"

    def start(self):
        obj = [f"tls-creds-x509,id=t,endpoint=server,dir={self.creds},verify-peer=off"]
        if self.kind == "qnbd":
            argv = [self.qnbd, "serve", "-t", "-e", "0", "-f", "raw", "-k", self.sock]
        else:
            argv = ["qemu-nbd", "-t", "-e", "16", "-f", "raw", "-k", self.sock]
        if self.tls:
            argv += ["--object", obj[0], "--tls-creds", "t"]
        self.proc = subprocess.Popen(argv + [self.image], stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(self.sock):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")

    def uri(self):
        return f"nbd{'s' if self.tls else ''}+unix:///?socket={self.sock}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def nbdcopy_rate(uri, size, env):
    t = time.monotonic()
    run(["nbdcopy", "--connections=1", "--requests=16", uri, "null:"], env=env)
    return size / MiB / (time.monotonic() - t)


def fio_iops(uri, runtime, env):
    out = run(["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
               "--iodepth=32", "--numjobs=1", f"--runtime={runtime}", "--time_based", "--output-format=terse",
               "--terse-version=3"], env=env).stdout
    return float(out.strip().splitlines()[-1].split(";")[7])  # read IOPS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qnbd", default=os.path.join(os.path.dirname(__file__), "..", "build", "qnbd"))
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    a = ap.parse_args()
    for tool in ("certtool", "qemu-nbd", "nbdcopy", "fio"):
        if not shutil.which(tool):
            sys.exit(f"bench/tls.py: {tool} not found")
    m = re.fullmatch(r"(\d+)([MG]?)", a.size)
    size = int(m.group(1)) * {"": 1, "M": MiB, "G": 1024 * MiB}[m.group(2)]
    tmp = tempfile.mkdtemp(prefix="qnbd-tls-bench.", dir=a.dir)
    try:
        creds = os.path.join(tmp, "creds")
        make_creds(creds)
        image = os.path.join(tmp, "disk.raw")
        block = os.urandom(MiB)
        with open(image, "wb") as f:
            for _ in range(size // MiB):
                f.write(block)
        # libnbd reads no per-user TLS files from this empty HOME.
        env = dict(os.environ, HOME=tmp)
        servers = [Server(k, t, image, os.path.join(tmp, f"{k}{int(t)}.sock"), os.path.abspath(a.qnbd), creds)
                   for k in ("qnbd", "qemu-nbd") for t in (False, True)]
        rows = {"nbdcopy seq read, 1 conn (MiB/s)": lambda s: nbdcopy_rate(s.uri(), size, env),
                "fio 4k randread qd32 (IOPS)": lambda s: fio_iops(s.uri(), a.runtime, env)}
        best = {(r, s.name): 0.0 for r in rows for s in servers}
        for rnd in range(a.rounds):
            order = servers if rnd % 2 == 0 else list(reversed(servers))
            for s in order:
                s.start()
                try:
                    for r, f in rows.items():
                        best[(r, s.name)] = max(best[(r, s.name)], f(s))
                finally:
                    s.stop()
        names = [s.name for s in servers]
        print(f"size {a.size}, fio runtime {a.runtime} s, best of {a.rounds}, {os.cpu_count()} CPUs")
        print("| row | " + " | ".join(names) + " | qnbd TLS / qemu-nbd TLS | qnbd TLS / qnbd |")
        print("|---" * (len(names) + 3) + "|")
        for r in rows:
            v = [best[(r, n)] for n in names]
            print(f"| {r} | " + " | ".join(f"{x:.0f}" for x in v) +
                  f" | {v[1] / v[3]:.2f} | {v[1] / v[0]:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
