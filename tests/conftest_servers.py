"""Real servers on 127.0.0.1 for the remote-storage tests.

* ``moto_server`` — moto's standalone S3 server (``python -m moto.server``) in a subprocess.
* ``nginx_server`` — Debian's nginx serving a temporary directory (Range support is
  built into its static file module); config written into the tmp dir, ``daemon off``,
  run as the current user.
* ``FaultProxy`` — a small HTTP/1.1 proxy in front of either that can inject faults
  (``503 SlowDown``, connection resets, truncated bodies, delays), add a fixed
  per-request latency, and logs every request (method, path, query, Range, status,
  bytes) so tests can count requests server-side — e.g. prove that opening a dataset
  never sends a LIST.

Use from a conftest with ``from conftest_servers import *``. Fixtures: ``moto_server``,
``s3_client``, ``s3_bucket``, ``s3_proxy``, ``nginx_server``, ``http_dir``,
``http_proxy``; helper ``s3_options(endpoint, **extra)``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional
from urllib.parse import urlsplit

import pytest

__all__ = [
    "FaultProxy", "MotoServer", "NginxServer", "free_port", "s3_options", "TEST_CREDENTIALS",
    "moto_server", "s3_client", "s3_bucket", "s3_proxy_server", "s3_proxy",
    "nginx_server", "http_dir", "http_proxy_server", "http_proxy",
]

TEST_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: Optional[subprocess.Popen], what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def s3_options(endpoint: str, **extra) -> dict:
    """storage_options for a test S3 endpoint: credentials, path style, fast retries."""
    opts = dict(TEST_CREDENTIALS, endpoint_url=endpoint, retries=4, backoff_base=0.005, backoff_cap=0.05,
                connect_timeout=5.0, read_timeout=10.0)
    opts.update(extra)
    return opts


# ---------------------------------------------------------------------------------------------
# moto
class MotoServer:
    def __init__(self, log_path: Optional[str] = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_port(self.port, self.proc, "moto server")
        except BaseException:
            _stop(self.proc)
            raise

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, config=Config(s3={"addressing_style": "path"}),
                            **TEST_CREDENTIALS)

    def stop(self):
        _stop(self.proc)


# ---------------------------------------------------------------------------------------------
# nginx
class NginxServer:
    def __init__(self, workdir: str, root: Optional[str] = None):
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(self.nginx):
            raise RuntimeError("nginx not installed: apt-get install -y nginx-light")
        self.workdir = workdir
        self.root = root or os.path.join(workdir, "www")
        os.makedirs(self.root, exist_ok=True)
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(workdir, d), exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = os.path.join(workdir, "access.log")
        user = "user root root;\n" if os.geteuid() == 0 else ""   # else workers drop to nobody
        conf = f"""
