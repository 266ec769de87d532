"""S3 (and S3-compatible) store on boto3.

Credentials come from boto3's standard chain (environment, shared config/credentials
files, SSO, instance/container roles); ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
select an S3-compatible endpoint, as in the AWS CLI. ``storage_options`` override:
``endpoint_url``, ``region_name``, ``aws_access_key_id``, ``aws_secret_access_key``,
``aws_session_token``, ``profile_name``, ``addressing_style``, ``anon`` (unsigned
requests to public buckets), ``verify``, ``part_size``, ``max_inflight_parts`` plus the
common ones of :mod:`packfmt.storage.base` (retries, threads, max_gap, max_request ...).

botocore's own retries are off: :mod:`packfmt.storage.retry` retries every request
(exponential backoff, full jitter) so that the counters in ``store.stats`` see every
attempt, and a short body is caught and retried rather than returned.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .base import ObjectNotFoundError, ObjectWriter, PermanentError, RemoteReadError, Store, parse_options
from .retry import ShortReadError

S3_OPTIONS = {
    "endpoint_url": None,
    "region_name": None,
    "aws_access_key_id": None,
    "aws_secret_access_key": None,
    "aws_session_token": None,
    "profile_name": None,
    "addressing_style": None,     # "path" | "virtual" | "auto"; default "path" with a custom endpoint
    "anon": False,
    "verify": None,               # TLS verification: bool or CA bundle path
    "part_size": 8 << 20,         # multipart part size (S3 minimum 5 MiB)
    "max_inflight_parts": 4,      # parts uploading at once per writer (bounds memory)
}

MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10000

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _error_code(exc) -> str:
    try:
        return str(exc.response.get("Error", {}).get("Code", ""))
    except AttributeError:
        return ""


def _status(exc) -> Optional[int]:
    try:
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    except AttributeError:
        return None


def _is_not_found(exc) -> bool:
    return _error_code(exc) in ("NoSuchKey", "404", "NotFound") or _status(exc) == 404


def _permanent(exc) -> bool:
    """Client errors that no retry can fix (auth, missing bucket, bad range)."""
    status = _status(exc)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def parse_s3_url(url: str):
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// url: {url!r}")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 url without a bucket: {url!r}")
    return bucket, prefix.strip("/")


_sessions: dict = {}
_sessions_lock = threading.Lock()


def _reset_sessions_lock():
    global _sessions_lock
    _sessions_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_sessions_lock)


def _session(o: dict):
    """One boto3 session per set of credentials, per interpreter, kept across fork.

    Creating a client is mostly loading botocore's service model (~0.4 s); a session caches it, so a
    DataLoader worker forked from a parent that already used S3 creates its client in milliseconds.
    Sessions hold no connections (clients do, and those are never shared across processes).
    """
    import boto3
    key = tuple(o[k] for k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                               "region_name", "profile_name"))
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = boto3.session.Session(
                aws_access_key_id=o["aws_access_key_id"], aws_secret_access_key=o["aws_secret_access_key"],
                aws_session_token=o["aws_session_token"], region_name=o["region_name"],
                profile_name=o["profile_name"])
            _sessions[key] = session
        return session


class S3Store(Store):
    """``s3://bucket/prefix``; see the module docstring for options."""

    scheme = "s3"
    _transient_attrs = Store._transient_attrs + ("_client", "_client_pid", "_upool", "_upool_pid")

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        options = parse_options(storage_options, S3_OPTIONS, "s3://")
        if int(options["part_size"]) < MIN_PART_SIZE:
            raise ValueError(f"part_size must be >= {MIN_PART_SIZE} bytes (S3 minimum part size)")
        self.bucket, self.prefix = parse_s3_url(url)
        super().__init__(f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}",
                         options)
        self._reset_clients()

    # --- clients (lazy, per process) ----------------------------------------------------
    def _reset_clients(self):
        self._client = None
        self._client_pid = -1
        self._upool = None
        self._upool_pid = -1

    @property
    def client(self):
        return self._per_process("_client", self._make_client)

    def _make_client(self):
        import boto3
        import botocore
        from botocore.config import Config

        o = self.options
        session = _session(o)
        endpoint = o["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        style = o["addressing_style"] or ("path" if endpoint else "auto")
        cfg = dict(
            retries={"total_max_attempts": 1, "mode": "standard"},   # ours, in retry.py
            max_pool_connections=self.threads + int(o["max_inflight_parts"]) + 4,
            connect_timeout=float(o["connect_timeout"]), read_timeout=float(o["read_timeout"]),
            s3={"addressing_style": style},
            tcp_keepalive=True,
        )
        if o["anon"]:
            cfg["signature_version"] = botocore.UNSIGNED
        try:  # botocore >= 1.36: no trailing checksums unless required (S3-compatible stores)
            config = Config(request_checksum_calculation="when_required",
                            response_checksum_validation="when_required", **cfg)
        except TypeError:  # pragma: no cover - older botocore
            config = Config(**cfg)
        kwargs = {"config": config}
        if o["endpoint_url"]:
            kwargs["endpoint_url"] = o["endpoint_url"]
        if o["verify"] is not None:
            kwargs["verify"] = o["verify"]
        with _sessions_lock:                  # boto3 sessions are not thread-safe
            return session.client("s3", **kwargs)

    def _upload_executor(self) -> ThreadPoolExecutor:
        return self._per_process("_upool", lambda: ThreadPoolExecutor(
            max(1, int(self.options["max_inflight_parts"])), thread_name_prefix="packfmt-upload"))

    # --- naming ---------------------------------------------------------------------------
    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def object_url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    # --- single attempts --------------------------------------------------------------------
    def _call(self, op: str, name: str, fn, **kwargs):
        """One request; S3 errors classified into not-found / permanent / transient."""
        from botocore.exceptions import ClientError

        self.stats.count(op, sent=int(kwargs.pop("_sent", 0)))
        try:
            return fn(Bucket=self.bucket, Key=self.key(name), **kwargs)
        except ClientError as exc:
            if _is_not_found(exc) and op in ("GET", "GET_RANGE", "HEAD", "DELETE", "ABORT_MULTIPART"):
                url = self.object_url(name)
                raise ObjectNotFoundError(f"no such object: {url}", url) from exc
            if _permanent(exc):
                raise PermanentError(str(exc)) from exc
            raise

    def _read_body(self, resp, expected: Optional[int]) -> bytes:
        body = resp["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        self.stats.add_bytes(len(data))
        if expected is not None and len(data) != expected:
            raise ShortReadError(f"body has {len(data)} bytes, expected {expected}")
        return data

    def _get_range(self, name: str, offset: int, length: int) -> bytes:
        end = offset + length - 1
        resp = self._call("GET_RANGE", name, self.client.get_object, Range=f"bytes={offset}-{end}")
        m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
        if m is None:
            raise ShortReadError(f"no Content-Range in the answer to a ranged GET "
                                 f"(got {resp.get('ContentRange')!r})")
        start, stop, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if start != offset or stop != end:
            if total != "*" and offset + length > int(total):
                raise PermanentError(f"range beyond the end of the object (size {total})")
            raise ShortReadError(f"server answered bytes {start}-{stop}")
        if resp.get("ContentLength") not in (None, length):
            raise ShortReadError(f"Content-Length {resp.get('ContentLength')}, expected {length}")
        return self._read_body(resp, length)

    def _get_object(self, name: str, max_size: Optional[int] = None) -> bytes:
        resp = self._call("GET", name, self.client.get_object)
        if max_size is not None:
            cl = resp.get("ContentLength")
            body = resp["Body"]
            try:
                if cl is not None and cl > max_size:
                    raise PermanentError(f"object of {cl} bytes is larger than the {max_size}-byte limit")
                data = body.read(max_size + 1)
            finally:
                body.close()
            if len(data) > max_size:
                raise PermanentError(f"object is larger than the {max_size}-byte limit")
            self.stats.add_bytes(len(data))
            if cl is not None and len(data) != cl:
                raise ShortReadError(f"body has {len(data)} bytes, expected {cl}")
            return data
        return self._read_body(resp, resp.get("ContentLength"))

    def _head(self, name: str) -> Optional[int]:
        try:
            resp = self._call("HEAD", name, self.client.head_object)
        except ObjectNotFoundError:
            return None
        return int(resp["ContentLength"])

    # --- writing ------------------------------------------------------------------------------
    def put_bytes(self, name: str, data) -> None:
        """One PUT (the object appears whole or not at all)."""
        data = bytes(data)
        self._retrying(lambda: self._call("PUT", name, self.client.put_object, Body=data,
                                          ContentLength=len(data), _sent=len(data)),
                       name, "PUT")

    def open_write(self, name: str) -> "S3Writer":
        return S3Writer(self, name, int(self.options["part_size"]), int(self.options["max_inflight_parts"]))

    def delete(self, name: str) -> None:
        self._retrying(lambda: self._call("DELETE", name, self.client.delete_object), name, "DELETE")


_live_writers: "weakref.WeakSet[S3Writer]" = weakref.WeakSet()


@atexit.register
def _abort_unfinished_uploads():  # pragma: no cover - exercised by a subprocess test
    for w in list(_live_writers):
        try:
            w.abort()
        except Exception:
            pass


class S3Writer(ObjectWriter):
    """Streams one object to S3 as a multipart upload while the caller writes.

    Every ``part_size`` bytes written become one UploadPart sent by a background
    thread; at most ``max_inflight_parts`` are in flight (``write`` blocks beyond that,
    which bounds memory). ``close()`` uploads the tail and completes the upload;
    ``abort()`` (or an exception inside ``with``, or interpreter exit without close)
    waits for in-flight parts and aborts the upload, so no orphan parts remain.
    An object smaller than one part is sent as a single PUT.
    """

    def __init__(self, store: S3Store, name: str, part_size: int, max_inflight: int):
        self.store = store
        self.name = name
        self.url = store.object_url(name)
        self.part_size = part_size
        self._buf = bytearray()
        self._sem = threading.BoundedSemaphore(max(1, max_inflight))
        self._futures = []            # (part number, future -> etag)
        self._upload_id: Optional[str] = None
        self._error: Optional[BaseException] = None
        self.closed = False
        self.bytes_written = 0
        self.parts_uploaded = 0
        _live_writers.add(self)

    @property
    def upload_id(self) -> Optional[str]:
        return self._upload_id

    def tell(self) -> int:
        return self.bytes_written

    def write(self, data) -> int:
        if self.closed:
            raise ValueError(f"write to a closed writer ({self.url})")
        self._raise_background_error()
        n = len(memoryview(data).cast("B")) if not isinstance(data, (bytes, bytearray)) else len(data)
        self._buf += data
        self.bytes_written += n
        if len(self._buf) >= self.part_size:
            mv = memoryview(self._buf)
            cut = 0
            try:
                while len(self._buf) - cut >= self.part_size:
                    self._submit(bytes(mv[cut:cut + self.part_size]))
                    cut += self.part_size
            finally:
                mv.release()
                del self._buf[:cut]
        return n

    def _raise_background_error(self):
        if self._error is not None:
            err = self._error
            self.abort()
            raise err

    def _submit(self, part: bytes):
        st = self.store
        if self._upload_id is None:
            resp = st._retrying(lambda: st._call("CREATE_MULTIPART", self.name,
                                                 st.client.create_multipart_upload),
                                self.name, "CreateMultipartUpload")
            self._upload_id = resp["UploadId"]
        number = len(self._futures) + 1
        if number > MAX_PARTS:
            raise RemoteReadError(f"upload to {self.url}: more than {MAX_PARTS} parts; "
                                  f"raise storage_options part_size (now {self.part_size})", self.url)
        # Back-pressure: wait for a slot, noticing failures of earlier parts meanwhile.
        while not self._sem.acquire(timeout=0.5):
            self._raise_background_error()
        self._raise_background_error()
        try:
            fut = st._upload_executor().submit(self._upload_part, number, part)
        except BaseException:
            self._sem.release()
            raise
        self._futures.append((number, fut))

    def _upload_part(self, number: int, part: bytes) -> str:
        st = self.store
        try:
            resp = st._retrying(
                lambda: st._call("UPLOAD_PART", self.name, st.client.upload_part, UploadId=self._upload_id,
                                 PartNumber=number, Body=part, ContentLength=len(part), _sent=len(part)),
                self.name, f"UploadPart {number} of")
            self.parts_uploaded += 1
            return resp["ETag"]
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            raise
        finally:
            self._sem.release()

    def close(self) -> None:
        """Commit: upload the rest, complete the multipart upload (or one PUT if small)."""
        if self.closed:
            return
        try:
            self._raise_background_error()
            if self._upload_id is None:
                self.store.put_bytes(self.name, bytes(self._buf))
            else:
                if self._buf:
                    self._submit(bytes(self._buf))
                parts = [{"PartNumber": n, "ETag": f.result()} for n, f in self._futures]
                self._complete(parts)
            self._buf = bytearray()
            self.closed = True
            _live_writers.discard(self)
        except BaseException:
            self.abort()
            raise

    def _complete(self, parts):
        st = self.store
        attempts = [0]

        def attempt():
            attempts[0] += 1
            try:
                return st._call("COMPLETE_MULTIPART", self.name, st.client.complete_multipart_upload,
                                UploadId=self._upload_id, MultipartUpload={"Parts": parts})
            except Exception as exc:
                # A retry after a lost answer may find the upload already completed.
                if attempts[0] > 1 and _error_code(getattr(exc, "__cause__", None) or exc) == "NoSuchUpload":
                    size = st._head(self.name)
                    if size == self.bytes_written:
                        return None
                raise
        st._retrying(attempt, self.name, "CompleteMultipartUpload")
        self._upload_id = None

    def abort(self) -> None:
        """Discard everything: no object, no multipart upload, no orphan parts."""
        if self.closed:
            return
        self.closed = True
        _live_writers.discard(self)
        for _, f in self._futures:
            f.cancel()
        for _, f in self._futures:     # a part still uploading would outlive an early abort
            try:
                f.result()
            except BaseException:
                pass
        self._buf = bytearray()
        if self._upload_id is not None:
            st, upload_id = self.store, self._upload_id
            try:
                st._retrying(lambda: st._call("ABORT_MULTIPART", self.name, st.client.abort_multipart_upload,
                                              UploadId=upload_id), self.name, "AbortMultipartUpload")
            except ObjectNotFoundError:   # NoSuchUpload: already gone
                pass
            self._upload_id = None


__all__ = ["S3Store", "S3Writer", "parse_s3_url"]
