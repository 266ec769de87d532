"""The storage interface every backend implements, and the shared read machinery.

A *store* is a dataset's directory or object-store prefix. Objects are addressed by
name relative to it (``manifest.json``, ``shard-00000.pack``). Nothing here ever
lists a prefix: every object a dataset has is named by its manifest.

Backends implement a handful of single-attempt primitives (``_get_range``,
``_get_object``, ``_head`` ...). This module adds what they share: coalescing of
ranges into few requests, a thread pool to run them in parallel, retries, length
checks, the request counters, and fork/pickle safety (thread pools and network
clients are dropped when pickled and re-created lazily in the new process).
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Dict, List, Optional, Sequence, Tuple

from . import ranges as _ranges
from .retry import PermanentError, RetryPolicy, ShortReadError, is_transient

try:  # the lead's error hierarchy; fall back to OSError until it exists
    from packfmt.errors import RemoteError as _OSErrorBase
except Exception:  # pragma: no cover - only while packfmt.errors is being written
    _OSErrorBase = OSError


class RemoteReadError(_OSErrorBase):
    """A remote read or write failed for good (after retries), naming URL and byte range.

    An ``OSError`` (``errno`` is ``EIO`` unless the cause had one), so ``except OSError``
    catches it; never raised together with a partial result.
    """

    def __init__(self, message: str, url: str = "", byte_range: Optional[Tuple[int, int]] = None,
                 err: int = errno.EIO):
        OSError.__init__(self, err, message)
        self.url = url
        self.byte_range = byte_range

    def __str__(self):
        return self.strerror

    def __reduce__(self):
        return (type(self), (self.strerror, self.url, self.byte_range, self.errno))


class ObjectNotFoundError(RemoteReadError, FileNotFoundError):
    """The object does not exist (HTTP 404 / S3 NoSuchKey / no such file)."""

    def __init__(self, message: str, url: str = "", byte_range=None, err: int = errno.ENOENT):
        super().__init__(message, url, byte_range, err)


class _Abandoned(Exception):
    """Another range of the same call failed for good: this one stops retrying (not transient)."""


class StoreStats:
    """Counts every request a store makes, retries included (thread-safe).

    ``requests`` — requests sent; ``bytes`` — payload bytes received;
    ``bytes_sent`` — payload bytes uploaded; ``retries``; ``by_op`` — requests per
    operation (``GET``, ``GET_RANGE``, ``HEAD``, ``PUT``, ``UPLOAD_PART``, ``LIST`` ...).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with self._lock:
            self.requests = 0
            self.bytes = 0
            self.bytes_sent = 0
            self.retries = 0
            self.by_op: Counter = Counter()

    def count(self, op: str, received: int = 0, sent: int = 0):
        with self._lock:
            self.requests += 1
            self.bytes += received
            self.bytes_sent += sent
            self.by_op[op] += 1

    def add_bytes(self, received: int):
        with self._lock:
            self.bytes += received

    def retried(self):
        with self._lock:
            self.retries += 1

    def snapshot(self) -> Dict:
        with self._lock:
            return {"requests": self.requests, "bytes": self.bytes, "bytes_sent": self.bytes_sent,
                    "retries": self.retries, "by_op": dict(self.by_op)}

    def __repr__(self):
        return f"StoreStats({self.snapshot()})"

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._lock = threading.Lock()
        self.reset()


# storage_options understood by every backend; backends add their own.
COMMON_OPTIONS = {
    "retries": 10,               # attempts in total per request
    "backoff_base": 0.1,         # seconds; sleep uniform(0, min(cap, base * 2**k))
    "backoff_cap": 10.0,
    "threads": 16,               # parallel requests per store
    "max_gap": _ranges.DEFAULT_MAX_GAP,
    "max_request": _ranges.DEFAULT_MAX_REQUEST,
    "connect_timeout": 10.0,
    "read_timeout": 60.0,
}


def parse_options(options: Optional[dict], extra: dict, backend: str) -> dict:
    """Defaults + user options; unknown keys are an error (a typo must not pass silently)."""
    known = dict(COMMON_OPTIONS)
    known.update(extra)
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown storage_options for {backend}: {unknown}; known: {sorted(known)}")
    known.update(options)
    return known


