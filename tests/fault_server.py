"""A small HTTP file server for the tests, run as its own process on 127.0.0.1 (the tests start it and stop
it by its pid). It serves a folder, and injects faults by path prefix:

    /files/<path>            the file
    /flaky/<n>/<path>        503 for the first n requests of that path, then the file
    /down/<path>             always 503
    /reset/<path>            closes the connection without an answer

Usage: python fault_server.py ROOT PORT_FILE  (writes the port it listens on to PORT_FILE when ready)
"""
from __future__ import annotations

import http.server
import sys
import threading
from pathlib import Path

ROOT = Path(sys.argv[1])
SEEN: dict[str, int] = {}
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:       # quiet
        pass

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?", 1)[0].lstrip("/").split("/")
        mode = parts[0]
        if mode == "reset":
            self.connection.close()
            return
        if mode == "down":
            return self._status(503)
        if mode == "flaky":
            n, rest = int(parts[1]), parts[2:]
            with LOCK:
                SEEN[self.path] = SEEN.get(self.path, 0) + 1
                count = SEEN[self.path]
            if count <= n:
                return self._status(503)
            parts = ["files", *rest]
        if parts[0] != "files":
            return self._status(404)
        target = (ROOT / "/".join(parts[1:])).resolve()
        if not target.is_relative_to(ROOT.resolve()) or not target.is_file():
            return self._status(404)
        data = target.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(sys.argv[2]).write_text(str(server.server_address[1]))
    server.serve_forever()
