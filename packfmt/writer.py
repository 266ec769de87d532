"""Writing datasets: :class:`Writer` for samples you have in memory, and the pieces ``pack build`` shares.

A dataset is written as: shards (each append-only, finished by its index and footer), then the global
index (``index.arrow``), then the dictionary if any, and last, atomically, ``manifest.json``.  Until the
manifest exists, a marker file says "build in progress"; nothing opens as a dataset.
"""

from __future__ import annotations

import datetime
import getpass
import os
import platform
import re
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zstandard

from packfmt import _core
from packfmt import manifest as mf
from packfmt.errors import DatasetExistsError, PackError

#: Default shard size; see docs/guide.md for how to choose one.
DEFAULT_SHARD_SIZE = 256 << 20
DEFAULT_ZSTD_LEVEL = 3
DEFAULT_DICT_SIZE = 112_640  # zstd's own default dictionary size
#: Longest key accepted (UTF-8 bytes).  Keys are names, not payload.
MAX_KEY_BYTES = 4096

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(value) -> int:
    """``"256MiB"``, ``"1.5GB"``, ``"4096"`` or an int, in bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {value!r} (examples: 4096, 64MiB, 1GB)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class Compression:
    """A compression setting: ``none``, ``zstd[:LEVEL]`` or ``zstd-dict[:LEVEL]``."""

    codec: str = "none"
    level: int | None = None

    @classmethod
    def parse(cls, spec) -> "Compression":
        if isinstance(spec, Compression):
            return spec
        spec = "none" if spec in (None, False) else str(spec)
        name, _, level = spec.partition(":")
        if name not in mf.CODECS:
            raise ValueError(f"unknown compression {spec!r}: use none, zstd[:LEVEL] or zstd-dict[:LEVEL]")
        if name == "none":
            if level:
                raise ValueError("compression 'none' takes no level")
            return cls("none", None)
        lvl = DEFAULT_ZSTD_LEVEL
        if level:
            try:
                lvl = int(level)
            except ValueError:
                raise ValueError(f"zstd level must be an integer, got {level!r}") from None
            if not -7 <= lvl <= 22:
                raise ValueError(f"zstd level must be in -7..22, got {lvl}")
        return cls(name, lvl)

    def __str__(self):
        return self.codec if self.level is None else f"{self.codec}:{self.level}"


class Encoder:
    """Turns raw sample bytes into (stored bytes, codec).  Keeps a record raw when zstd does not shrink it."""

    def __init__(self, compression: Compression, dictionary: zstandard.ZstdCompressionDict | None = None):
        self.compression = compression
        self.dictionary = dictionary
        self.codec = _core.CODEC_NONE
        self._cctx = None
        if compression.codec != "none":
            self.codec = _core.CODEC_ZSTD_DICT if dictionary is not None else _core.CODEC_ZSTD
            self._cctx = zstandard.ZstdCompressor(level=compression.level, dict_data=dictionary,
                                                  write_content_size=True, write_checksum=False,
                                                  write_dict_id=False)

    @property
    def shard_flags(self) -> int:
        if self._cctx is None:
            return 0
        return _core.SHARD_HAS_ZSTD | (_core.SHARD_HAS_DICT if self.dictionary is not None else 0)

    @property
    def dict_id(self) -> int:
        return self.dictionary.dict_id() if self.dictionary is not None else 0

    def encode(self, data):
        if self._cctx is None or len(data) == 0:
            return data, _core.CODEC_NONE
        comp = self._cctx.compress(data)
        if len(comp) >= len(data):
            return data, _core.CODEC_NONE
        return comp, self.codec


def train_dictionary(samples: list, dict_size: int = DEFAULT_DICT_SIZE, level: int = DEFAULT_ZSTD_LEVEL):
    """Train a zstd dictionary on sample payloads; None when there is too little to learn from."""
    samples = [bytes(s) for s in samples if len(s) > 0]
    if len(samples) < 8 or sum(map(len, samples)) < 4 * 1024:
        return None
    try:
        return zstandard.train_dictionary(dict_size, samples, level=level)
    except zstandard.ZstdError:
        return None


class RemoteShardWriter:
    """A shard written by the C writer into a pipe whose other end streams it to an object store.

    The store's writer (an S3 multipart upload) sends each part from background threads as soon as it
    is full, so uploading overlaps writing and never waits for the whole shard.  Any failure aborts the
    upload: no orphan parts, no object.
    """

    def __init__(self, store, name: str, flags: int, dict_id: int):
        self.name = name
        self._upload = store.open_write(name)
        self._error = None
        r, w = os.pipe()
        self._thread = threading.Thread(target=self._pump, args=(r,), name=f"packfmt-upload-{name}", daemon=True)
        self._thread.start()
        try:
            self._w = _core.ShardWriter(store.object_url(name), flags, dict_id, fd=w)
        except BaseException:
            os.close(w)
            self._thread.join()
            self._upload.abort()
            raise

    def _pump(self, r: int) -> None:
        try:
            while True:
                chunk = os.read(r, 1 << 20)
                if not chunk:
                    break
                self._upload.write(chunk)
        except BaseException as e:  # reported by the writing side
            self._error = e
        finally:
            os.close(r)  # a writer blocked on a full pipe now fails with EPIPE instead of hanging

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except BaseException:
            if self._error is not None:
                raise self._error from None
            raise

    size = property(lambda self: self._w.size)
    count = property(lambda self: self._w.count)

    def append(self, *args):
        return self._call(self._w.append, *args)

    def append_files(self, *args):
        return self._call(self._w.append_files, *args)

    def close(self) -> dict:
        try:
            info = self._call(self._w.close)
        except BaseException:
            self._thread.join()
            self._upload.abort()
            raise
        self._thread.join()
        if self._error is not None:
            self._upload.abort()
            raise self._error
        self._upload.close()
        return info

    def abort(self) -> None:
        self._w.abort()
        self._thread.join()
        self._upload.abort()


class Target:
    """A destination (local directory or object-store prefix) being filled with a dataset.

    ``prepare`` refuses an existing dataset unless ``overwrite``; on a local directory it also refuses a
    non-empty directory, and cleans up after an interrupted build (marker present, no manifest).  Until
    ``commit`` a marker object says the build is incomplete; the manifest is written last, atomically
    (rename locally; a single PUT on S3, which is atomic).
    """

    def __init__(self, url, overwrite: bool = False, storage_options: dict | None = None):
        from packfmt.storage import open_store
        self.url = os.fspath(url) if not hasattr(url, "url") else url.url
        self.store = open_store(url, storage_options)
        self.local = self.store.is_local
        self.path = self.store.local_path("").rstrip("/") if self.local else None
        self.overwrite = overwrite
        self._created: list[str] = []

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def prepare(self) -> None:
        if not self.local:
            return self._prepare_remote()
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise DatasetExistsError(f"{p} exists and is not a directory")
        os.makedirs(p, exist_ok=True)
        entries = set(os.listdir(p))  # listing the *destination* while writing is fine; reading never lists
        if mf.MANIFEST_NAME in entries and not self.overwrite:
            raise DatasetExistsError(f"{p} already holds a dataset; use --overwrite (overwrite=True) to replace it")
        ours = {e for e in entries if _is_ours(e)}
        if entries - ours and not self.overwrite and mf.INCOMPLETE_MARKER not in entries:
            raise DatasetExistsError(f"{p} exists and is not empty; use --overwrite (overwrite=True) to write into it")
        if mf.MANIFEST_NAME in entries:
            os.unlink(self.file(mf.MANIFEST_NAME))  # first: from here on it is not a dataset
            _fsync_dir(p)
        with open(self.file(mf.INCOMPLETE_MARKER), "w") as f:
            f.write(f"packfmt build in progress (pid {os.getpid()}); no manifest yet\n")
        _fsync_dir(p)
        for e in ours - {mf.INCOMPLETE_MARKER, mf.MANIFEST_NAME}:
            os.unlink(self.file(e))

    def _prepare_remote(self) -> None:
        if self.store.exists(mf.MANIFEST_NAME):
            if not self.overwrite:
                raise DatasetExistsError(f"{self.url} already holds a dataset; use --overwrite (overwrite=True)")
            self.store.delete(mf.MANIFEST_NAME)  # first: from here on it is not a dataset
        self.store.put_bytes(mf.INCOMPLETE_MARKER, b"packfmt build in progress; no manifest yet\n")

    def created(self, name: str) -> str:
        """Record that this build creates ``name``; returns its local path (None when remote)."""
        self._created.append(name)
        return self.file(name) if self.local else None

    def open_shard(self, name: str, flags: int, dict_id: int):
        """A shard writer for ``name`` (call :meth:`created` first, in the process that may abort)."""
        if self.local:
            return _core.ShardWriter(self.file(name), flags, dict_id)
        return RemoteShardWriter(self.store, name, flags, dict_id)

    def put_atomic(self, name: str, data: bytes) -> None:
        self._created.append(name)
        if not self.local:
            self.store.put_bytes(name, data)
            return
        tmp = self.file(f".{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file(name))

    def commit(self, manifest: dict) -> None:
        self.put_atomic(mf.MANIFEST_NAME, mf.dump(manifest))
        if self.local:
            _fsync_dir(self.path)
        self.store.delete(mf.INCOMPLETE_MARKER)

    def abort(self) -> None:
        """Remove what this build created; the destination never held a manifest from it."""
        for name in self._created:
            try:
                self.store.delete(name)
            except OSError:
                pass
        try:
            self.store.delete(mf.INCOMPLETE_MARKER)
        except OSError:
            pass

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_created"} | {"_created": []}


def _is_ours(name: str) -> bool:
    return (name in (mf.MANIFEST_NAME, mf.INDEX_NAME, mf.DICTIONARY_NAME, mf.INCOMPLETE_MARKER)
            or re.fullmatch(r"shard-\d{5,}\.pack", name) is not None
            or re.fullmatch(r"(shard-g\d{4,}-[0-9a-f]{8}-\d{5,}\.pack|(index|dictionary)-g\d{4,}-[0-9a-f]{8}\.(arrow|zstd))",
                            name) is not None
            or re.fullmatch(r"\..*\.tmp-\d+", name) is not None)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def index_table(keys, shard, offset, stored_len, raw_len, checksum, flags, columns: dict) -> pa.Table:
    """The global index as an Arrow table: packfmt's columns, then the user's."""
    arrays = {
        "key": _key_array(keys),
        "shard": _numeric_array(shard, np.uint32),
        "offset": _numeric_array(offset, np.uint64),
        "stored_len": _numeric_array(stored_len, np.uint32),
        "raw_len": _numeric_array(raw_len, np.uint32),
        "checksum": _numeric_array(checksum, np.uint64),
        "flags": _numeric_array(flags, np.uint32),
    }
    for name, values in columns.items():
        if name in arrays:
            raise ValueError(f"user column {name!r} clashes with a packfmt index column")
        arrays[name] = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.table(arrays)


# pa.array() asks pandas whether its argument is "array-like", importing pandas on first use: 0.3 s
# and more of a short `pack build`.  The index columns are built from their buffers instead.
def _numeric_array(values, dtype) -> pa.Array:
    a = np.ascontiguousarray(np.asarray(values, dtype=dtype))
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(a)])


def _uint32_values(arr: pa.Array) -> np.ndarray:
    """The values of a uint32 Arrow array without nulls, as numpy, without going through pandas."""
    return np.frombuffer(arr.buffers()[1], dtype=np.uint32)[arr.offset: arr.offset + len(arr)]


def _key_array(keys) -> pa.Array:
    """Keys as one Arrow array: ``string`` (32-bit offsets), or ``large_string`` once they add up to 2 GiB
    or more (pyarrow would otherwise split them into several chunks)."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        arr = keys
    else:
        encoded = [k.encode("utf-8") for k in keys]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        total = int(lengths.sum())
        large = total >= 2**31 - 1
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64 if large else np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(encoded),
                                     [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.cast(pa.large_string()).combine_chunks() if arr.num_chunks > 1 else arr.chunk(0)
    return arr


def serialize_index(table: pa.Table) -> bytes:
    """One record batch, uncompressed, so every column maps zero-copy from the file."""
    table = table.combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=max(table.num_rows, 1)):
            w.write_batch(batch)
        if table.num_rows == 0:
            w.write_batch(pa.RecordBatch.from_pylist([], schema=table.schema))
    return sink.getvalue().to_pybytes()


