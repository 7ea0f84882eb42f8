"""A local RFC 3161 timestamp authority for the signing tests: HTTP on 127.0.0.1, answering
`application/timestamp-query` POSTs with pyHanko's own test TSA signer (DummyTimeStamper) and the test CA's
timestamping certificate. Run as a process by the test, which stops it by its pid:

    python tests/tsa_server.py TSA_CERT.pem TSA_KEY.pem PORT_FILE
"""
from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from asn1crypto import keys, pem, tsp, x509
from pyhanko.sign.timestamps.dummy_client import DummyTimeStamper


def _der(path: str) -> bytes:
    data = Path(path).read_bytes()
    return pem.unarmor(data)[2] if pem.detect(data) else data


def main(cert_path: str, key_path: str, port_file: str) -> None:
    stamper = DummyTimeStamper(tsa_cert=x509.Certificate.load(_der(cert_path)),
                               tsa_key=keys.PrivateKeyInfo.load(_der(key_path)))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Type") != "application/timestamp-query":
                self.send_error(415, "expected application/timestamp-query")
                return
            reply = stamper.request_tsa_response(tsp.TimeStampReq.load(body)).dump()
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file + ".tmp").write_text(str(server.server_address[1]))
    Path(port_file + ".tmp").rename(port_file)
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:4])
