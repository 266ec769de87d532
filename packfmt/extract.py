"""``pack extract``: restore the packed tree, never writing outside the output directory.

Every key is checked before anything is written: it must be a relative path whose components are not
empty, ``.`` or ``..`` and hold no NUL.  Files are then created through directory file descriptors
opened with ``O_NOFOLLOW``, so a symlink already inside OUTDIR (or planted by another process while we
run) cannot redirect a write outside it: opening through a symlink fails and the key is refused.
"""

from __future__ import annotations

import errno
import os
import stat

import numpy as np

from packfmt.errors import UnsafeKeyError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


#: Keys longer than this (UTF-8 bytes) or deeper than MAX_DEPTH are refused: the writer never makes them.
MAX_KEY_BYTES = 4096
MAX_DEPTH = 255


def key_parts(key: str) -> list:
    """Split a key into path components, refusing anything that could leave the output directory."""
    if not key or "\x00" in key:
        raise UnsafeKeyError(f"refusing key {key[:80]!r}: empty or contains NUL")
    if len(key) > MAX_KEY_BYTES or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise UnsafeKeyError(f"refusing key {key[:80]!r}...: longer than {MAX_KEY_BYTES} bytes")
    if key.count("/") >= MAX_DEPTH:
        raise UnsafeKeyError(f"refusing key {key[:80]!r}...: deeper than {MAX_DEPTH} directories")
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
        """The fd of directory parts (relative to the root), creating it; never through a symlink."""
        depth = len(parts)
        while depth > 0 and parts[:depth] not in self._fds:
            depth -= 1
        fd = self._fds[parts[:depth]]
        for i in range(depth, len(parts)):
            name = parts[i]
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeKeyError(f"refusing key {key!r}: {'/'.join(parts[:i + 1])} in the output directory "
                                         "is a symlink or not a directory") from None
                raise
            self._fds[parts[:i + 1]] = fd
        return fd

    def write(self, key: str, parts: list, data: bytes) -> None:
        """Write to a new temporary file, then rename it over the key's name: an existing file, symlink
        or hard link at that name is replaced, never written through."""
        parent = self.dir_fd(tuple(parts[:-1]), key)
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UnsafeKeyError(f"refusing key {key!r}: the output path is a symlink")
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UnsafeKeyError(f"refusing key {key!r}: the output path is a directory")
        tmp = f".{name[:200]}.packfmt-{os.getpid()}.tmp"
        fd = os.open(tmp, _TMP_FLAGS, 0o644, dir_fd=parent)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=parent)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)

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