def finish_dataset(target: Target, shards: list, table: pa.Table, compression: Compression,
                   dictionary, extra: dict | None = None) -> dict:
    """Write index, dictionary and — last — the manifest.  Returns the manifest."""
    index_bytes = serialize_index(table)
    target.put_atomic(mf.INDEX_NAME, index_bytes)
    dict_info = None
    if dictionary is not None:
        dbytes = dictionary.as_bytes()
        target.put_atomic(mf.DICTIONARY_NAME, dbytes)
        dict_info = {"name": mf.DICTIONARY_NAME, "size": len(dbytes), "checksum": mf.hex64(_core.xxh64(dbytes)),
                     "dict_id": dictionary.dict_id()}
    raw_bytes = sum(int(_uint32_values(c).sum(dtype=np.uint64)) for c in table.column("raw_len").chunks)
    stored_bytes = sum(s.data_bytes for s in shards)
    user_cols = [f.name for f in table.schema if f.name not in mf.INDEX_COLUMNS]
    manifest = {
        "format": mf.FORMAT_NAME,
        "format_version": mf.FORMAT_VERSION,
        "min_reader_version": mf.MIN_READER_VERSION,
        "samples": table.num_rows,
        "compression": {"codec": compression.codec, "level": compression.level, "dictionary": dict_info},
        "index": {"name": mf.INDEX_NAME, "size": len(index_bytes), "checksum": mf.hex64(_core.xxh64(index_bytes)),
                  "rows": table.num_rows, "columns": user_cols},
        "shards": [s.to_json() for s in shards],
        "stats": {"raw_bytes": raw_bytes, "stored_bytes": stored_bytes,
                  "total_bytes": sum(s.size for s in shards) + len(index_bytes)},
        "created": {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "by": f"packfmt {_version()}", "host": platform.node(), "user": _user()},
    }
    if extra:
        manifest.update(extra)
    target.commit(manifest)
    return manifest


