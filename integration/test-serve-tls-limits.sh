#!/usr/bin/env bash
# Limits under attack on a TLS TCP listener: (1) the connection cap counts
# clients stuck in negotiation (a good client waits until they leave);
# (2) --max-connections-per-address refuses a third connection from
# 127.0.0.1 while 127.0.0.2 is still served; (3) SIGTERM while 100 clients
# sit mid-negotiation (half of them inside the TLS handshake) ends the server
# promptly (the qemu-nbd CVE-2024-7409 case).
source "$(dirname "$0")/lib-serve.sh"
source "$(dirname "$0")/lib-tls.sh"
tls_test_setup nbdinfo timeout
img=$TMPDIR_TEST/disk.img
truncate -s 1M "$img"

serve_tcp() {  # PORT ARGS...: sets SRV_PID, SRV_LOG
  local port=$1
  shift
  serve_tls_tcp "$port" -f raw --handshake-timeout 60 "$@" "$img"
}
# Holders: N raw connections from SRC that stop mid-negotiation. MODE
# "greeting" reads the greeting and stalls; "tls" also sends STARTTLS, reads
# the ACK and stalls inside the TLS handshake. Prints "ready" once all are
# established, then holds them until stdin closes. "refused" counts
# connections closed before a greeting.
HOLDERS_PY=$(cat <<'PY'
import socket, struct, sys
port, n, mode, src = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
socks, refused = [], 0
for _ in range(n):
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(10)
    try:
        g = b""
        while len(g) < 18:
            c = s.recv(18 - len(g))
            if not c:
                raise EOFError
            g += c
        if mode == "tls":
            s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
            r = b""
            while len(r) < 20:
                r += s.recv(20 - len(r))
            assert struct.unpack(">QIII", r)[2] == 1
        socks.append(s)
    except (EOFError, ConnectionResetError, socket.timeout):
        refused += 1
print(f"ready {len(socks)} refused {refused}", flush=True)
sys.stdin.read()
PY
)
holders() {  # PORT N MODE SRC (the script comes by -c: stdin is the hold pipe)
  "$PY" -c "$HOLDERS_PY" "$@"
}
good() {  # PORT: nbdinfo over TLS within 10 s
  timeout 10 nbdinfo --size "nbds://localhost:$1/?tls-certificates=$T/client1" >/dev/null 2>&1
}

# (1) cap 4 (-e 4); 4 clients stuck after the greeting fill it.
port=$(free_port)
serve_tcp "$port" -e 4
exec 8> >(holders "$port" 4 greeting 127.0.0.1 >"$TMPDIR_TEST/h1.out")
for ((i = 0; i < 100; i++)); do grep -q ready "$TMPDIR_TEST/h1.out" 2>/dev/null && break; sleep 0.05; done
expect_eq "$(cat "$TMPDIR_TEST/h1.out")" "ready 4 refused 0" "holders at the cap"
if timeout 2 nbdinfo --size "nbds://localhost:$port/?tls-certificates=$T/client1" >/dev/null 2>&1; then
  fail "a fifth client was served while 4 negotiating clients filled max connections 4"
fi
exec 8>&-  # the holders leave
good "$port" || fail "the good client was not served once the negotiating clients left"
kill -TERM "$SRV_PID"; wait "$SRV_PID" || fail "server (1) exit status $?"

# (2) per-address cap 2: a third connection from 127.0.0.1 is closed at
# once, a connection from 127.0.0.2 is served.
port=$(free_port)
serve_tcp "$port" -e 0 --max-connections-per-address 2
exec 8> >(holders "$port" 3 greeting 127.0.0.1 >"$TMPDIR_TEST/h2.out")
for ((i = 0; i < 100; i++)); do grep -q ready "$TMPDIR_TEST/h2.out" 2>/dev/null && break; sleep 0.05; done
expect_eq "$(cat "$TMPDIR_TEST/h2.out")" "ready 2 refused 1" "per-address cap 2 from 127.0.0.1"
expect_eq "$(holders "$port" 1 greeting 127.0.0.2 </dev/null)" "ready 1 refused 0" "127.0.0.2 while 127.0.0.1 is full"
wait_log "$SRV_LOG" "max_connections_per_address" || fail "the per-address refusal was not logged"
exec 8>&-
kill -TERM "$SRV_PID"; wait "$SRV_PID" || fail "server (2) exit status $?"

# (3) SIGTERM with 100 clients mid-negotiation: 50 after the greeting, 50
# inside the TLS handshake; the handshake timeout (60 s) is not what ends them.
port=$(free_port)
serve_tcp "$port" -e 0
exec 8> >(holders "$port" 50 greeting 127.0.0.1 >"$TMPDIR_TEST/h3a.out")
exec 9> >(holders "$port" 50 tls 127.0.0.1 >"$TMPDIR_TEST/h3b.out")
for ((i = 0; i < 200; i++)); do
  grep -q ready "$TMPDIR_TEST/h3a.out" 2>/dev/null && grep -q ready "$TMPDIR_TEST/h3b.out" 2>/dev/null && break
  sleep 0.05
done
expect_eq "$(cat "$TMPDIR_TEST/h3a.out") / $(cat "$TMPDIR_TEST/h3b.out")" "ready 50 refused 0 / ready 50 refused 0" \
  "100 clients mid-negotiation"
start=$(date +%s%N)
kill -TERM "$SRV_PID"
wait "$SRV_PID" || fail "server (3) exit status $?"
ms=$((($(date +%s%N) - start) / 1000000))
echo "SIGTERM with 100 negotiating clients: exit after $ms ms"
((ms < 5000)) || fail "shutdown with 100 negotiating clients took $ms ms"
exec 8>&- 9>&-
echo "ok"
