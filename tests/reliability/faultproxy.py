"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server.

Requests are forwarded unchanged; the rules in force decide which of them instead get an S3 error
response (500 InternalError, 503 SlowDown or ServiceUnavailable), a dropped connection (a TCP
reset before any response), or a slow response (forwarded after a delay). Rules match on the
HTTP method and a regular expression over the path, fire on a seeded random share of matching
requests or on all of them, and count what they did, so a test can say how many faults the
client absorbed. An outage is a rule that fires on every request.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# S3's error code -> (HTTP status, message), as S3 itself answers.
S3_ERRORS = {
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "SlowDown": (503, "Please reduce your request rate."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
    "InvalidAccessKeyId": (403, "The AWS Access Key Id you provided does not exist in our "
                                "records."),
}
READS = frozenset({"GET", "HEAD"})
WRITES = frozenset({"PUT", "POST", "DELETE"})


@dataclass
class Fault:
    """One kind of fault on the requests it matches.

    ``kind`` is ``"error"`` (answer with the S3 error ``code``), ``"reset"`` (drop the
    connection with a TCP reset), ``"slow"`` (forward after ``delay_s``, or once ``release`` is
    set when it is given, ``delay_s`` at most) or ``"stall"`` (hold the request ``delay_s``, then
    drop it: it never reaches storage). ``share`` of the matching requests are hit (1.0: every
    one, an outage); ``limit`` caps how many.
    """

    kind: str
    methods: frozenset[str] = READS | WRITES
    path: str = ".*"
    share: float = 1.0
    code: str = "SlowDown"
    delay_s: float = 1.0
    limit: int | None = None
    release: threading.Event | None = None
    fired: int = 0
    hit_paths: list[str] = field(default_factory=list)

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and re.search(self.path, path) is not None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        proxy = self.server.proxy
        body = self._body()  # read first: the client's connection stays usable after an error
        fault = proxy.pick(self.command, self.path)
        proxy.count_request(self.command)
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.delay_s)
        if fault is not None and fault.kind in ("reset", "stall"):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault is not None and fault.kind == "error":
            status, message = S3_ERRORS[fault.code]
            code = fault.code
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        if fault is not None and fault.kind == "slow":
            if fault.release is None:
                time.sleep(fault.delay_s)
            else:
                fault.release.wait(fault.delay_s)
        self._forward(body)

    def _forward(self, body: bytes):
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                              timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("connection", "transfer-encoding", "content-length")}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length", "server",
                                    "date"):
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else len(payload)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    """The proxy: ``url`` is its endpoint; ``add`` and ``clear`` change the faults in force."""

    def __init__(self, upstream_url: str, seed: int = 0):
        upstream = urlsplit(upstream_url)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._server.upstream_host, self._server.upstream_port = upstream.hostname, upstream.port
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.faults: list[Fault] = []
        self.requests: dict[str, int] = {}
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def count_request(self, method: str) -> None:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1

    def pick(self, method: str, path: str) -> Fault | None:
        """The fault that hits this request, if any (the first rule that fires)."""
        with self._lock:
            for fault in self.faults:
                if not fault.matches(method, path):
                    continue
                if fault.limit is not None and fault.fired >= fault.limit:
                    continue
                if fault.share >= 1.0 or self._random.random() < fault.share:
                    fault.fired += 1
                    fault.hit_paths.append(f"{method} {path}")
                    return fault
        return None

    def injected(self) -> int:
        """Faults injected so far, all rules together."""
        with self._lock:
            return sum(fault.fired for fault in self.faults)