_live_stores: "weakref.WeakSet[Store]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by some other thread at fork time would stay locked forever in the child.
    for store in list(_live_stores):
        store._lock = threading.Lock()
        store.stats._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ObjectWriter:
    """What every store's streaming writer shares: ``close()`` commits, ``abort()`` drops; as a context
    manager it commits when the block succeeds and aborts when it raises; one collected while still
    open is aborted (no half-written object, no orphan multipart upload)."""

    closed = True

    def close(self) -> None:  # pragma: no cover - every writer defines it
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - every writer defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if not getattr(self, "closed", True):
            try:
                self.abort()
            except Exception:
                pass


class Store:
    """Base class; see the module docstring and ``docs/remote.md``."""

    is_local = False
    scheme = ""

    def __init__(self, url: str, options: dict):
        self.url = url.rstrip("/") if not url.endswith(":///") else url
        self.options = options
        self.stats = StoreStats()
        self.retry = RetryPolicy(attempts=int(options["retries"]), base=float(options["backoff_base"]),
                                 cap=float(options["backoff_cap"]))
        self.threads = max(1, int(options["threads"]))
        self.max_gap = int(options["max_gap"])
        self.max_request = int(options["max_request"])
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_pid = -1
        self._lock = threading.Lock()
        _live_stores.add(self)

    # --- pickling / fork safety -------------------------------------------------------
    _transient_attrs = ("_pool", "_pool_pid", "_lock")

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in self._transient_attrs:
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool = None
        self._pool_pid = -1
        self._lock = threading.Lock()
        self._reset_clients()
        _live_stores.add(self)

    def _reset_clients(self):
        """Drop network clients (overridden); they are re-created on first use."""

    def _per_process(self, attr: str, make):
        """``self.<attr>``, made by ``make()`` once per process and kept with its pid in ``<attr>_pid``.

        Thread pools and network clients do not survive ``fork``: a child sees the parent's object
        with the parent's pid and makes its own. Double-checked under the store's lock."""
        pid = os.getpid()
        obj = getattr(self, attr)
        if obj is None or getattr(self, attr + "_pid") != pid:
            with self._lock:
                obj = getattr(self, attr)
                if obj is None or getattr(self, attr + "_pid") != pid:
                    obj = make()
                    setattr(self, attr, obj)
                    setattr(self, attr + "_pid", pid)
        return obj

    def _executor(self) -> ThreadPoolExecutor:
        return self._per_process(
            "_pool", lambda: ThreadPoolExecutor(self.threads, thread_name_prefix="packfmt-io"))

    def close(self):
        pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=False)

    def __repr__(self):
        return f"{type(self).__name__}({self.url!r})"

    # --- naming -------------------------------------------------------------------------
    def object_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def local_path(self, name: str) -> Optional[str]:
        return None

    # --- single-attempt primitives, implemented by backends -----------------------------
    def _get_range(self, name: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def _get_object(self, name: str) -> bytes:
        raise NotImplementedError

    def _head(self, name: str) -> Optional[int]:
        """Size of the object, or None if it does not exist."""
        raise NotImplementedError

    # --- the public interface -------------------------------------------------------------
    def _fail(self, exc: BaseException, name: str, what: str,
              byte_range: Optional[Tuple[int, int]] = None) -> RemoteReadError:
        url = self.object_url(name)
        if isinstance(exc, RemoteReadError):
            return exc
        where = ""
        if byte_range is not None and byte_range[1] > 0:
            where = f" bytes {byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"
        tries = f" after {self.retry.attempts} attempts" if is_transient(exc) else ""
        cause = exc.__cause__ if isinstance(exc, PermanentError) and exc.__cause__ else exc
        err = getattr(cause, "errno", None) if isinstance(cause, OSError) else None
        msg = f"{what} {url}{where} failed{tries}: {type(cause).__name__}: {cause}"
        return RemoteReadError(msg, url, byte_range, err or errno.EIO)

    def _retrying(self, fn, name, what, byte_range=None):
        try:
            return self.retry.call(fn, on_retry=lambda e: self.stats.retried())
        except ObjectNotFoundError:
            raise
        except Exception as exc:
            raise self._fail(exc, name, what, byte_range) from exc

    def read_bytes(self, name: str, size: Optional[int] = None, max_size: Optional[int] = None) -> bytes:
        """The whole object (manifest, index, dictionary).

        With ``size`` known (the manifest records the index's), a large object is fetched as
        parallel ranged GETs of ``max_request`` bytes, and a different size is an error.  With
        ``max_size``, an object larger than that is refused without being read whole.
        """
        if size is not None and size > self.max_request:
            return self.read_ranges(name, [(0, int(size))])[0]
        if max_size is not None:
            return self._retrying(lambda: self._get_object(name, max_size), name, "GET")
        data = self._retrying(lambda: self._get_object(name), name, "GET")
        if size is not None and len(data) != size:
            url = self.object_url(name)
            raise RemoteReadError(f"GET {url}: {len(data)} bytes, expected {size}", url, (0, size))
        return data

    def size(self, name: str) -> int:
        size = self._retrying(lambda: self._head(name), name, "HEAD")
        if size is None:
            raise ObjectNotFoundError(f"no such object: {self.object_url(name)}", self.object_url(name))
        return size

    def exists(self, name: str) -> bool:
        """One HEAD request (never a LIST)."""
        return self._retrying(lambda: self._head(name), name, "HEAD") is not None

    def _fetch_checked(self, name: str, offset: int, length: int, abandon=None) -> bytes:
        def attempt():
            if abandon is not None and abandon.is_set():
                raise _Abandoned()
            data = self._get_range(name, offset, length)
            if len(data) != length:
                raise ShortReadError(f"got {len(data)} bytes, expected {length}")
            return data
        return self._retrying(attempt, name, "GET", (offset, length))

    def read_ranges(self, name: str, ranges: Sequence[Tuple[int, int]], *, max_gap: Optional[int] = None,
                    max_request: Optional[int] = None) -> List[bytes]:
        """The bytes of every ``(offset, length)`` in ``ranges``, in the same order.

        Ranges are sorted and coalesced (``max_gap``, ``max_request``), fetched in
        parallel and retried; either every range is returned complete or
        :class:`RemoteReadError` is raised.
        """
        return self.read_ranges_multi([(name, ranges)], max_gap=max_gap, max_request=max_request)[0]

    def read_ranges_multi(self, requests: Sequence[Tuple[str, Sequence[Tuple[int, int]]]], *,
                          max_gap: Optional[int] = None, max_request: Optional[int] = None) -> List[List[bytes]]:
        """Like :meth:`read_ranges` for several objects at once, all in one parallel wave."""
        max_gap = self.max_gap if max_gap is None else int(max_gap)
        max_request = self.max_request if max_request is None else int(max_request)
        plans = [(name, _ranges.coalesce(rs, max_gap, max_request)) for name, rs in requests]
        jobs = []   # (plan index, request index, part offsets)
        for pi, (name, plan) in enumerate(plans):
            for ri, (off, n) in enumerate(plan.requests):
                for part in _ranges.split(off, n, max_request):
                    jobs.append((pi, ri, part))
        if not jobs:
            return [_ranges.assemble(plan, []) for _, plan in plans]
        if len(jobs) == 1:
            pi, ri, (off, n) = jobs[0]
            results = [self._fetch_checked(plans[pi][0], off, n)]
        else:
            pool = self._executor()
            abandon = threading.Event()
            futures = [pool.submit(self._fetch_checked, plans[pi][0], off, n, abandon)
                       for pi, ri, (off, n) in jobs]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:          # e.g. KeyboardInterrupt while waiting
                abandon.set()
                raise
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                # One range failed for good: stop the others retrying, and let none outlive this call.
                abandon.set()
                for f in futures:
                    f.cancel()
                wait(futures)
                raise failed[0].exception()
            results = [f.result() for f in futures]
        parts: Dict[Tuple[int, int], list] = {}
        for (pi, ri, _), data in zip(jobs, results):
            parts.setdefault((pi, ri), []).append(data)
        out = []
        for pi, (name, plan) in enumerate(plans):
            payloads = []
            for ri in range(len(plan.requests)):
                p = parts[(pi, ri)]
                payloads.append(p[0] if len(p) == 1 else b"".join(p))
            out.append(_ranges.assemble(plan, payloads))
        return out

    def put_bytes(self, name: str, data) -> None:
        raise NotImplementedError

    def open_write(self, name: str):
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError


def read_only_error(url: str) -> OSError:
    return RemoteReadError(f"{url} is read-only (http stores support reading only)", url,
                           None, errno.EROFS)


__all__ = ["Store", "StoreStats", "RemoteReadError", "ObjectNotFoundError", "PermanentError",
           "ShortReadError", "parse_options", "read_only_error"]
