#!/usr/bin/env bash
# Hostile and malformed input over a raw socket: the server answers what it
# can answer, drops what breaks framing, and keeps serving other clients.
source "$(dirname "$0")/lib-serve.sh"
requires python3

img=$TMPDIR_TEST/disk.img
truncate -s 16M "$img"
start_serve -f raw -e 0 "$img"

python3 - "$SERVE_SOCK" <<'PY' || fail "bad-input script failed"
import socket, struct, sys

SOCK = sys.argv[1]
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003e889045565a9
NBD_REP_ACK, NBD_REP_INFO = 1, 3
NBD_REP_ERR_UNSUP, NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY = 0x80000001, 0x80000003, 0x80000002
NBD_EPERM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW = 1, 22, 28, 75

def recvall(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b

def closed(s):
    s.settimeout(5)
    try:
        while True:
            if not s.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False

def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCK)
    magic, opt, flags = struct.unpack(">QQH", recvall(s, 18))
    assert magic == 0x4e42444d41474943 and opt == IHAVEOPT and flags == 3, (hex(magic), flags)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s

def option(s, code, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)

def reply(s):
    magic, opt, typ, ln = struct.unpack(">QIII", recvall(s, 20))
    assert magic == REP_MAGIC, hex(magic)
    return opt, typ, recvall(s, ln)

def go(s, name=b""):
    option(s, 7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        opt, typ, data = reply(s)
        assert opt == 7
        if typ == NBD_REP_ACK:
            return
        assert typ == NBD_REP_INFO, hex(typ)

def request(s, typ, offset, length, flags=0, cookie=0x1234, payload=b""):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, offset, length) + payload)

def simple_reply(s, cookie=0x1234, data_len=0):
    magic, err, ck = struct.unpack(">IIQ", recvall(s, 16))
    assert magic == 0x67446698 and ck == cookie, (hex(magic), ck)
    data = recvall(s, data_len) if err == 0 and data_len else b""
    return err, data

def works():
    s = connect(); go(s)
    request(s, 0, 0, 512)
    err, data = simple_reply(s, data_len=512)
    assert err == 0 and len(data) == 512
    request(s, 2, 0, 0)
    s.close()

# 1. garbage option magic: dropped.
s = connect(); s.sendall(b"GARBAGE!" + b"\0" * 8); assert closed(s), "garbage magic"; works()
# 2. unknown client flag bits: dropped.
s = socket.socket(socket.AF_UNIX); s.connect(SOCK); recvall(s, 18)
s.sendall(struct.pack(">I", 0x80000001)); assert closed(s), "client flags"; works()
# 3. truncated option, then the client goes away.
s = connect(); s.sendall(struct.pack(">QII", IHAVEOPT, 7, 100) + b"\0" * 10); s.close(); works()
# 4. oversize option length: dropped without reading 1 GiB.
s = connect(); s.sendall(struct.pack(">QII", IHAVEOPT, 99, 1 << 30)); assert closed(s), "oversize"; works()
# 5. unknown option: UNSUP with its data drained, next option still parsed.
s = connect(); option(s, 99, b"hello")
opt, typ, _ = reply(s); assert (opt, typ) == (99, NBD_REP_ERR_UNSUP), (opt, hex(typ))
option(s, 5); opt, typ, _ = reply(s); assert typ == NBD_REP_ERR_POLICY, hex(typ)   # STARTTLS
option(s, 3, b"x"); opt, typ, _ = reply(s); assert typ == NBD_REP_ERR_INVALID, hex(typ)  # LIST with data
option(s, 7, b"\0\0\0\xff"); opt, typ, _ = reply(s); assert typ == NBD_REP_ERR_INVALID, hex(typ)  # bad GO
go(s)
# 6. transmission errors keep the connection usable.
SIZE = 16 << 20
request(s, 42, 0, 512); assert simple_reply(s)[0] == NBD_EINVAL, "unknown command"
request(s, 0, 0, 512, flags=1 << 9); assert simple_reply(s)[0] == NBD_EINVAL, "unknown flag"
request(s, 0, 0, 512, flags=1 << 3); assert simple_reply(s)[0] == NBD_EINVAL, "REQ_ONE on READ"
request(s, 0, 0, 512, flags=1 << 2); assert simple_reply(s)[0] == NBD_EINVAL, "DF without structured"
request(s, 0, SIZE - 256, 512); assert simple_reply(s)[0] == NBD_EINVAL, "read past end"
request(s, 0, (1 << 64) - 256, 512); assert simple_reply(s)[0] == NBD_EINVAL, "read offset overflow"
request(s, 1, SIZE - 256, 512, payload=b"\1" * 512); assert simple_reply(s)[0] == NBD_ENOSPC, "write past end"
request(s, 6, SIZE, 512); assert simple_reply(s)[0] == NBD_ENOSPC, "zero past end"
request(s, 4, SIZE, 512); assert simple_reply(s)[0] == NBD_EINVAL, "trim past end"
request(s, 7, 0, 512); assert simple_reply(s)[0] == NBD_EINVAL, "block status without contexts"
request(s, 0, 0, 0); assert simple_reply(s)[0] == 0, "zero-length read"
request(s, 0, 0, 0xFFFFFFFF); assert simple_reply(s)[0] == NBD_EINVAL, "4 GiB read"
request(s, 1, 4096, 4096, payload=b"\x5a" * 4096); assert simple_reply(s)[0] == 0
request(s, 0, 4096, 4096); err, data = simple_reply(s, data_len=4096); assert data == b"\x5a" * 4096
request(s, 2, 0, 0); assert closed(s), "DISC"
# 7. a short WRITE payload, then the client vanishes.
s = connect(); go(s); request(s, 1, 0, 65536, payload=b"\0" * 1000); s.close(); works()
# 8. a WRITE payload above the maximum: dropped (cannot be consumed sensibly).
s = connect(); go(s); request(s, 1, 0, (32 << 20) + 1); assert closed(s), "huge write"; works()
# 9. bad request magic: dropped.
s = connect(); go(s); s.sendall(b"\xde\xad\xbe\xef" + b"\0" * 24); assert closed(s), "request magic"; works()
# 10. ABORT gets its ACK.
s = connect(); option(s, 2); opt, typ, _ = reply(s); assert typ == NBD_REP_ACK; assert closed(s)
print("ok")
PY
serve_alive || fail "server died"
stop_serve
echo PASS
