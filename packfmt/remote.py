"""Fetching the stored bytes of a batch of records from remote shards.

The dataset layer knows, for every sample, its shard, offset and stored length (from
the index). :class:`RemoteReader` turns a batch of those into few requests: grouped
by shard, sorted, neighbours coalesced, fetched in parallel and retried — through
the node-local page cache when there is one, so that a block is fetched once for
every process on the node. It returns the stored bytes in request order; the caller
verifies checksums and decompresses.

>>> import numpy as np, tempfile
>>> from packfmt.storage import open_store
>>> store = open_store(tempfile.mkdtemp()); store.put_bytes("s0", b"0123456789")
>>> r = RemoteReader(store, "ns", ["s0"], [10], cache=None)
>>> r.read(np.array([0, 0]), np.array([7, 1]), np.array([2, 3]))
[b'78', b'123']
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np

from .storage import open_store
from .storage.base import Store


_live_readers: "weakref.WeakSet[RemoteReader]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for r in list(_live_readers):
        r._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RemoteReader:
    """Reads ``(shard, offset, length)`` triples from ``store``; see the module docstring.

    ``namespace`` keys the page cache and must identify the dataset's *content*
    (e.g. the manifest checksum), so that a dataset rewritten at the same URL never
    serves stale bytes. ``max_gap``/``max_request`` default to the store's options;
    ``threads`` bounds the shards fetched at once through the cache.
    Picklable: network clients and thread pools are re-created in the new process.
    """

    def __init__(self, store, namespace: str, shard_names: Sequence[str], shard_sizes: Sequence[int],
                 cache=None, max_gap: Optional[int] = None, max_request: Optional[int] = None,
                 threads: Optional[int] = None):
        self.store: Store = open_store(store)
        if len(shard_names) != len(shard_sizes):
            raise ValueError("shard_names and shard_sizes differ in length")
        self.namespace = str(namespace)
        self.shard_names = list(shard_names)
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.cache = cache
        self.max_gap = self.store.max_gap if max_gap is None else int(max_gap)
        self.max_request = self.store.max_request if max_request is None else int(max_request)
        self.threads = self.store.threads if threads is None else max(1, int(threads))
        self._pool = None
        self._pool_pid = -1
        self._lock = threading.Lock()
        self._missed_last = True
        _live_readers.add(self)

    @property
    def stats(self):
        return self.store.stats

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_pool_pid"] = -1
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _live_readers.add(self)

    def _executor(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:
            with self._lock:
                if self._pool is None or self._pool_pid != pid:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="packfmt-shard")
                    self._pool_pid = pid
        return self._pool

    def _fetch(self, name: str, ranges):
        """The cache's miss handler: ranged reads of one shard."""
        return self.store.read_ranges(name, list(ranges), max_gap=self.max_gap, max_request=self.max_request)

    def _read_shard_cached(self, shard: int, ranges, missed=None):
        name = self.shard_names[shard]

        def fetch(rs):
            if missed is not None:
                missed.append(name)
            return self._fetch(name, rs)
        return self.cache.read(self.namespace, name, int(self.shard_sizes[shard]), ranges, fetch=fetch)

    def _read_cached(self, shards, range_lists):
        """Shards served from the cache are read inline (a thread hop costs more than a hit); from the
        first shard that needed a fetch on, the remaining shards are read in parallel."""
        results = []
        missed: list = []
        k = 0
        if not self._missed_last:       # after a batch with misses, expect more: all in parallel
            while k < len(shards) and not missed:
                results.append(self._read_shard_cached(shards[k], range_lists[k], missed))
                k += 1
        if k < len(shards):
            pool = self._executor()
            futures = [pool.submit(self._read_shard_cached, s, rs, missed)
                       for s, rs in zip(shards[k:], range_lists[k:])]
            try:
                results += [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        self._missed_last = bool(missed)
        return results

    def read(self, shard_ids, offsets, lengths) -> List:
        """Stored bytes of record ``i`` = shard ``shard_ids[i]``, bytes ``offsets[i]`` .. ``+lengths[i]``.

        Results are in request order (repeats allowed). Either all are returned, whole,
        or an ``OSError`` (:class:`packfmt.storage.RemoteReadError`) is raised.
        """
        shard_ids = np.asarray(shard_ids, dtype=np.int64).reshape(-1)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        n = len(shard_ids)
        if not (len(offsets) == n and len(lengths) == n):
            raise ValueError("shard_ids, offsets and lengths differ in length")
        if n == 0:
            return []
        if shard_ids.min() < 0 or shard_ids.max() >= len(self.shard_names):
            raise IndexError(f"shard id out of range 0..{len(self.shard_names) - 1}")
        if offsets.min() < 0 or lengths.min() < 0:
            raise ValueError("negative offset or length")
        over = offsets + lengths > self.shard_sizes[shard_ids]
        if over.any():
            i = int(np.argmax(over))
            raise ValueError(f"record {i} (bytes {offsets[i]}..{offsets[i] + lengths[i]}) lies beyond the end of "
                             f"{self.shard_names[shard_ids[i]]} ({self.shard_sizes[shard_ids[i]]} bytes)")

        order = np.argsort(shard_ids, kind="stable")
        sorted_ids = shard_ids[order]
        starts = [0] + (np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1).tolist() + [n]
        shards = sorted_ids[starts[:-1]].tolist()
        ranges = list(zip(offsets[order].tolist(), lengths[order].tolist()))
        range_lists = [ranges[a:b] for a, b in zip(starts, starts[1:])]

        if self.cache is None:
            results = self.store.read_ranges_multi(
                [(self.shard_names[s], rs) for s, rs in zip(shards, range_lists)],
                max_gap=self.max_gap, max_request=self.max_request)
        else:
            results = self._read_cached(shards, range_lists)

        flat = []
        for rs, res in zip(range_lists, results):
            if len(res) != len(rs):
                raise AssertionError(f"fetch returned {len(res)} pieces for {len(rs)} ranges")
            flat.extend(res)
        out: list = [None] * n
        for i, data in zip(order.tolist(), flat):
            out[i] = data
        return out

    def close(self):
        pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=False)


__all__ = ["RemoteReader"]
