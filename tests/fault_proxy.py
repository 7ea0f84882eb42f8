"""A TCP proxy for fault injection, run as its own process on 127.0.0.1 in front of a real server (moto's S3
server in the tests). What it does to each new connection is read from MODE_FILE at that moment:

    pass                 forward both ways
    drop                 close the connection at once (connection reset for the client)
    503                  answer its first request with 'HTTP/1.1 503 Slow Down' (S3's throttling answer), close
    drop-after-puts N P  forward, counting requests 'PUT P...'; from the Nth on, close connections (the mode
                         file is rewritten to 'drop', so the store stays unreachable until the test says 'pass')
    drop-after N M P     the same for requests 'M P...' (any method M)

Usage: python fault_proxy.py UPSTREAM_PORT MODE_FILE PORT_FILE
"""
from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

UPSTREAM = ("127.0.0.1", int(sys.argv[1]))
MODE = Path(sys.argv[2])
PUTS = {"n": 0}
LOCK = threading.Lock()
S503 = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 92\r\n\r\n"
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>\n\n\n\n")


def mode() -> list[str]:
    try:
        return MODE.read_text().split() or ["pass"]
    except OSError:
        return ["pass"]


def pipe(src: socket.socket, dst: socket.socket, count_puts: tuple[int, str] | None) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if count_puts is not None:
                limit, prefix = count_puts
                hits = data.count(prefix.encode())
                if hits:
                    with LOCK:
                        PUTS["n"] += hits
                        over = PUTS["n"] >= limit
                    if over:
                        MODE.write_text("drop")
                        break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def handle(client: socket.socket) -> None:
    m = mode()
    if m[0] == "drop":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()                                   # RST: connection reset by peer
        return
    if m[0] == "503":
        try:
            if client.recv(65536):
                client.sendall(S503.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        except OSError:
            pass
        client.close()
        return
    upstream = socket.create_connection(UPSTREAM)
    count = (int(m[1]), f"PUT {m[2]}") if m[0] == "drop-after-puts" else \
        (int(m[1]), f"{m[2]} {m[3]}") if m[0] == "drop-after" else None
    threading.Thread(target=pipe, args=(client, upstream, count), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client, None), daemon=True).start()


if __name__ == "__main__":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    Path(sys.argv[3]).write_text(str(server.getsockname()[1]))
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
