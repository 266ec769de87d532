"""The interface every peer adapter implements, and what they share.

A *system* is built from a directory tree of small files into ``out`` and then read back by **global
index**: sample ``i`` is the file ``rels[i]``, where ``rels`` is the sorted list of the tree's relative
paths.  Every adapter writes samples in that order, so index ``i`` means the same bytes everywhere,
and the harness can check any answer against ``open(rels[i]).read()``.

An adapter is a module exposing ``ADAPTER``, an instance of a subclass of :class:`Adapter`.  Reading
goes through a :class:`Reader` returned by ``Adapter.open``.  Optional capabilities (batched gets, a
torch Dataset) are ``None``/``False`` when the system does not offer them, and the harness prints
"n/a" rather than timing a stand-in.

``location`` is where the built data lives; adapters read ``"local"`` data.  The remote comparison
(remote_run.py) builds with these adapters, uploads what they wrote, and reads it back through each
system's own S3 support in remote_worker.py, which knows how each system takes an ``s3://`` URL.
"""

from __future__ import annotations

import os


def identity_collate(batch):
    """DataLoader collate that keeps a batch as a list (of bytes): no tensor conversion is timed."""
    return batch


class Reader:
    """An opened system.  ``get`` is mandatory; the rest default to "not offered"."""

    def get(self, i: int) -> bytes:
        raise NotImplementedError

    #: ``get_batch(indices) -> list[bytes]`` in the order asked, or None when the system has no batch API.
    get_batch = None

    def iter_all(self):
        """Every sample in global order, using the system's natural sequential reader."""
        for i in range(self.n):
            yield self.get(i)

    def loader(self, batch_size: int, num_workers: int, seed: int):
        """A shuffled torch DataLoader (or the system's own loader) yielding lists of bytes, or None."""
        return None

    def close(self) -> None:
        pass


class Adapter:
    name = "?"
    #: pip distributions needed (reported when an import fails).
    requires: tuple = ()
    #: Build settings that this system offers: "none" always, "zstd" when it can compress.
    compressions: tuple = ("none",)
    #: What kind of thing it is (shown in the table).
    kind = ""
    #: How its DataLoader epoch is done: "" (no torch Dataset offered), or a short description.
    loader_kind = ""
    locations: tuple = ("local",)

    def available(self) -> str | None:
        """None when importable, else the reason (shown as "not installed: ...")."""
        try:
            self._import()
        except Exception as e:  # noqa: BLE001 - any import failure means "cannot run here"
            return f"{type(e).__name__}: {e}"
        return None

    def _import(self):
        raise NotImplementedError

    def build(self, src: str, rels: list, out: str, compression: str) -> None:
        raise NotImplementedError

    def open(self, out: str, rels: list) -> Reader:
        """Open what build() wrote; rels (the sorted relative paths) is only for systems without an index."""
        raise NotImplementedError

    def files(self, out: str) -> list:
        """Every file the built system consists of (for warming the page cache and for its size)."""
        res = []
        for dirpath, _, names in os.walk(out):
            for nm in sorted(names):
                res.append(os.path.join(dirpath, nm))
        return sorted(res)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
