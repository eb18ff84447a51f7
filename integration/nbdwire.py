"""A bare NBD client over a raw socket, for what libnbd 1.14 cannot send
(extended headers, payload-filtered BLOCK_STATUS) or will not send
(malformed requests). Only the wire format; tests assert on what it returns.
"""
import socket
import struct

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9


def recvall(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b


def option(s, code, data=b""):
    """Send option `code`; return its replies [(type, data)] up to ACK or an error."""
    s.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)
    out = []
    while True:
        magic, opt, typ, ln = struct.unpack(">QIII", recvall(s, 20))
        assert magic == OPT_REPLY_MAGIC and opt == code
        out.append((typ, recvall(s, ln)))
        if typ == 1 or typ & 0x80000000:
            return out


def meta(name, queries):
    """NBD_OPT_{LIST,SET}_META_CONTEXT payload."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) +
            b"".join(struct.pack(">I", len(q)) + q for q in queries))


def connect(path, extended, contexts, export=b""):
    """Handshake with STRUCTURED_REPLY (or EXTENDED_HEADERS), SET_META_CONTEXT
    and GO. Returns (socket, {context name: id}, transmission flags, size)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    recvall(s, 18)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    r = option(s, 11 if extended else 8)
    assert r[-1][0] == 1, r
    r = option(s, 10, meta(export, contexts))
    ids = {data[4:].decode(): struct.unpack(">I", data[:4])[0] for typ, data in r if typ == 4}
    r = option(s, 7, struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
    assert r[-1][0] == 1, r
    size, flags = [struct.unpack(">QH", d[2:12]) for t, d in r if t == 3 and d[:2] == b"\0\0"][0]
    return s, ids, flags, size


def send(s, extended, typ, off, ln, flags=0, cookie=77, payload=b""):
    if extended:
        s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, flags, typ, cookie, off, ln) + payload)
    else:
        s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, ln) + payload)


def chunks(s, extended, cookie=77, off=None):
    """Structured (or extended) reply chunks of one request: [(type, data)]."""
    out = []
    while True:
        if extended:
            magic, fl, typ, ck, o, ln = struct.unpack(">IHHQQQ", recvall(s, 32))
            assert magic == 0x6E8A278C and (off is None or o == off), (hex(magic), o, off)
        else:
            magic, fl, typ, ck, ln = struct.unpack(">IHHQI", recvall(s, 20))
            assert magic == 0x668E33EF, hex(magic)
        assert ck == cookie
        out.append((typ, recvall(s, ln)))
        if fl & 1:
            return out


def extents(extended, data):
    """(context id, [(length, flags)]) of a BLOCK_STATUS chunk."""
    cid = struct.unpack(">I", data[:4])[0]
    if extended:
        n = struct.unpack(">I", data[4:8])[0]
        return cid, [struct.unpack(">QQ", data[8 + 16 * i:24 + 16 * i]) for i in range(n)]
    return cid, [struct.unpack(">II", data[4 + 8 * i:12 + 8 * i]) for i in range((len(data) - 4) // 8)]



def status(s, extended, cookie=77):
    """The NBD error of a reply that carries no data (0 on success), simple
    or structured/extended (an error chunk's error field)."""
    magic = struct.unpack(">I", recvall(s, 4))[0]
    if magic == 0x67446698:  # simple reply
        err, ck = struct.unpack(">IQ", recvall(s, 12))
        assert ck == cookie
        return err
    if extended:
        assert magic == 0x6E8A278C, hex(magic)
        fl, typ, ck, _, ln = struct.unpack(">HHQQQ", recvall(s, 28))
    else:
        assert magic == 0x668E33EF, hex(magic)
        fl, typ, ck, ln = struct.unpack(">HHQI", recvall(s, 16))
    assert ck == cookie
    got = [(typ, recvall(s, ln))]
    if not fl & 1:
        got += chunks(s, extended, cookie)
    errs = [struct.unpack(">I", d[:4])[0] for t, d in got if t & 0x8000]
    return errs[0] if errs else 0