daemon off;
{user}worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format ranges '$request_method $uri "$http_range" $status $body_bytes_sent';
    access_log {self.access_log} ranges;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        autoindex off;
        location / {{ }}
        location /redirect/ {{ rewrite ^/redirect/(.*)$ /$1 redirect; }}
    }}
}}
"""
        self.conf = os.path.join(workdir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen([self.nginx, "-p", workdir, "-c", self.conf, "-e",
                                      os.path.join(workdir, "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_port(self.port, self.proc, "nginx")
        except BaseException:
            _stop(self.proc)
            raise

    def requests(self) -> List[tuple]:
        """(method, uri, range header, status, body bytes) of every request so far."""
        out = []
        with open(self.access_log) as f:
            for line in f:
                method, uri, rest = line.split(" ", 2)
                rng, status, sent = rest.rsplit(" ", 2)
                out.append((method, uri, rng.strip('"'), int(status), int(sent)))
        return out

    def stop(self):
        _stop(self.proc)   # SIGTERM = fast shutdown; the master takes its worker with it


# ---------------------------------------------------------------------------------------------
# the fault-injecting proxy
@dataclass
class Fault:
    kind: str                      # "status" | "reset" | "truncate" | "delay"
    times: int                     # how many matching requests it still applies to (-1: forever)
    method: Optional[str] = None
    path_contains: Optional[str] = None
    query_contains: Optional[str] = None
    status: int = 503
    code: str = "SlowDown"
    delay: float = 0.0
    keep: float = 0.5              # truncate: fraction of the body sent before the connection dies
    hits: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        return ((self.method is None or self.method == method)
                and (self.path_contains is None or self.path_contains in path)
                and (self.query_contains is None or self.query_contains in query))


@dataclass
class Logged:
    method: str
    path: str
    query: str
    range: Optional[str]
    status: int = 0
    sent: int = 0                  # body bytes sent to the client
    received: int = 0              # body bytes received from the client
    fault: Optional[str] = None


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "expect", "proxy-authorization", "proxy-authenticate"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultproxy"

    def log_message(self, *args):     # quiet
        pass

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._up: Optional[http.client.HTTPConnection] = None

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()
        if self._up is not None:
            self._up.close()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self):
        """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.close()
        self.close_connection = True

    def _forward(self, body: bytes):
        proxy: FaultProxy = self.server.proxy
        for attempt in range(2):
            if self._up is None:
                self._up = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                self._up.connect()
                self._up.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self._up.putheader(k, v)
                if body or self.command in ("PUT", "POST"):
                    self._up.putheader("Content-Length", str(len(body)))
                self._up.endheaders(body if body else None)
                resp = self._up.getresponse()
                data = resp.read()
                return resp, data
            except (http.client.HTTPException, OSError):
                self._up.close()
                self._up = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _handle(self):
        proxy: FaultProxy = self.server.proxy
        body = self._read_body()
        split = urlsplit(self.path)
        entry = Logged(self.command, split.path, split.query, self.headers.get("Range"), received=len(body))
        fault = proxy._take_fault(self.command, split.path, split.query)
        if fault is not None:
            entry.fault = fault.kind
        proxy._log(entry)
        if proxy.latency:
            time.sleep(proxy.latency)
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay)
        if fault is not None and fault.kind == "reset":
            self._reset()
            return
        if fault is not None and fault.kind == "status":
            msg = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code>'
                   f"<Message>injected by faultproxy</Message></Error>").encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(msg)
            entry.status, entry.sent = fault.status, len(msg)
            return
        resp, data = self._forward(body)
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        entry.status = resp.status
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind == "truncate" and len(data) > 0:
            cut = min(len(data) - 1, int(len(data) * fault.keep))
            self.wfile.write(data[:cut])
            entry.sent = cut
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data)
        entry.sent = len(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    >>> # proxy.inject("status", times=3, method="GET")   # next three GETs: 503 SlowDown
    >>> # proxy.inject("reset"); proxy.inject("truncate", keep=0.3); proxy.latency = 0.02
    """

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self._lock = threading.Lock()
        self.faults: List[Fault] = []
        self.entries: List[Logged] = []
        self.latency = 0.0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="faultproxy")
        self._thread.start()

    def inject(self, kind: str, times: int = 1, **match) -> Fault:
        if kind not in ("status", "reset", "truncate", "delay"):
            raise ValueError(kind)
        f = Fault(kind, times, **match)
        with self._lock:
            self.faults.append(f)
        return f

    def _take_fault(self, method, path, query) -> Optional[Fault]:
        with self._lock:
            for f in self.faults:
                if f.times != 0 and f.matches(method, path, query):
                    if f.times > 0:
                        f.times -= 1
                    f.hits += 1
                    return f
        return None

    def _log(self, entry: Logged):
        with self._lock:
            self.entries.append(entry)

    def reset(self):
        with self._lock:
            self.faults.clear()
            self.entries.clear()
            self.latency = 0.0

    def log(self, method: Optional[str] = None, where: Optional[Callable[[Logged], bool]] = None) -> List[Logged]:
        with self._lock:
            entries = list(self.entries)
        return [e for e in entries if (method is None or e.method == method) and (where is None or where(e))]

    def s3_list_requests(self) -> List[Logged]:
        """GETs on a bucket itself (path-style ``/bucket`` or ``/bucket/``): ListObjects and friends."""
        return self.log("GET", lambda e: len([p for p in e.path.split("/") if p]) <= 1)

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoServer(str(tmp_path_factory.mktemp("moto") / "moto.log"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_client(moto_server):
    return moto_server.client()


@pytest.fixture
def s3_bucket(s3_client):
    """A fresh, empty bucket on the moto server."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_proxy_server(moto_server):
    proxy = FaultProxy(moto_server.endpoint)
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_proxy(s3_proxy_server):
    """The fault proxy in front of moto, with no faults, no latency and an empty log."""
    s3_proxy_server.reset()
    yield s3_proxy_server
    s3_proxy_server.reset()


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory):
    server = NginxServer(str(tmp_path_factory.mktemp("nginx")))
    yield server
    server.stop()


@pytest.fixture
def http_dir(nginx_server):
    """(local directory, URL) of a fresh directory served by nginx."""
    sub = uuid.uuid4().hex[:12]
    path = os.path.join(nginx_server.root, sub)
    os.makedirs(path)
    return path, f"{nginx_server.url}/{sub}"


@pytest.fixture(scope="session")
def http_proxy_server(nginx_server):
    proxy = FaultProxy(nginx_server.url)
    yield proxy
    proxy.stop()


@pytest.fixture
def http_proxy(http_proxy_server):
    """The fault proxy in front of nginx, reset."""
    http_proxy_server.reset()
    yield http_proxy_server
    http_proxy_server.reset()
