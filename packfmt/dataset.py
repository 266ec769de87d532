"""Reading datasets: ``packfmt.open(url)`` returns a :class:`Dataset`.

Opening reads the manifest and the global index (memory-mapped when local) and nothing else: shards
are opened on first use, and no directory is ever listed.  Reads go through the native core, which
sorts a batch by position, coalesces neighbouring records, releases the GIL, and checks every
record's checksum before handing bytes back.
"""

from __future__ import annotations

import builtins
import itertools
import operator
import os
import weakref

import numpy as np
import pyarrow as pa
import zstandard

from packfmt import _core
from packfmt import manifest as mf
from packfmt.errors import CorruptShardError, DatasetNotFoundError, ManifestError, PackError, PackOSError

# The packfmt columns of the global index and the Arrow type each must have.
_INDEX_TYPES = {
    "shard": pa.uint32(),
    "offset": pa.uint64(),
    "stored_len": pa.uint32(),
    "raw_len": pa.uint32(),
    "checksum": pa.uint64(),
    "flags": pa.uint32(),
}

_builtin_open = builtins.open
_INT64 = np.dtype(np.int64)
_open_datasets: "weakref.WeakSet[Dataset]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Shard handles (fds, maps, a mutex) are per process: the child opens its own on first use.
    for ds in list(_open_datasets):
        ds.__dict__.pop("_shardset", None)  # remote readers re-create their clients themselves
        ds.__dict__.pop("_read_one", None)
        ds.__dict__.pop("_read_rows", None)


os.register_at_fork(after_in_child=_after_fork_in_child)


def open(url, **options) -> "Dataset":  # noqa: A001 - the natural name, like io.open / h5py.File
    """Open the dataset at ``url`` (a directory path or ``file://`` URL).

    Options: ``mmap=True`` (map shards; ``False`` reads with pread and coalesces neighbours),
    ``huge_pages="auto"`` (with ``mmap``: ask the kernel for 2 MiB pages for the maps, see
    :func:`huge_pages_wanted`), ``verify=True`` (check each record's checksum on read), ``max_gap`` /
    ``max_read`` (coalescing, in bytes), ``decompress_threads=0``.

    >>> import packfmt, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "ds")
    >>> with packfmt.Writer(out) as w:
    ...     w.add("x", b"1", label=7)
    >>> ds = packfmt.open(out)
    >>> ds[0], ds.key(0), ds.column("label").tolist()
    (b'1', 'x', [7])
    """
    return Dataset(url, **options)


def huge_pages_wanted(option, shard_bytes: int, memory_bytes: int | None = None) -> bool:
    """Whether the shard maps get ``MADV_HUGEPAGE`` (option ``huge_pages`` of :func:`open`).

    With it, a fault fills a 2 MiB page-cache folio and maps it with one TLB entry: random reads from
    a hot dataset miss the TLB ~500x less (on the benchmark VM, 1.2-1.3M -> 1.5M verified samples/s
    when the shards were faulted in by random reads; docs/benchmarks.md), and each DataLoader worker
    needs 512x fewer page-table entries.  The price is paid on a page-cache miss: a fault reads
    2-4 MiB, not ~128 KiB, which only pays while the dataset stays in memory.  ``"auto"`` (the
    default) turns it on when the shards take at most half the machine's memory; ``True`` / ``False``
    force it.  Linux only; a kernel or file system without large page-cache folios ignores the
    advice (nothing else changes).

    >>> huge_pages_wanted("auto", 1 << 30, memory_bytes=16 << 30), huge_pages_wanted("auto", 1 << 40, memory_bytes=16 << 30)
    (True, False)
    """
    if option == "auto":
        if memory_bytes is None:
            try:
                memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return False
        return shard_bytes <= memory_bytes // 2
    if isinstance(option, bool):
        return option
    raise ValueError(f"huge_pages must be True, False or 'auto', got {option!r}")


