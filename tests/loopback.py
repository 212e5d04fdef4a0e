"""Shard servers on 127.0.0.1 for the remote-data tests, started and stopped by the tests themselves.

`ShardServer`: a threaded HTTP server over a folder that answers Range requests (206) and plays faults per file
name: "missing" (404), "stall" (accepts the request, never answers), ("cut", n) (the first n answers announce the
whole length, send half and close), ("trickle", n) (the first n answers send TRICKLE_FAST body bytes at once, then
one byte every TRICKLE_S seconds); with ranges=False it answers every request whole (200), as servers without
range support do; with upstream=URL it forwards every request there (moto's S3: its answers, with the faults
played on them).  Every request is recorded, so a test can tell who read which shard.
`self_signed` makes a certificate for HTTPS on 127.0.0.1; `s3_server`: moto's S3 emulator in a thread, with the environment a user sets for an S3-compatible store.
"""
from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

STALL_LIMIT_S = 30  # a stalled or trickled answer ends at the latest when the server stops, or after this
TRICKLE_FAST, TRICKLE_S = 1000, 0.4  # a trickled answer: this many body bytes at once, then one byte per TRICKLE_S
HOP_BY_HOP = {"connection", "content-length", "date", "keep-alive", "server", "transfer-encoding"}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "ShardServer"

    def do_GET(self):  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        wanted = self.headers.get("Range")
        fault = self.server.take_fault(name)
        self.server.record(name, wanted)
        if fault == "stall":
            self.server.stopping.wait(STALL_LIMIT_S)
            return
        if self.server.upstream is not None:
            status, headers, body = self._forward()
        else:
            path = self.server.root / name
            if fault == "missing" or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if wanted and self.server.ranges else 0
            status, body = 206 if start else 200, data[start:]
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "trickle":
            self._trickle(body)
        else:
            self.wfile.write(body[:len(body) // 2] if fault == "cut" else body)
        self.close_connection = True

    def _forward(self) -> tuple[int, dict, bytes]:
        """The upstream server's answer to this request: status, end-to-end headers, body."""
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        request = urllib.request.Request(self.server.upstream + self.path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, head, body = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as err:
            status, head, body = err.code, err.headers, err.read()
        return status, {k: v for k, v in head.items() if k.lower() not in HOP_BY_HOP}, body

    def _trickle(self, body: bytes) -> None:
        self.wfile.write(body[:TRICKLE_FAST])
        self.wfile.flush()
        end = time.monotonic() + STALL_LIMIT_S
        for i in range(TRICKLE_FAST, len(body)):
            if self.server.stopping.wait(TRICKLE_S) or time.monotonic() > end:
                return
            try:
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
            except OSError:  # the reader gave up and closed the connection
                return

    def log_message(self, *args):  # quiet: the tests read `requests`
        pass


class ShardServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, faults: dict | None = None, ranges: bool = True, tls: tuple | None = None,
                 upstream: str | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.faults, self.ranges, self.scheme = Path(root), dict(faults or {}), ranges, "http"
        self.upstream = upstream
        if tls is not None:  # (certificate, key) files: HTTPS
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.socket = context.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.requests: list[tuple[str, str | None]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def take_fault(self, name: str):
        with self._lock:
            fault = self.faults.get(name)
            if isinstance(fault, tuple):  # ("cut", n), ("trickle", n): n times, then served whole
                kind, times = fault
                self.faults[name] = (kind, times - 1) if times > 1 else None
                return kind
            return fault

    def record(self, name: str, wanted: str | None) -> None:
        with self._lock:
            self.requests.append((name, wanted))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), valid for a day."""
    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(bucket: str, files: list[Path]):
    """moto's S3 on 127.0.0.1 holding `files` under their names in `bucket`; yields the environment (credentials,
    region, AWS_ENDPOINT_URL) that boto3 needs to reach it, also set in os.environ meanwhile."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        for path in files:
            client.upload_file(str(path), bucket, path.name)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
