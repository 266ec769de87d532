"""Local filesystem store: a directory. Writes are atomic (tmp file + fsync + rename)."""

from __future__ import annotations

import errno
import os
import uuid
from typing import List, Optional, Sequence, Tuple

from .base import ObjectNotFoundError, ObjectWriter, RemoteReadError, Store, parse_options


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalWriter(ObjectWriter):
    """Writes ``name`` through a temporary file in the same directory; ``close`` renames it in."""

    def __init__(self, path: str, stats=None):
        self.path = path
        self._stats = stats
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        self._tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        self._f = open(self._tmp, "wb")
        self.closed = False
        self.bytes_written = 0

    def write(self, data) -> int:
        n = self._f.write(data)
        self.bytes_written += n
        return n

    def tell(self) -> int:
        return self.bytes_written

    def close(self) -> None:
        """Commit: flush, fsync, rename over ``path``, fsync the directory."""
        if self.closed:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self.path)
            _fsync_dir(os.path.dirname(self.path) or ".")
            if self._stats is not None:
                self._stats.count("PUT", sent=self.bytes_written)
        except BaseException:
            self.abort()
            raise
        self.closed = True

    def abort(self) -> None:
        """Throw the partial file away; ``path`` is untouched."""
        if self.closed:
            return
        self.closed = True
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass


class LocalStore(Store):
    """A directory on a local (or network-mounted) filesystem.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> s = LocalStore(d); s.put_bytes("a.bin", b"hello"); s.read_ranges("a.bin", [(1, 3)])
    [b'ell']
    """

    is_local = True
    scheme = "file"

    def __init__(self, path: str, storage_options: Optional[dict] = None):
        options = parse_options(storage_options, {}, "local paths")
        self.root = os.path.abspath(os.path.expanduser(path))
        super().__init__(self.root, options)

    def object_url(self, name: str) -> str:
        return os.path.join(self.root, name)

    def local_path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _not_found(self, name: str) -> ObjectNotFoundError:
        p = self.local_path(name)
        return ObjectNotFoundError(f"no such file: {p}", p)

    def read_bytes(self, name: str, size: Optional[int] = None, max_size: Optional[int] = None) -> bytes:
        try:
            with open(self.local_path(name), "rb") as f:
                data = f.read() if max_size is None else f.read(max_size + 1)
        except FileNotFoundError:
            raise self._not_found(name) from None
        if max_size is not None and len(data) > max_size:
            p = self.local_path(name)
            raise RemoteReadError(f"{p} is larger than the {max_size}-byte limit", p, None, errno.EFBIG)
        if size is not None and len(data) != size:
            p = self.local_path(name)
            raise RemoteReadError(f"read {p}: {len(data)} bytes, expected {size}", p, (0, size), errno.EIO)
        self.stats.count("GET", received=len(data))
        return data

    def size(self, name: str) -> int:
        try:
            return os.stat(self.local_path(name)).st_size
        except FileNotFoundError:
            raise self._not_found(name) from None

    def exists(self, name: str) -> bool:
        return os.path.exists(self.local_path(name))

    def read_ranges(self, name: str, ranges: Sequence[Tuple[int, int]], **_plan) -> List[bytes]:
        path = self.local_path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._not_found(name) from None
        out = []
        try:
            for off, n in ranges:
                off, n = int(off), int(n)
                if off < 0 or n < 0:
                    raise ValueError(f"invalid byte range (offset={off}, length={n})")
                chunks, got = [], 0
                while got < n:
                    b = os.pread(fd, n - got, off + got)
                    if not b:
                        break
                    chunks.append(b)
                    got += len(b)
                if got != n:
                    raise RemoteReadError(
                        f"read {path} bytes {off}-{off + n - 1} failed: file ends after {got} of {n} bytes",
                        path, (off, n), errno.EIO)
                self.stats.count("GET_RANGE", received=n)
                out.append(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        finally:
            os.close(fd)
        return out

    def read_ranges_multi(self, requests, **_plan):
        return [self.read_ranges(name, rs) for name, rs in requests]

    def put_bytes(self, name: str, data) -> None:
        with self.open_write(name) as w:
            w.write(data)

    def open_write(self, name: str) -> LocalWriter:
        return LocalWriter(self.local_path(name), self.stats)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.local_path(name))
        except FileNotFoundError:
            pass