def _version() -> str:
    from packfmt import __version__
    return __version__


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return ""


def check_key(key) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, got {type(key).__name__}")
    if not key or "\x00" in key:
        raise ValueError(f"invalid key {key!r}: keys are non-empty and contain no NUL")
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"invalid key {key!r}: not encodable as UTF-8") from None
    if n > MAX_KEY_BYTES:
        raise ValueError(f"key of {n} bytes is longer than the {MAX_KEY_BYTES}-byte limit")
    return key


class Writer:
    """Write samples into a new dataset.

    >>> import packfmt, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "ds")
    >>> with packfmt.Writer(out, shard_size="64MiB", compression="zstd") as w:
    ...     for i in range(3):
    ...         w.add(f"sample-{i}.txt", b"payload %d" % i, label=i % 2)
    >>> packfmt.open(out).get_batch([2, 0])
    [b'payload 2', b'payload 0']

    Samples keep the order they were added in; keys must be unique.  Extra keyword arguments to
    :meth:`add` become columns of the global index (``label=3``).  With ``compression="zstd-dict"`` the
    first samples (about ``100 * dict_size`` bytes) are held back to train a dictionary, then written.
    ``mode="append"`` adds samples to an existing dataset without touching its shards (new shards, a new
    index, the manifest replaced last; readers of the previous version are unaffected; see packfmt/merge.py).
    If the ``with`` block raises, nothing is published: no manifest is written and the shards are removed.
    """

    def __init__(self, url, *, shard_size=DEFAULT_SHARD_SIZE, compression="none", overwrite: bool = False,
                 dict_size: int = DEFAULT_DICT_SIZE, dict_train_bytes: int | None = None,
                 metadata: dict | None = None, storage_options: dict | None = None, mode: str = "create"):
        self.shard_size = parse_size(shard_size)
        self.compression = Compression.parse(compression)
        self.dict_size = dict_size
        self.dict_train_bytes = dict_train_bytes or 100 * dict_size
        self.metadata = metadata
        self._target = Target(url, overwrite=overwrite, storage_options=storage_options)
        if mode not in ("create", "append"):
            raise ValueError(f"mode must be 'create' or 'append', got {mode!r}")
        if mode == "create":
            self._target.prepare()
        self._dictionary = None
        self._encoder = None if self.compression.codec == "zstd-dict" else Encoder(self.compression)
        self._pending: list = []  # held back for dictionary training
        self._pending_bytes = 0
        self._shard: _core.ShardWriter | None = None
        self._shards: list[mf.ShardInfo] = []
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._cols = {k: [] for k in ("shard", "offset", "stored_len", "raw_len", "checksum", "flags")}
        self._user: dict[str, list] = {}
        self._closed = False
        self._shard_name = mf.shard_name
        self._append = None
        if mode == "append":  # see packfmt/merge.py: new shards and index under new names, manifest last
            from packfmt.merge import begin_append
            self._append = begin_append(self, storage_options)

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def __len__(self):
        return len(self._keys) + len(self._pending)

    def add(self, key: str, data, **columns) -> None:
        """Add one sample: ``key`` (unique str), ``data`` (bytes-like), user columns as keywords."""
        if self._closed:
            raise PackError("writer is closed")
        check_key(key)
        if key in self._seen:
            raise ValueError(f"duplicate key {key!r}")
        self._seen.add(key)
        data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        if len(data) > _core.MAX_RECORD_SIZE:
            raise ValueError(f"sample {key!r} of {len(data)} bytes exceeds the {_core.MAX_RECORD_SIZE}-byte limit")
        if self._encoder is None:  # still collecting dictionary training samples
            self._pending.append((key, bytes(data), columns))
            self._pending_bytes += len(data)
            if self._pending_bytes >= self.dict_train_bytes:
                self._start_encoding()
            return
        self._write(key, data, columns)

    def _start_encoding(self) -> None:
        self._dictionary = train_dictionary([p[1] for p in self._pending], self.dict_size, self.compression.level)
        self._encoder = Encoder(self.compression, self._dictionary)
        pending, self._pending = self._pending, []
        for key, data, columns in pending:
            self._write(key, data, columns)

    def _write(self, key, data, columns) -> None:
        stored, codec = self._encoder.encode(data)
        if self._shard is not None and self._shard.count and self._shard.size + len(stored) > self.shard_size:
            self._finish_shard()
        if self._shard is None:
            name = self._shard_name(len(self._shards))
            self._target.created(name)
            self._shard = self._target.open_shard(name, self._encoder.shard_flags, self._encoder.dict_id)
        offset, stored_len, checksum = self._shard.append(stored, len(data), codec)
        row = len(self._keys)
        self._keys.append(key)
        c = self._cols
        c["shard"].append(len(self._shards))
        c["offset"].append(offset)
        c["stored_len"].append(stored_len)
        c["raw_len"].append(len(data))
        c["checksum"].append(checksum)
        c["flags"].append(codec)
        for name, value in columns.items():
            col = self._user.get(name)
            if col is None:
                col = self._user[name] = [None] * row
            col.append(value)
        for col in self._user.values():
            if len(col) == row:
                col.append(None)

    def _finish_shard(self) -> None:
        s = self._shard.close()
        self._shards.append(mf.ShardInfo(name=self._shard_name(len(self._shards)), size=s["size"],
                                         records=s["records"], checksum=s["checksum"], data_bytes=s["data_bytes"]))
        self._shard = None

    def close(self) -> dict:
        """Finish the last shard, write the index and, last, the manifest.  Returns the manifest."""
        if self._closed:
            raise PackError("writer is closed")
        try:
            if self._encoder is None:
                self._start_encoding()
            if self._shard is not None:
                self._finish_shard()
            table = index_table(self._keys, self._cols["shard"], self._cols["offset"], self._cols["stored_len"],
                                self._cols["raw_len"], self._cols["checksum"], self._cols["flags"], self._user)
            extra = {"metadata": self.metadata} if self.metadata else None
            if self._append is not None:
                manifest = self._append.commit(self, table)
            else:
                manifest = finish_dataset(self._target, self._shards, table, self.compression, self._dictionary, extra)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; no dataset is published."""
        if self._closed:
            return
        self._closed = True
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        self._target.abort()