def _read_capped(store, name: str, limit: int) -> bytes:
    """A small object whole; refuses one larger than limit (a manifest that is really /dev/zero or an
    endless HTTP answer) without reading more than limit + 1 bytes."""
    try:
        return store.read_bytes(name, max_size=limit)
    except FileNotFoundError:
        raise
    except OSError as e:
        if "-byte limit" in str(e):
            raise ManifestError(f"{store.object_url(name)}: larger than the {limit}-byte limit for {name}") from None
        raise


class _ShardNames:
    """Names the shard of batch item k, for error messages (looked up only on error)."""

    def __init__(self, paths, shard):
        self.paths, self.shard = paths, shard

    def __getitem__(self, k):
        return self.paths[int(self.shard[k])]


class Dataset:
    """A packfmt dataset opened for reading.  Map-style: ``len(ds)``, ``ds[i]``, ``ds.get_batch(idx)``.

    Picklable (the child re-opens lazily) and safe across ``fork``.
    """

    def __init__(self, url, *, storage_options: dict | None = None, cache=None, mmap: bool = True,
                 huge_pages: bool | str = "auto", verify: bool = True, max_gap: int = 64 << 10,
                 max_read: int = 8 << 20, decompress_threads: int = 0):
        self.url = url.url if hasattr(url, "read_ranges") else os.fspath(url)
        huge_pages_wanted(huge_pages, 0, 1)  # a bad value fails here, not at the first read
        self._options = dict(storage_options=storage_options, cache=cache, mmap=mmap, huge_pages=huge_pages,
                             verify=verify, max_gap=max_gap, max_read=max_read,
                             decompress_threads=decompress_threads)
        self._load()

    # ------------------------------------------------------------------ opening
    def _load(self) -> None:
        from packfmt.storage import open_store
        d = self.__dict__
        store = open_store(self.url, self._options["storage_options"])
        d["_store"] = store
        d["_remote"] = not store.is_local
        d["_root"] = store.local_path("").rstrip("/") if store.is_local else None
        mname = store.object_url(mf.MANIFEST_NAME)
        try:
            data = _read_capped(store, mf.MANIFEST_NAME, mf.MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            hint = ""
            if store.exists(mf.INCOMPLETE_MARKER):
                hint = " (a build into it was interrupted or is still running: run the build again)"
            elif store.is_local and not os.path.isdir(d["_root"]):
                hint = " (no such directory)"
            raise DatasetNotFoundError(f"no packfmt dataset at {self.url}: {mf.MANIFEST_NAME} not found{hint}") from None
        except PackError:
            raise
        except OSError as e:
            raise PackOSError(e.errno or 0, f"cannot read the manifest: {e.strerror or e}", mname) from None
        m = mf.Manifest.parse(data, mname)
        d["_manifest"] = m
        table = self._load_index(store, m)
        d["_table"] = table
        cols = {}
        for name, typ in _INDEX_TYPES.items():
            cols[name] = (table.column(name).chunk(0).to_numpy(zero_copy_only=True) if table.num_rows
                          else np.zeros(0, typ.to_pandas_dtype()))
        self._check_index(m, cols)
        d["_cols"] = cols
        d["_raw_only"] = not bool(np.any(cols["flags"])) if table.num_rows else True
        d["_paths"] = [store.object_url(s.name) for s in m.shards]
        d["_key_lookup"] = None
        _open_datasets.add(self)

    def _load_index(self, store, m: mf.Manifest) -> pa.Table:
        ipath = store.object_url(m.index_name)
        try:
            if store.is_local:
                source = pa.memory_map(store.local_path(m.index_name), "r")  # zero-copy columns
                size = source.size()
            else:
                source = pa.py_buffer(store.read_bytes(m.index_name, size=m.index_size))
                size = source.size
        except FileNotFoundError:
            raise ManifestError(f"{ipath}: the index named by the manifest is missing") from None
        except PackError:
            raise
        except OSError as e:
            raise PackOSError(e.errno or 0, f"cannot read the index: {e.strerror or e}", ipath) from None
        if size != m.index_size:
            raise ManifestError(f"{ipath}: index is {size} bytes, the manifest says {m.index_size}")
        buf = source.read_buffer() if store.is_local else source
        got = _core.xxh64(buf)
        if got != m.index_checksum:
            raise ManifestError(f"{ipath}: index checksum {got:016x} differs from the manifest's {m.index_checksum:016x}")
        try:
            table = pa.ipc.open_file(buf).read_all()
            table.validate(full=True)  # string offsets in bounds and monotonic, before C code trusts them
        except (pa.ArrowInvalid, pa.ArrowException) as e:
            raise ManifestError(f"{ipath}: not a valid Arrow IPC file: {e}") from None
        if table.num_rows != m.samples:
            raise ManifestError(f"{ipath}: index has {table.num_rows} rows, the manifest says {m.samples}")
        schema = table.schema
        if "key" not in schema.names or schema.field("key").type not in (pa.string(), pa.large_string()):
            raise ManifestError(f"{ipath}: index lacks a string 'key' column")
        for name, typ in _INDEX_TYPES.items():
            if name not in schema.names or schema.field(name).type != typ:
                raise ManifestError(f"{ipath}: index column {name!r} missing or not {typ}")
        if table.column("key").num_chunks > 1:  # e.g. more than 2 GiB of keys: one 64-bit-offset array
            i = schema.get_field_index("key")
            table = table.set_column(i, "key", table.column("key").cast(pa.large_string()).combine_chunks())
        table = table.combine_chunks()
        for name in ("key",) + tuple(_INDEX_TYPES):
            if table.column(name).null_count:
                raise ManifestError(f"{ipath}: index column {name!r} has nulls")
        return table

    def _check_index(self, m: mf.Manifest, cols: dict) -> None:
        """Cheap, vectorised agreement checks between index and manifest; reads catch the rest."""
        n = m.samples
        if n == 0:
            return
        shard = cols["shard"]
        if int(shard.max()) >= len(m.shards):
            raise ManifestError(f"{self.url}: index names shard {int(shard.max())}, the manifest has {len(m.shards)}")
        counts = np.bincount(shard, minlength=len(m.shards))
        for i, s in enumerate(m.shards):
            if counts[i] != s.records:
                raise ManifestError(f"{self.url}: index has {counts[i]} samples in {s.name}, the manifest says {s.records}")
        data_end = np.array([s.size - _core.FOOTER_SIZE - _core.ENTRY_SIZE * s.records for s in m.shards],
                            dtype=np.uint64)[shard]
        off, stored, raw, flags = cols["offset"], cols["stored_len"], cols["raw_len"], cols["flags"]
        bad = (off < _core.HEADER_SIZE) | (off > data_end) | (stored.astype(np.uint64) > data_end - np.minimum(off, data_end))
        bad |= (flags > _core.CODEC_ZSTD_DICT) | ((flags == _core.CODEC_NONE) & (stored != raw))
        bad |= raw > _core.MAX_RECORD_SIZE
        if m.dictionary is None:
            bad |= flags == _core.CODEC_ZSTD_DICT
        if bad.any():
            i = int(np.argmax(bad))
            raise ManifestError(f"{self.url}: index row {i} (key {self.key(i)!r}) is inconsistent with its shard "
                                f"{m.shards[int(shard[i])].name}: offset {int(off[i])}, stored {int(stored[i])}, "
                                f"raw {int(raw[i])}, flags {int(flags[i])}")

    def __getattr__(self, name):
        # Only reached when an attribute is missing: after unpickling, load on first use.
        if name.startswith("_") and "_options" in self.__dict__ and "_manifest" not in self.__dict__ and name != "_load":
            self._load()
            return getattr(self, name)
        raise AttributeError(name)

    def __getstate__(self):
        return {"url": self.url, "_options": self._options}

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def _reader(self):
        """Fetches stored bytes of remote records (through the page cache unless cache=False)."""
        r = self.__dict__.get("_remote_reader")
        if r is None:
            from packfmt.remote import RemoteReader
            cache = self._options["cache"]
            if cache is None or cache is True:
                from packfmt.cache import PageCache
                cache = PageCache()
            elif cache is False:
                cache = None
            elif isinstance(cache, (str, os.PathLike)):
                from packfmt.cache import PageCache
                cache = PageCache(os.fspath(cache))
            m = self._manifest
            r = RemoteReader(self._store, m.content_id, [s.name for s in m.shards], [s.size for s in m.shards],
                             cache=cache)
            self.__dict__["_remote_reader"] = r
        return r

    @property
    def _cache_records(self):
        """The page cache's view of the index (``_core.PageCacheRecords``) when remote shards are read
        through a :class:`packfmt.cache.PageCache`, else None: cached records are then served by one C
        call per batch, and only the rest go through the fetch path."""
        d = self.__dict__
        if "_pc_records" not in d:
            from packfmt.cache import PageCache
            recs = None
            if isinstance(self._reader.cache, PageCache):
                m, c = self._manifest, self._cols
                recs = _core.PageCacheRecords(m.content_id, [s.name for s in m.shards], [s.size for s in m.shards],
                                              c["shard"], c["offset"], c["stored_len"], c["checksum"])
            d["_pc_records"] = recs
        return d["_pc_records"]

    @property
    def _shardset(self) -> _core.ShardSet:
        ss = self.__dict__.get("_shardset")
        if ss is None:
            o, c, m = self._options, self._cols, self._manifest
            sizes = np.array([s.size for s in m.shards], dtype=np.uint64)
            ss = _core.ShardSet(self._paths, sizes, c["shard"], c["offset"], c["stored_len"], c["checksum"],
                                use_mmap=o["mmap"], verify=o["verify"], max_gap=o["max_gap"],
                                max_read=o["max_read"],
                                huge_pages=huge_pages_wanted(o["huge_pages"], int(sizes.sum())))
            self.__dict__["_shardset"] = ss
        return ss

    # ------------------------------------------------------------------ metadata
    def __len__(self) -> int:
        return self._manifest.samples

    def __repr__(self) -> str:
        m = self._manifest
        return f"<packfmt.Dataset {self.url!r}: {m.samples} samples in {len(m.shards)} shards, {m.codec}>"

    @property
    def manifest(self) -> dict:
        """The parsed ``manifest.json``."""
        return self._manifest.raw

    @property
    def content_id(self) -> str:
        """Checksum of the manifest: identifies this exact dataset content."""
        return self._manifest.content_id

    @property
    def shards(self) -> list:
        return [s.name for s in self._manifest.shards]

    @property
    def index(self) -> pa.Table:
        """The global index as an Arrow table (memory-mapped; zero-copy)."""
        return self._table

    @property
    def columns(self) -> list:
        """The user columns of the index (``label``, ...)."""
        return [n for n in self._table.schema.names if n not in mf.INDEX_COLUMNS]

    shard_of = property(lambda self: self._cols["shard"], doc="Shard number of every sample (uint32 array).")
    offsets = property(lambda self: self._cols["offset"], doc="Byte offset of every sample in its shard.")
    stored_lengths = property(lambda self: self._cols["stored_len"], doc="Stored (on-disk) length of every sample.")
    raw_lengths = property(lambda self: self._cols["raw_len"], doc="Decoded length of every sample.")
    checksums = property(lambda self: self._cols["checksum"], doc="XXH3-64 of every sample's stored bytes.")
    codecs = property(lambda self: self._cols["flags"], doc="Codec of every sample (0 none, 1 zstd, 2 zstd+dict).")

    def column(self, name: str) -> np.ndarray:
        """A column of the index as a numpy array (zero-copy where Arrow allows)."""
        col = self._table.column(name)
        try:
            return col.chunk(0).to_numpy(zero_copy_only=True) if col.num_chunks == 1 else col.to_numpy()
        except pa.ArrowInvalid:
            return col.to_numpy(zero_copy_only=False)

    def key(self, i: int) -> str:
        return self._table.column("key")[self._row(i)].as_py()

    @property
    def keys(self) -> pa.Array:
        return self._table.column("key").chunk(0) if len(self) else pa.array([], pa.string())

    def index_of(self, key: str) -> int:
        """Global index of the sample with this key (KeyError if none).  The first call hashes all keys
        (O(N) in C); later calls are O(log N)."""
        lookup = self._key_lookup
        if lookup is None:
            keys = self.keys
            offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64 if keys.type == pa.large_string() else np.int32)
            offsets = offsets[keys.offset: keys.offset + len(keys) + 1].astype(np.int64)
            data = keys.buffers()[2]
            hashes = np.empty(len(keys), dtype=np.uint64)
            _core.hash_strings(np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8),
                               offsets, hashes)
            order = np.argsort(hashes, kind="stable")
            lookup = self.__dict__["_key_lookup"] = (hashes[order], order)
        sorted_hashes, order = lookup
        h = np.uint64(_core.xxh64(key.encode("utf-8")))
        lo = int(np.searchsorted(sorted_hashes, h, side="left"))
        hi = int(np.searchsorted(sorted_hashes, h, side="right"))
        for j in range(lo, hi):
            i = int(order[j])
            if self.key(i) == key:
                return i
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        try:
            self.index_of(key)
            return True
        except KeyError:
            return False

    # ------------------------------------------------------------------ reading
    def _row(self, i) -> int:
        n = self._manifest.samples
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index out of range: {i} (dataset has {n} samples)")
        return i

    def __getitem__(self, i):
        fast = self.__dict__.get("_read_one")  # raw local records: straight into the C core
        if fast is not None and type(i) is int:
            return fast(i)
        if isinstance(i, slice):
            return self.get_batch(np.arange(*i.indices(len(self))))
        row = self._row(i)
        if self._raw_only:
            if self._remote:
                return self._remote_one(row)
            self.__dict__["_read_one"] = self._shardset.read_one
            return self._read_one(row)
        return self.get_batch([row])[0]

    def get_batch(self, indices) -> list:
        """The samples at ``indices`` (any order, repeats allowed), as a list of bytes in that order."""
        fast = self.__dict__.get("_read_rows")  # raw local records: an int64 array goes straight to the C core
        if (fast is not None and type(indices) is np.ndarray and indices.dtype == _INT64 and indices.ndim == 1
                and indices.flags.c_contiguous):
            return fast(indices)  # checks the range and wraps negative indices itself
        rows = self._rows(indices)
        if self._remote:
            return self._read_remote(rows)
        if self._raw_only:
            read_rows = self.__dict__["_read_rows"] = self._shardset.read_rows
            return read_rows(rows)
        return self._read_decoded(rows)

    def get_batch_packed(self, indices, alloc=None):
        """The samples at ``indices`` in one contiguous buffer: returns ``(buf, offsets)``, sample ``k``
        being ``buf[offsets[k]:offsets[k + 1]]``.  ``alloc(nbytes)`` returns the writable buffer to fill
        (e.g. a shared-memory tensor, so a DataLoader worker can hand the batch over without pickling
        it); default: a bytearray.  Uncompressed local records are read straight into it.

        >>> import packfmt, tempfile, os
        >>> out = os.path.join(tempfile.mkdtemp(), "ds")
        >>> with packfmt.Writer(out) as w:
        ...     w.add("a", b"xy"); w.add("b", b"abc")
        >>> buf, off = packfmt.open(out).get_batch_packed([1, 0])
        >>> bytes(buf), off.tolist()
        (b'abcxy', [0, 3, 5])
        """
        rows = self._rows(indices)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(self._cols["raw_len"][rows], out=offsets[1:])
        total = int(offsets[-1])
        buf = _core.uninit_bytearray(total) if alloc is None else alloc(total)  # every byte written below
        view = memoryview(buf).cast("B")
        if len(view) < total:
            raise ValueError(f"alloc returned {len(view)} bytes, {total} needed")
        if self._raw_only and not self._remote:
            self._shardset.read_rows_into(rows, view, offsets[:-1].view(np.uint64))
        elif self._raw_only:  # stored == raw: straight from the page cache into the buffer
            self._remote_stored(rows, view, offsets[:-1].view(np.uint64))
        else:
            for k, sample in enumerate(self.get_batch(rows)):
                view[offsets[k]:offsets[k + 1]] = sample
        return buf, offsets

    def _rows(self, indices) -> np.ndarray:
        """indices as a contiguous int64 array of valid, non-negative rows."""
        rows = np.asarray(indices)
        if rows.dtype.kind not in "iu":
            if rows.size == 0:
                rows = rows.astype(np.int64)
            else:
                raise TypeError(f"indices must be integers, got {rows.dtype}")
        rows = np.ascontiguousarray(rows.reshape(-1), dtype=np.int64)
        n = self._manifest.samples
        if rows.size and (rows.min() < -n or rows.max() >= n):
            bad = rows[(rows < -n) | (rows >= n)][0]
            raise IndexError(f"sample index out of range: {int(bad)} (dataset has {n} samples)")
        if rows.size and rows.min() < 0:
            rows = np.where(rows < 0, rows + n, rows)
        return rows

    def _read_decoded(self, rows: np.ndarray) -> list:
        c = self._cols
        stored = c["stored_len"][rows].astype(np.uint64)
        starts = np.zeros(len(rows), dtype=np.uint64)
        if len(rows) > 1:
            np.cumsum(stored[:-1], out=starts[1:])
        buf = _core.uninit_bytearray(int(stored.sum()))  # filled by read_rows_into, or it raises
        self._shardset.read_rows_into(rows, buf, starts)
        return self._decode(rows, buf, starts, stored)

    def _read_remote(self, rows: np.ndarray) -> list:
        if self._raw_only:
            return self._remote_stored(rows)
        stored = self._cols["stored_len"][rows].astype(np.uint64)
        starts = np.zeros(len(rows), dtype=np.uint64)
        if len(rows) > 1:
            np.cumsum(stored[:-1], out=starts[1:])
        buf = _core.uninit_bytearray(int(stored.sum()))  # filled by _remote_stored, or it raises
        self._remote_stored(rows, buf, starts)
        return self._decode(rows, buf, starts, stored)

    def _remote_one(self, row: int) -> bytes:
        recs = self._cache_records
        if recs is not None:
            got = self._reader.cache.read_row(recs, row, self._options["verify"])
            if type(got) is bytes:
                return got
        return self._remote_stored(np.array([row], dtype=np.int64))[0]

    def _remote_stored(self, rows: np.ndarray, buf=None, starts=None):
        """The stored bytes of remote rows, each checked against its checksum (unless verify=False): a
        list of bytes, or with ``buf``, row k written into buf at starts[k].  Through a PageCache, one C
        call serves every row whose blocks are cached; only the others take the fetch path."""
        n = len(rows)
        out = [None] * n if buf is None else None
        recs = self._cache_records
        if recs is None:
            groups = [(np.arange(n), True)]
        else:
            status = np.empty(n, dtype=np.uint8)
            cache = self._reader.cache
            if buf is None:
                cache.read_rows(recs, rows, self._options["verify"], status, out)
            else:
                cache.read_rows_into(recs, rows, self._options["verify"], status, buf, starts)
            todo = np.flatnonzero(status)
            if not len(todo):
                return out
            bad = todo[status[todo] == _core.PC_MISMATCH]
            if len(bad):
                # Intact cached blocks that do not hold the record: the server sent bad bytes once and
                # the cache kept them for every process on the node.  Drop them; the fetch below is
                # these rows' second and last chance.
                self._invalidate(rows[bad])
            groups = [(todo[status[todo] == _core.PC_MISS], True), (bad, False)]
        view = None if buf is None else memoryview(buf).cast("B")
        for ks, retry in groups:
            if not len(ks):
                continue
            pieces = self._fetch_verified(rows[ks], retry)
            if view is None:
                for k, p in zip(ks.tolist(), pieces):
                    out[k] = p if type(p) is bytes else bytes(p)
            else:
                for k, p in zip(ks.tolist(), pieces):
                    s = int(starts[k])
                    view[s:s + len(p)] = p
        return out

    def _fetch_verified(self, rows: np.ndarray, retry: bool) -> list:
        """Fetch the stored bytes of rows (through the page cache, if any) and check their checksums.
        On a mismatch with ``retry``, drop the cached blocks of these rows and fetch them once more."""
        c = self._cols
        shard = c["shard"][rows]
        stored = c["stored_len"][rows].astype(np.uint64)
        offsets = c["offset"][rows]
        pieces = self._reader.read(shard, offsets, stored)
        if self._options["verify"]:
            checksums = np.ascontiguousarray(c["checksum"][rows])
            names = _ShardNames(self._paths, shard)
            try:
                _core.verify_buffers(pieces, checksums, names, rows, offsets)
            except CorruptShardError:
                if not retry or self._reader.cache is None:
                    raise
                # The server may have sent bad bytes once (a flaky proxy) and the page cache kept them for
                # every process on the node: drop the blocks of these rows and fetch them once more.
                self._invalidate(rows)
                pieces = self._reader.read(shard, offsets, stored)
                _core.verify_buffers(pieces, checksums, names, rows, offsets)
        return pieces

    def _invalidate(self, rows: np.ndarray) -> None:
        """Drop the cached blocks holding these rows' stored bytes."""
        cache = self._reader.cache
        if cache is None:
            return
        c, m = self._cols, self._manifest
        shard = c["shard"][rows]
        offsets, stored = c["offset"][rows], c["stored_len"][rows]
        for s_id in np.unique(shard).tolist():
            sel = shard == s_id
            cache.invalidate(m.content_id, m.shards[s_id].name, zip(offsets[sel].tolist(), stored[sel].tolist()))

    def _decode(self, rows, buf, starts, stored) -> list:
        """Turn stored bytes (one buffer, record k at starts[k]) into raw samples, decompressing all the
        zstd records of the batch in one call into the zstd library."""
        c = self._cols
        flags = c["flags"][rows]
        raw = c["raw_len"][rows]
        out = [None] * len(rows)
        view = memoryview(buf)
        for k in np.flatnonzero(flags == _core.CODEC_NONE).tolist():
            s = int(starts[k])
            out[k] = bytes(view[s: s + int(stored[k])])
        for codec in (_core.CODEC_ZSTD, _core.CODEC_ZSTD_DICT):
            ks = np.flatnonzero(flags == codec)
            if not len(ks):
                continue
            segments = np.empty((len(ks), 2), dtype=np.uint64)
            segments[:, 0] = starts[ks]
            segments[:, 1] = stored[ks]
            sizes = raw[ks].astype(np.uint64)
            bad = _core.check_zstd_sizes(np.frombuffer(buf, dtype=np.uint8), segments[:, 0].copy(),
                                         segments[:, 1].copy(), sizes)
            if bad >= 0:
                raise self._decode_error(rows, ks[bad:bad + 1], "zstd frame header does not declare the raw length "
                                         "the index records (refused before decompressing)")
            try:
                frames = zstandard.BufferWithSegments(buf, segments.tobytes())
                result = self._dctx(codec).multi_decompress_to_buffer(
                    frames, decompressed_sizes=sizes.tobytes(), threads=self._options["decompress_threads"])
            except zstandard.ZstdError as e:
                raise self._decode_error(rows, ks, f"zstd decompression failed: {e}") from None
            for j, k in enumerate(ks.tolist()):
                seg = result[j]
                if len(seg) != int(sizes[j]):
                    raise self._decode_error(rows, ks[j:j + 1], f"decompressed to {len(seg)} bytes, index says {int(sizes[j])}")
                out[k] = seg.tobytes()
        return out

    def _decode_error(self, rows, ks, what) -> CorruptShardError:
        row = int(rows[ks[0]]) if len(ks) == 1 else None
        if row is None:
            return CorruptShardError(f"{self.url}: {what} (in a batch of samples {sorted(set(int(rows[k]) for k in ks))[:8]}...)")
        shard = self._paths[int(self._cols["shard"][row])]
        off = int(self._cols["offset"][row])
        return CorruptShardError(f"{shard}: sample {row} at offset {off}: {what}", shard=shard, offset=off, sample=row)

    def _dctx(self, codec: int) -> zstandard.ZstdDecompressor:
        key = "_dctx_dict" if codec == _core.CODEC_ZSTD_DICT else "_dctx_plain"
        dctx = self.__dict__.get(key)
        if dctx is None:
            d = self._dictionary() if codec == _core.CODEC_ZSTD_DICT else None
            dctx = self.__dict__[key] = zstandard.ZstdDecompressor(dict_data=d)
        return dctx

    def _dictionary(self) -> zstandard.ZstdCompressionDict:
        info = self._manifest.dictionary
        if info is None:
            raise ManifestError(f"{self.url}: records use a dictionary but the manifest names none")
        path = self._store.object_url(info["name"])
        try:
            data = self._store.read_bytes(info["name"])
        except FileNotFoundError:
            raise ManifestError(f"{path}: the dictionary named by the manifest is missing") from None
        if len(data) != info["size"] or _core.xxh64(data) != info["checksum"]:
            raise ManifestError(f"{path}: dictionary size or checksum differs from the manifest")
        return zstandard.ZstdCompressionDict(data)

    def __iter__(self):
        """All samples in index order, read in batches of 256 (one call into the C core per batch).

        >>> import packfmt, tempfile, os
        >>> out = os.path.join(tempfile.mkdtemp(), "ds")
        >>> with packfmt.Writer(out) as w:
        ...     w.add("a", b"x"); w.add("b", b"yz")
        >>> list(packfmt.open(out))
        [b'x', b'yz']
        """
        return itertools.chain.from_iterable(self.iter_batches(256))  # no Python frame per sample

    def iter_batches(self, batch_size: int = 256, indices=None):
        """Yield lists of samples for consecutive slices of ``indices`` (default: all, in order), each
        ``batch_size`` long except perhaps the last.  ``indices`` is checked once, up front.

        >>> import packfmt, tempfile, os
        >>> out = os.path.join(tempfile.mkdtemp(), "ds")
        >>> with packfmt.Writer(out) as w:
        ...     for i in range(5): w.add(str(i), b"%d" % i)
        >>> [b for b in packfmt.open(out).iter_batches(2, indices=[4, 0, -1])]
        [[b'4', b'0'], [b'4']]
        """
        batch_size = operator.index(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rows = np.arange(len(self), dtype=np.int64) if indices is None else self._rows(indices)
        get_batch = self.get_batch
        for start in range(0, len(rows), batch_size):
            yield get_batch(rows[start: start + batch_size])

    def close(self) -> None:
        self.__dict__.pop("_shardset", None)
        self.__dict__.pop("_read_one", None)
        self.__dict__.pop("_read_rows", None)
        self.__dict__.pop("_pc_records", None)
        r = self.__dict__.pop("_remote_reader", None)
        if r is not None:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

