"""The node-local page cache: remote bytes kept on local disk in fixed-size blocks, shared by every
process of the node (DataLoader workers, several ranks), fetched once however many want them.

>>> import tempfile
>>> pc = PageCache(tempfile.mkdtemp(), capacity="64MiB", block_size=1 << 20)
>>> blob = bytes(range(256)) * 10_000                      # a 2.5 MB "remote object"
>>> fetch = lambda ranges: [blob[o:o + n] for o, n in ranges]
>>> [bytes(b) for b in pc.read("manifest-sha", "shard-0", len(blob), [(5, 3), (1 << 20, 2)], fetch)]
[b'\\x05\\x06\\x07', b'\\x00\\x01']
>>> pc.stats()["blocks"]
2

The design, the guarantees and the files on disk are described in docs/cache.md.  The heavy lifting
(locks, eviction, checksums, crash recovery) is in src_c/pagecache.c; this module turns byte ranges
into blocks, calls the fetch callback once per round for every block it claimed, and waits (GIL
released) for blocks that another process is fetching.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["PageCache", "default_cache_dir", "register_cli"]

ENV_DIR = "PACKFMT_CACHE_DIR"
ENV_CAPACITY = "PACKFMT_CACHE_CAPACITY"
DEFAULT_CAPACITY = 10 << 30
DEFAULT_BLOCK_SIZE = 4 << 20
WAIT_SLICE_MS = 200  # waits return to Python this often, so Ctrl-C and signal handlers still work

Range = Tuple[int, int]
Fetch = Callable[[List[Range]], Sequence[Union[bytes, bytearray, memoryview]]]


def _core():
    from packfmt import _core
    return _core


def default_cache_dir() -> str:
    """``$PACKFMT_CACHE_DIR``, else ``$XDG_CACHE_HOME/packfmt``, else ``~/.cache/packfmt``."""
    d = os.environ.get(ENV_DIR)
    if d:
        return os.path.abspath(os.path.expanduser(d))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "packfmt"))


def _parse_size(value) -> int:
    from packfmt.writer import parse_size
    return parse_size(value)


class PageCache:
    """A handle on the shared page cache in ``directory`` (default: :func:`default_cache_dir`).

    ``capacity`` is the budget in bytes (or ``"10GiB"``) for everything the cache keeps on disk;
    ``block_size`` (1-8 MiB recommended; any multiple of 4 KiB from 64 KiB to 16 MiB) the unit of
    fetching and eviction.  Leaving both out adopts an existing cache's settings (else 10 GiB /
    4 MiB, or ``$PACKFMT_CACHE_CAPACITY``).  A cache that other processes have open keeps the
    settings it was created with; :meth:`stats` tells which are in force.

    Thread-safe, fork-safe, and picklable (the copy re-opens the cache lazily where it lands).
    """

    def __init__(self, directory: Optional[str] = None, capacity: Union[int, str, None] = None,
                 block_size: Optional[int] = None):
        self.directory = os.path.abspath(os.path.expanduser(directory)) if directory else default_cache_dir()
        self._capacity_arg = capacity
        self._block_size_arg = block_size
        self._adopt = capacity is None and block_size is None
        if capacity is None:
            capacity = os.environ.get(ENV_CAPACITY) or DEFAULT_CAPACITY
        self._capacity = _parse_size(capacity)
        self._block_size = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
        core = _core()
        if not (core.PAGECACHE_MIN_BLOCK <= self._block_size <= core.PAGECACHE_MAX_BLOCK
                and self._block_size % core.PAGECACHE_CHUNK == 0):
            raise ValueError(f"block_size must be a multiple of {core.PAGECACHE_CHUNK} between "
                             f"{core.PAGECACHE_MIN_BLOCK} and {core.PAGECACHE_MAX_BLOCK}, got {block_size!r}")
        self._handle = None
        self._local = dict(hits=0, misses=0, fetched_bytes=0, fetch_calls=0, waits=0, uncached=0)

    # -- lifetime ---------------------------------------------------------------------------------

    def _h(self):
        h = self._handle
        if h is None:
            os.makedirs(self.directory, exist_ok=True)
            capacity = self._capacity
            if self._capacity_arg is None and ENV_CAPACITY not in os.environ and \
                    not os.path.exists(os.path.join(self.directory, "pagecache.index")):
                # Creating with the default budget: never plan for more than half the free space.
                st = os.statvfs(self.directory)
                capacity = max(min(capacity, st.f_bavail * st.f_frsize // 2), 64 << 20)
            h = _core().PageCacheHandle(self.directory, capacity, self._block_size, self._adopt)
            if self._handle is None:  # another thread may have opened it meanwhile
                self._handle = h
            else:
                h.close()
                h = self._handle
        return h

    def close(self) -> None:
        """Release the mapping and files (also done when the object is collected)."""
        h, self._handle = self._handle, None
        if h is not None:
            h.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        return dict(directory=self.directory, capacity=self._capacity_arg, block_size=self._block_size_arg)

    def __setstate__(self, state):
        self.__init__(state["directory"], state["capacity"], state["block_size"])

    def __repr__(self):
        return f"PageCache({self.directory!r}, capacity={self._capacity}, block_size={self._block_size})"

    @property
    def block_size(self) -> int:
        """The block size in force (an existing cache's own, if it was adopted)."""
        return int(self._h().block_size)

    @property
    def capacity(self) -> int:
        return int(self._h().capacity)

    # -- reading ----------------------------------------------------------------------------------

    def read(self, namespace: str, object_name: str, object_size: int, ranges: Sequence[Range],
             fetch: Fetch) -> List[Union[bytes, memoryview]]:
        """The bytes of each ``(offset, length)`` range of object ``object_name``.

        ``namespace`` must identify the object's *content* (e.g. the dataset's manifest checksum):
        the cache is keyed by (namespace, object_name, block number).  Blocks not cached are
        claimed, then fetched with one call ``fetch([(offset, length), ...])`` of block-aligned
        ranges (adjacent blocks merged; the last block of the object may be short), which must
        return exactly those bytes in order.  Blocks another process is fetching are waited for.
        Results are bytes-like (``bytes`` or ``memoryview``), in the order of ``ranges``.
        """
        core = _core()
        object_size = int(object_size)
        h = self._h()
        bs = int(h.block_size)
        ns = namespace.encode("utf-8", "surrogatepass")
        obj = object_name.encode("utf-8", "surrogatepass")
        label = (ns + b"\0" + obj)[:core.PAGECACHE_LABEL_MAX]
        results, pieces, multi = core.pagecache_plan(ranges, bs, object_size, object_name)
        READY, BUSY, CLAIMED = core.PC_READY, core.PC_BUSY, core.PC_CLAIMED
        pending = sorted(pieces)
        while pending:
            claimed, busy, again = [], [], []
            try:
                for b in pending:
                    t = h.lookup(ns, obj, b, min(bs, object_size - b * bs), label)
                    st = t.status
                    if st == READY:
                        if h.serve(t, pieces[b], results, multi):
                            self._local["hits"] += 1
                        else:
                            again.append(b)       # evicted or corrupt meanwhile: look up again
                    elif st == BUSY:
                        busy.append(t)
                    else:                         # PC_CLAIMED, or PC_NOSPACE (fetch, don't cache)
                        claimed.append((b, t if st == CLAIMED else None))
            except BaseException:
                # A claim must never outlive this call: other processes would wait for it forever.
                for _, t in claimed:
                    if t is not None:
                        h.abort(t)
                raise
            if claimed:
                self._fetch(h, object_size, bs, claimed, fetch, pieces, results, multi)
            for t in busy:
                self._local["waits"] += 1
                while not h.wait(t, WAIT_SLICE_MS):
                    pass
                again.append(t.block)
            pending = sorted(again)

        for ri, buf in multi.items():
            results[ri] = memoryview(buf)
        return results

    def read_rows(self, records, rows, verify: bool, status, out: list) -> None:
        """Serve rows of a dataset's index (``records``: a ``_core.PageCacheRecords``) from cached blocks
        with one call into the C core: ``out[k]`` becomes the stored bytes of ``rows[k]`` if every block
        it needs is cached and the copy matches the record's checksum -- ``status[k]`` is 0 then.
        Otherwise ``status[k]`` is ``PC_MISS`` (fetch it with :meth:`read`; a corrupt cached block has
        been dropped) or, with ``verify``, ``PC_MISMATCH`` (the cache holds the bytes the server sent and
        they are wrong: :meth:`invalidate` them, then fetch).  Nothing is claimed, fetched or waited for."""
        self._local["hits"] += self._h().read_rows(records, rows, verify, status, out)

    def read_rows_into(self, records, rows, verify: bool, status, buf, starts) -> None:
        """:meth:`read_rows`, row ``k`` written into ``buf`` at ``starts[k]``."""
        self._local["hits"] += self._h().read_rows_into(records, rows, verify, status, buf, starts)

    def read_row(self, records, row: int, verify: bool):
        """The stored bytes of one row if all its blocks are cached (see :meth:`read_rows`), else its
        status (``PC_MISS`` or ``PC_MISMATCH``)."""
        return self._h().read_row(records, row, verify)

    def _fetch(self, h, object_size, bs, claimed, fetch, pieces, results, multi):
        # Merge runs of consecutive blocks into one range each.
        runs: List[list] = []
        for b, t in claimed:
            if runs and runs[-1][-1][0] == b - 1:
                runs[-1].append((b, t))
            else:
                runs.append([(b, t)])
        reqs = [(run[0][0] * bs, min((run[-1][0] + 1) * bs, object_size) - run[0][0] * bs) for run in runs]
        open_claims = {id(t): t for _, t in claimed if t is not None}
        try:
            self._local["fetch_calls"] += 1
            self._local["misses"] += len(claimed)
            bufs = list(fetch(reqs))
            if len(bufs) != len(reqs):
                raise ValueError(f"fetch returned {len(bufs)} buffers for {len(reqs)} ranges")
            for run, (roff, rlen), buf in zip(runs, reqs, bufs):
                view = memoryview(buf).cast("B")
                if len(view) != rlen:
                    raise ValueError(f"fetch returned {len(view)} bytes for range ({roff}, {rlen})")
                self._local["fetched_bytes"] += rlen
                for b, t in run:
                    start = b * bs - roff
                    block = view[start:start + min(bs, object_size - b * bs)]
                    if t is not None:
                        if h.publish(t, block) < 0:  # not stored (disk full...): still served
                            self._local["uncached"] += 1
                        del open_claims[id(t)]
                    else:
                        self._local["uncached"] += 1
                    for ri, boff, n, rdst in pieces[b]:
                        dst = multi.get(ri)
                        if dst is not None:
                            dst[rdst:rdst + n] = block[boff:boff + n]
                        else:
                            results[ri] = block[boff:boff + n]
        finally:
            for t in open_claims.values():  # fetch failed: let the waiters claim these themselves
                h.abort(t)

    # -- bookkeeping ------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Node-wide figures (``hits``, ``misses``, ``fetched_bytes``, ``evictions``, ``bytes_used``,
        ``capacity``, ``block_size``, ``blocks``, ``corruptions``, ``waits``, ``takeovers``, ...) and
        this handle's own under ``"process"``."""
        s = self._h().stats()
        s["process"] = dict(self._local)
        s["directory"] = self.directory
        return s

    def entries(self) -> List[dict]:
        """One dict per cached object: ``namespace``, ``object``, ``blocks``, ``bytes``."""
        groups: Dict[int, dict] = {}
        limit = _core().PAGECACHE_LABEL_MAX
        for group, _block, length, label in self._h().entries():
            e = groups.get(group)
            if e is None:
                ns, _, obj = label.partition(b"\0")
                truncated = len(label) >= limit
                e = groups[group] = dict(namespace=ns.decode(errors="replace"),
                                         object=obj.decode(errors="replace") + ("..." if truncated else ""),
                                         blocks=0, bytes=0)
            e["blocks"] += 1
            e["bytes"] += length
        return sorted(groups.values(), key=lambda e: (e["namespace"], e["object"]))

    def clear(self) -> None:
        """Drop every cached block (blocks being fetched right now stay) and free their space."""
        self._h().clear()

    def invalidate(self, namespace: str, object_name: str, ranges: Sequence[Range]) -> int:
        """Drop the cached blocks covering these ``(offset, length)`` ranges (bytes that failed a check
        further up, e.g. a record checksum); returns how many were dropped.  Blocks being fetched are
        left alone."""
        h = self._h()
        bs = int(h.block_size)
        ns = namespace.encode("utf-8", "surrogatepass")
        obj = object_name.encode("utf-8", "surrogatepass")
        blocks = set()
        for off, n in ranges:
            off, n = int(off), int(n)
            blocks.update(range(off // bs, (off + max(n, 1) - 1) // bs + 1))
        return sum(bool(h.drop(ns, obj, b)) for b in sorted(blocks))

    def locate(self, namespace: str, object_name: str, block: int):
        """``(path of pagecache.data, offset, length)`` of a cached block, or None (for tools/tests)."""
        where = self._h().locate(namespace.encode("utf-8", "surrogatepass"),
                                 object_name.encode("utf-8", "surrogatepass"), int(block))
        if where is None:
            return None
        return (os.path.join(self.directory, "pagecache.data"),) + tuple(where)

    def disk_usage(self) -> int:
        """Bytes the cache files really occupy on disk (``st_blocks``), as ``du`` counts them."""
        total = 0
        for name in ("pagecache.index", "pagecache.data", "pagecache.lock"):
            try:
                total += os.stat(os.path.join(self.directory, name)).st_blocks * 512
            except FileNotFoundError:
                pass
        return total


# -- CLI: pack cache ls | clear -----------------------------------------------------------------

def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _open_existing(directory: Optional[str]) -> Optional[PageCache]:
    d = os.path.abspath(os.path.expanduser(directory)) if directory else default_cache_dir()
    if not os.path.exists(os.path.join(d, "pagecache.index")):
        return None
    return PageCache(d)  # adopts the cache's own settings


def _cmd_ls(args) -> int:
    pc = _open_existing(args.dir)
    d = args.dir or default_cache_dir()
    if pc is None:
        print(f"no page cache in {d}")
        return 0
    with pc:
        s = pc.stats()
        rows = pc.entries()
        if getattr(args, "json", False):
            import json
            s.pop("process", None)
            print(json.dumps(dict(stats=s, entries=rows, disk_usage=pc.disk_usage()), indent=2))
            return 0
        print(f"page cache {pc.directory}: {_fmt_bytes(s['bytes_used'])} in {s['blocks']} blocks of "
              f"{_fmt_bytes(s['block_size'])}, budget {_fmt_bytes(s['capacity'])}, "
              f"on disk {_fmt_bytes(pc.disk_usage())}")
        print(f"  hits {s['hits']}, misses {s['misses']}, fetched {_fmt_bytes(s['fetched_bytes'])}, "
              f"evictions {s['evictions']}, corruptions {s['corruptions']}, takeovers {s['takeovers']}")
        if rows:
            w = max(9, max(len(r["namespace"]) for r in rows))
            print(f"{'NAMESPACE':<{w}}  {'BLOCKS':>6}  {'BYTES':>10}  OBJECT")
            for r in rows:
                print(f"{r['namespace']:<{w}}  {r['blocks']:>6}  {_fmt_bytes(r['bytes']):>10}  {r['object']}")
    return 0


def _cmd_clear(args) -> int:
    pc = _open_existing(args.dir)
    d = args.dir or default_cache_dir()
    if pc is None:
        print(f"no page cache in {d}")
        return 0
    with pc:
        before = pc.disk_usage()
        pc.clear()
        print(f"cleared {pc.directory}: {_fmt_bytes(before)} -> {_fmt_bytes(pc.disk_usage())} on disk")
    return 0


def register_cli(subparsers) -> None:
    """Add ``pack cache ls`` and ``pack cache clear`` to an argparse subparsers object.  Each sets
    ``func(args) -> exit code``."""
    p = subparsers.add_parser("cache", help="show or empty the node-local page cache")
    sub = p.add_subparsers(dest="cache_command", required=True)
    ls = sub.add_parser("ls", help="list cached objects and cache statistics")
    ls.add_argument("--dir", default=None, help=f"cache directory (default: ${ENV_DIR} or ~/.cache/packfmt)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_cmd_ls)
    cl = sub.add_parser("clear", help="drop every cached block and free its disk space")
    cl.add_argument("--dir", default=None, help=f"cache directory (default: ${ENV_DIR} or ~/.cache/packfmt)")
    cl.set_defaults(func=_cmd_clear)


def main(argv=None) -> int:
    """``python -m packfmt.cache ls|clear [--dir D]`` (the same as ``pack cache ...``)."""
    import argparse
    parser = argparse.ArgumentParser(prog="pack")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
