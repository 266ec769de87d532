"""Read-only store over plain HTTP(S) with Range requests (any static file server, CDN).

Uses one ``urllib3`` connection pool per store (urllib3 comes with botocore), its own
retries off in favour of :mod:`packfmt.storage.retry`. A ranged GET must come back
as ``206 Partial Content`` with a ``Content-Range`` naming exactly the bytes asked
for and a body of exactly that length; anything else is retried or reported, never
returned. ``storage_options``: ``headers`` (e.g. an ``Authorization`` header),
``verify`` (TLS), ``ca_certs`` plus the common ones (retries, threads, max_gap ...).
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import quote, urljoin, urlsplit

from .base import ObjectNotFoundError, PermanentError, Store, parse_options, read_only_error
from .retry import TRANSIENT_HTTP_STATUS, ShortReadError

HTTP_OPTIONS = {
    "headers": None,
    "verify": True,
    "ca_certs": None,
}

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


_MAX_REDIRECTS = 5


def _origin(url: str):
    p = urlsplit(url)
    return (p.scheme, p.hostname, p.port or (443 if p.scheme == "https" else 80))


class HTTPStatusError(Exception):
    """An unexpected HTTP status; ``status`` decides whether it is retried."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class HTTPStore(Store):
    """``http(s)://host/prefix``: reading only (``put_bytes``/``open_write`` raise EROFS)."""

    scheme = "http"
    _transient_attrs = Store._transient_attrs + ("_pm", "_pm_pid")

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        options = parse_options(storage_options, HTTP_OPTIONS, "http(s)://")
        super().__init__(url, options)
        self.headers = dict(options["headers"] or {})
        self._reset_clients()

    def _reset_clients(self):
        self._pm = None
        self._pm_pid = -1

    @property
    def pool(self):
        return self._per_process("_pm", self._make_pool)

    def _make_pool(self):
        import urllib3
        kw = {}
        if self.url.startswith("https:"):
            kw["cert_reqs"] = "CERT_REQUIRED" if self.options["verify"] else "CERT_NONE"
            if self.options["ca_certs"]:
                kw["ca_certs"] = self.options["ca_certs"]
        # Redirects followed (CDNs, presigned URLs); every other retry is ours (retry.py).
        no_retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5,
                                   raise_on_redirect=True, raise_on_status=False)
        return urllib3.PoolManager(
            num_pools=4, maxsize=self.threads + 2, block=False, retries=no_retries,
            timeout=urllib3.Timeout(connect=float(self.options["connect_timeout"]),
                                    read=float(self.options["read_timeout"])),
            **kw)

    def object_url(self, name: str) -> str:
        return f"{self.url}/{quote(name)}"

    def _request(self, op: str, method: str, name: str, headers=None):
        self.stats.count(op)
        h = dict(self.headers)
        if headers:
            h.update(headers)
        url = self.object_url(name)
        for _ in range(_MAX_REDIRECTS + 1):
            resp = self.pool.request(method, url, headers=h, preload_content=False, redirect=False)
            if resp.status not in (301, 302, 303, 307, 308):
                break
            location = resp.headers.get("Location", "")
            resp.drain_conn()
            resp.release_conn()
            target = urljoin(url, location)
            if _origin(target) != _origin(url):
                # A dataset server must not send the reader to other hosts (SSRF): same origin only.
                raise PermanentError(f"refusing redirect from {url} to another origin: {target}")
            url = target
        else:
            raise PermanentError(f"more than {_MAX_REDIRECTS} redirects for {self.object_url(name)}")
        if resp.status == 404:
            resp.drain_conn()
            resp.release_conn()
            url = self.object_url(name)
            raise ObjectNotFoundError(f"no such object: {url}", url)
        if resp.status >= 400:
            resp.drain_conn()
            resp.release_conn()
            err = HTTPStatusError(resp.status, resp.reason or "")
            if resp.status in TRANSIENT_HTTP_STATUS:
                raise err
            raise PermanentError(str(err)) from err
        return resp

    def _body(self, resp, expected: Optional[int]) -> bytes:
        try:
            data = resp.read(decode_content=False)
        finally:
            resp.release_conn()
        self.stats.add_bytes(len(data))
        if expected is not None and len(data) != expected:
            raise ShortReadError(f"body has {len(data)} bytes, expected {expected}")
        return data

    def _get_range(self, name: str, offset: int, length: int) -> bytes:
        end = offset + length - 1
        resp = self._request("GET_RANGE", "GET", name,
                             {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"})
        if resp.status != 206:
            resp.drain_conn()
            resp.release_conn()
            raise PermanentError(f"server answered a Range request with HTTP {resp.status} "
                                 f"instead of 206 (no Range support?)")
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if m is None or int(m.group(1)) != offset or int(m.group(2)) != end:
            resp.drain_conn()
            resp.release_conn()
            cr = resp.headers.get("Content-Range")
            if m is not None and m.group(3) != "*" and offset + length > int(m.group(3)):
                raise PermanentError(f"range beyond the end of the object (size {m.group(3)})")
            raise ShortReadError(f"Content-Range {cr!r} does not match the request")
        cl = resp.headers.get("Content-Length")
        if cl is not None and int(cl) != length:
            resp.drain_conn()
            resp.release_conn()
            raise ShortReadError(f"Content-Length {cl}, expected {length}")
        return self._body(resp, length)

    def _get_object(self, name: str, max_size: Optional[int] = None) -> bytes:
        resp = self._request("GET", "GET", name, {"Accept-Encoding": "identity"})
        cl = resp.headers.get("Content-Length")
        if max_size is not None:
            if cl is not None and int(cl) > max_size:
                resp.drain_conn()
                resp.release_conn()
                raise PermanentError(f"object of {cl} bytes is larger than the {max_size}-byte limit")
            try:
                data = resp.read(max_size + 1, decode_content=False)  # an endless body stops here
            finally:
                resp.release_conn()
            if len(data) > max_size:
                raise PermanentError(f"object is larger than the {max_size}-byte limit")
            self.stats.add_bytes(len(data))
            if cl is not None and len(data) != int(cl):
                raise ShortReadError(f"body has {len(data)} bytes, expected {cl}")
            return data
        return self._body(resp, int(cl) if cl is not None else None)

    def _head(self, name: str) -> Optional[int]:
        try:
            resp = self._request("HEAD", "HEAD", name, {"Accept-Encoding": "identity"})
        except ObjectNotFoundError:
            return None
        resp.drain_conn()
        resp.release_conn()
        cl = resp.headers.get("Content-Length")
        if cl is None:
            raise PermanentError("HEAD answer without Content-Length")
        return int(cl)

    def put_bytes(self, name, data):
        raise read_only_error(self.object_url(name))

    def open_write(self, name):
        raise read_only_error(self.object_url(name))

    def delete(self, name):
        raise read_only_error(self.object_url(name))


__all__ = ["HTTPStore", "HTTPStatusError"]
