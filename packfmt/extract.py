"""``pack extract``: restore the packed tree, never writing outside the output directory.

Every key is checked before anything is written: it must be a relative path whose components are not
empty, ``.`` or ``..`` and hold no NUL.  Files are then created through directory file descriptors
opened with ``O_NOFOLLOW``, so a symlink already inside OUTDIR (or planted by another process while we
run) cannot redirect a write outside it: opening through a symlink fails and the key is refused.
"""

from __future__ import annotations

import errno
import os

import numpy as np

from packfmt.errors import UnsafeKeyError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def key_parts(key: str) -> list:
    """Split a key into path components, refusing anything that could leave the output directory."""
    if not key or "\x00" in key:
        raise UnsafeKeyError(f"refusing key {key[:80]!r}: empty or contains NUL")
    if key.startswith("/"):
        raise UnsafeKeyError(f"refusing key {key[:80]!r}: absolute path")
    parts = key.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise UnsafeKeyError(f"refusing key {key[:80]!r}: component {p!r} is not allowed")
        if len(p.encode("utf-8", "surrogatepass")) > 255:
            raise UnsafeKeyError(f"refusing key {key[:80]!r}...: a path component is longer than 255 bytes")
    return parts


class _Tree:
    """Directory fds under the output root, opened without following symlinks."""

    def __init__(self, root: str):
        os.makedirs(root, exist_ok=True)
        self.root = root
        self._fds = {(): os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}

    def dir_fd(self, parts: tuple, key: str) -> int:
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        parent = self.dir_fd(parts[:-1], key)
        name = parts[-1]
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeKeyError(f"refusing key {key!r}: {'/'.join(parts)} in the output directory is a "
                                     "symlink or not a directory") from None
            raise
        self._fds[parts] = fd
        return fd

    def write(self, key: str, parts: list, data: bytes) -> None:
        parent = self.dir_fd(tuple(parts[:-1]), key)
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, 0o644, dir_fd=parent)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeKeyError(f"refusing key {key!r}: the output path is a symlink") from None
            if e.errno == errno.EISDIR:
                raise UnsafeKeyError(f"refusing key {key!r}: the output path is a directory") from None
            raise
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def extract(ds, outdir, indices=None, progress=None, batch_size: int = 256) -> int:
    """Write samples (default: all) under outdir as files named by their keys; returns the count."""
    rows = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
    keys = ds.keys.to_pylist() if indices is None else [ds.key(i) for i in rows.tolist()]
    parts = [key_parts(k) for k in keys]  # refuse before writing anything
    tree = _Tree(os.fspath(outdir))
    try:
        for start in range(0, len(rows), batch_size):
            batch = ds.get_batch(rows[start:start + batch_size])
            for j, data in enumerate(batch):
                tree.write(keys[start + j], parts[start + j], data)
            if progress is not None:
                progress(len(batch), sum(map(len, batch)))
    finally:
        tree.close()
    return len(rows)
