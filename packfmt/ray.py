"""Ray Data integration: write any Ray Dataset as a packfmt dataset, read one in parallel, build on a cluster.

Writing (:class:`PackDatasink`, :func:`write_pack`).  Rows hold a key, the sample bytes and optional user
columns, e.g. ``ray.data.read_binary_files(root, include_paths=True)`` (columns ``bytes`` and ``path``)::

    import ray, packfmt.ray
    ds = ray.data.read_binary_files("/data/images", include_paths=True)
    packfmt.ray.write_pack(ds, "s3://bucket/images.pack", key_column="path", strip_prefix="/data/images/")

Every write task writes its own shards under deterministic names ``part-<task>-<n>.pack`` (a retried task
rewrites the same names) and returns its *part index* (an Arrow table) through the object store.  One
commit on the driver merges the part indexes into the global index, checks keys are unique, writes
``index.arrow`` and, last, ``manifest.json``.  Sample order of the result: sorted by key (``order="key"``,
the default: independent of how Ray scheduled the tasks), or ``order="input"`` (task order, then row
order within a task).  A failed job publishes nothing: the driver removes the part shards and the build
marker, and on S3 aborts every unfinished multipart upload of the job (a task killed with SIGKILL cannot
abort its own).

Reading (:class:`PackDatasource`, :func:`read_pack`): read tasks cover disjoint row ranges of the global
index, cut at shard boundaries when the index is in shard order, so every row is read exactly once and
each task touches few shards; reads go through ``Dataset.get_batch`` (range coalescing, checksums, the
page cache for remote data).  Blocks have columns ``key``, ``bytes`` and the user columns.

Building (:func:`run_build_tasks`, used by ``pack build --engine ray``): the driver walks and plans shards
exactly like the local engine, then runs one Ray task per planned shard with the same ``build_shard``
code and commits on the driver, so both engines give the same dataset, shard for shard.  Shards are
written by the tasks straight to the destination: an ``s3://`` prefix, or a local path that every node
sees (a shared filesystem; on one machine any path).
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from packfmt import _core
from packfmt import manifest as mf
from packfmt.errors import PackError
from packfmt.merge import abort_stale_uploads, check_duplicates, concat_indexes
from packfmt.writer import (DEFAULT_SHARD_SIZE, Compression, Encoder, Target, check_key, finish_dataset, index_table,
                            parse_size)

#: Names of the shards a datasink write task creates: part-<task index>-<shard number>.pack
PART_PATTERN = r"part-\d{5,}-\d{5,}\.pack"


def part_name(task: int, n: int) -> str:
    return f"part-{task:05d}-{n:05d}.pack"


def ensure_ray(address: str | None = None):
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``, or start a local one) unless connected."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    return ray


def _unwrap(exc: BaseException) -> BaseException:
    """The user's exception inside a RayTaskError (so callers see UnreadableFileError, not Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


# ------------------------------------------------------------------------------------ pack build --engine ray
def _build_shard_task(task: dict) -> dict:
    from packfmt.build import build_shard
    target = task["target"]
    if target.local:  # a retry after the previous attempt was killed finds its partial file (O_EXCL)
        target.store.delete(task["name"])
    return build_shard(task)


def run_build_tasks(tasks: list, address: str | None = None, progress=None) -> list:
    """Run ``packfmt.build.build_shard`` for every task as a Ray task; results in task order.

    On failure, the tasks still running are cancelled and waited for (so none writes after the caller's
    cleanup), then the task's own exception is raised.  On S3, unfinished uploads of these shards (left by
    killed attempts) are aborted whatever the outcome.
    """
    ensure_ray(address)
    fn = ray.remote(num_cpus=1, max_retries=3)(_build_shard_task)
    refs = [fn.remote(t) for t in tasks]
    pending = {r: i for i, r in enumerate(refs)}
    results: list = [None] * len(tasks)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for r in done:
                i = pending.pop(r)
                try:
                    results[i] = ray.get(r)
                except ray.exceptions.RayTaskError as e:
                    raise _unwrap(e) from None
                if progress is not None:
                    progress(len(tasks[i]["paths"]), int(np.asarray(tasks[i]["sizes"]).sum()))
    except BaseException:
        for r in pending:
            ray.cancel(r, force=True)
        for r in pending:
            try:
                ray.get(r)
            except Exception:
                pass
        raise
    finally:
        if tasks:
            store = tasks[0]["target"].store
            abort_stale_uploads(store, [t["name"] for t in tasks])
    return results


# ------------------------------------------------------------------------------------ writing: the datasink
class _PartWriter:
    """The shards of one write task, cut at ``shard_size``; collects the part index."""

    def __init__(self, target: Target, task: int, shard_size: int, encoder: Encoder):
        self.target, self.task, self.shard_size, self.encoder = target, task, shard_size, encoder
        self.shards: list = []
        self.shard = None
        self.cols = {k: [] for k in ("shard", "offset", "stored_len", "raw_len", "checksum", "flags")}

    def add(self, data: bytes) -> None:
        stored, codec = self.encoder.encode(data)
        if self.shard is not None and self.shard.count and self.shard.size + len(stored) > self.shard_size:
            self._finish()
        if self.shard is None:
            name = part_name(self.task, len(self.shards))
            if self.target.local:
                self.target.store.delete(name)  # left by a killed attempt of this same task
            self.shard = self.target.open_shard(name, self.encoder.shard_flags, self.encoder.dict_id)
        offset, stored_len, checksum = self.shard.append(stored, len(data), codec)
        c = self.cols
        c["shard"].append(len(self.shards))
        c["offset"].append(offset)
        c["stored_len"].append(stored_len)
        c["raw_len"].append(len(data))
        c["checksum"].append(checksum)
        c["flags"].append(codec)

    def _finish(self) -> None:
        s = self.shard.close()
        self.shards.append(mf.ShardInfo(name=part_name(self.task, len(self.shards)), size=s["size"],
                                        records=s["records"], checksum=s["checksum"], data_bytes=s["data_bytes"]))
        self.shard = None

    def close(self) -> None:
        if self.shard is not None:
            self._finish()

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None


class PackDatasink(Datasink):
    """Writes a Ray Dataset as one packfmt dataset at ``url`` (a path every node sees, or ``s3://``).

    ``key_column`` / ``data_column``: the columns holding the key (str) and the sample (bytes);
    ``strip_prefix``: removed from the start of every key (e.g. the root of ``read_binary_files``);
    ``columns``: user columns to keep in the index (default: every other column);
    ``order``: ``"key"`` (default) or ``"input"``; ``on_duplicate``: ``"error"`` or ``"allow"``;
    ``compression``: ``none``, ``zstd[:L]``, or ``zstd-dict[:L]`` with ``dictionary=`` (bytes of a zstd
    dictionary trained beforehand, e.g. with ``packfmt.writer.train_dictionary`` on a sample of rows).
    After the write, :attr:`manifest` holds the published manifest.
    """

    def __init__(self, url, *, key_column: str = "key", data_column: str = "bytes", columns=None,
                 strip_prefix: str | None = None, shard_size=DEFAULT_SHARD_SIZE, compression="none",
                 dictionary: bytes | None = None, order: str = "key", on_duplicate: str = "error",
                 overwrite: bool = False, storage_options: dict | None = None, metadata: dict | None = None):
        if order not in ("key", "input"):
            raise ValueError(f"order must be 'key' or 'input', got {order!r}")
        if on_duplicate not in ("error", "allow"):
            raise ValueError(f"on_duplicate must be 'error' or 'allow', got {on_duplicate!r}")
        self.compression = Compression.parse(compression)
        if self.compression.codec == "zstd-dict" and dictionary is None:
            raise ValueError("compression zstd-dict needs dictionary= (train one on a sample of the rows with "
                             "packfmt.writer.train_dictionary); or use zstd")
        self.dictionary = dictionary
        self.key_column, self.data_column = key_column, data_column
        self.columns = None if columns is None else list(columns)
        self.strip_prefix = strip_prefix
        self.shard_size = parse_size(shard_size)
        self.order, self.on_duplicate = order, on_duplicate
        self.metadata = metadata
        self.target = Target(url, overwrite=overwrite, storage_options=storage_options)
        self.manifest: dict | None = None

    # -- Ray Data callbacks
    def get_name(self) -> str:
        return "PackfmtWrite"

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    def on_write_start(self, schema=None) -> None:
        self.target.prepare()

    def _dictionary(self):
        if self.dictionary is None:
            return None
        import zstandard
        return zstandard.ZstdCompressionDict(self.dictionary)

    def write(self, blocks, ctx) -> dict:
        pw = _PartWriter(self.target, int(ctx.task_idx), self.shard_size, Encoder(self.compression, self._dictionary()))
        keys, users = [], []
        try:
            for block in blocks:
                t = BlockAccessor.for_block(block).to_arrow()
                if not t.num_rows:
                    continue
                for col in (self.key_column, self.data_column):
                    if col not in t.schema.names:
                        raise KeyError(f"packfmt datasink: rows have no {col!r} column (columns: {t.schema.names}); "
                                       f"set key_column= / data_column=")
                kcol = t.column(self.key_column).to_pylist()
                if self.strip_prefix:
                    p = self.strip_prefix
                    kcol = [k[len(p):] if isinstance(k, str) and k.startswith(p) else k for k in kcol]
                for k in kcol:
                    check_key(k)
                for chunk in t.column(self.data_column).chunks:
                    for v in chunk.to_pylist():
                        pw.add(b"" if v is None else bytes(v))
                keys.extend(kcol)
                user = self.columns if self.columns is not None else [
                    n for n in t.schema.names if n not in (self.key_column, self.data_column)]
                users.append(t.select(user))
            pw.close()
            self._check_job_alive(pw)
        except BaseException:
            pw.abort()
            raise
        c = pw.cols
        user_cols = {}
        if users:
            ut = pa.concat_tables(users, promote_options="permissive").combine_chunks()
            user_cols = {n: ut.column(n).chunk(0) if ut.column(n).num_chunks else pa.array([], ut.schema.field(n).type)
                         for n in ut.schema.names}
        part = index_table(pa.array(keys, type=pa.string()), c["shard"], c["offset"], c["stored_len"], c["raw_len"],
                           c["checksum"], c["flags"], user_cols)
        return {"task": int(ctx.task_idx), "shards": pw.shards, "index": part}

    def _check_job_alive(self, pw: "_PartWriter") -> None:
        """After this task's shards are written: if the job already failed (another task died and
        :meth:`_cleanup` removed the build marker, which it does *before* listing the part shards), this
        task's shards may have landed after that listing; remove them and fail.  Either the cleanup's
        listing sees a shard, or the shard's task sees the marker gone: none is left behind."""
        store = self.target.store
        if store.exists(mf.INCOMPLETE_MARKER):
            return
        for info in pw.shards:
            try:
                store.delete(info.name)
            except OSError:
                pass
        raise PackError(f"packfmt datasink: the write to {self.target.url} was aborted while task {pw.task} ran "
                        f"(another task failed); its part shards were removed")

    def on_write_complete(self, write_result) -> None:
        try:
            parts = sorted((r for r in write_result.write_returns if r), key=lambda r: r["task"])
            shards, tables, offsets = [], [], []
            for p in parts:
                offsets.append(len(shards))
                shards.extend(p["shards"])
                tables.append(p["index"])
            if tables:
                table = concat_indexes(tables, offsets)
            else:
                table = index_table(pa.array([], pa.string()), [], [], [], [], [], [], {})
            if self.order == "key" and table.num_rows:
                table = table.take(pc.sort_indices(table, [("key", "ascending")]))
            check_duplicates(table, self.on_duplicate, self.target.url)
            extra = {"metadata": self.metadata} if self.metadata else None
            self.manifest = finish_dataset(self.target, shards, table, self.compression, self._dictionary(), extra)
        except BaseException:
            self._cleanup()
            raise
        abort_stale_uploads(self.target.store, pattern=PART_PATTERN)

    def on_write_failed(self, error: Exception) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove every part shard of this job, the build marker and whatever the commit wrote.

        The part names are not all known to the driver (a failed task does not report), so the
        destination is listed here — the writing side may list; readers never do.
        """
        target, store = self.target, self.target.store
        try:  # first: a task still running sees the job is over (see _check_job_alive)
            store.delete(mf.INCOMPLETE_MARKER)
        except OSError:
            pass
        rx = re.compile(PART_PATTERN)
        if target.local:
            try:
                names = [n for n in os.listdir(target.path) if rx.fullmatch(n)]
            except FileNotFoundError:
                names = []
        else:
            names = _list_names(store, "part-", rx)
            abort_stale_uploads(store, pattern=PART_PATTERN)
        for n in names:
            try:
                store.delete(n)
            except OSError:
                pass
        target.abort()


def _list_names(store, prefix: str, rx) -> list:
    if store.scheme != "s3":
        return []
    out, kwargs = [], {"Bucket": store.bucket, "Prefix": store.key(prefix)}
    base = len(store.key(""))
    while True:
        store.stats.count("LIST")
        resp = store.client.list_objects_v2(**kwargs)
        out.extend(o["Key"][base:] for o in resp.get("Contents", []) if rx.fullmatch(o["Key"][base:]))
        if not resp.get("IsTruncated"):
            return out
        kwargs["ContinuationToken"] = resp["NextContinuationToken"]


def write_pack(dataset, url, *, ray_remote_args: dict | None = None, **options) -> dict:
    """Write the Ray Dataset ``dataset`` as a packfmt dataset at ``url``; returns the manifest.

    ``options`` are those of :class:`PackDatasink`.
    """
    sink = PackDatasink(url, **options)
    dataset.write_datasink(sink, ray_remote_args=ray_remote_args or {})
    return sink.manifest


# ------------------------------------------------------------------------------------ reading: the datasource
def split_rows(shard_of: np.ndarray, parts: int) -> list:
    """Cut rows [0, n) into at most ``parts`` disjoint ranges covering all of them, at shard boundaries
    when the index is in shard order (each range then reads whole shards), else evenly."""
    n = len(shard_of)
    parts = max(1, min(int(parts), n))
    if n == 0:
        return []
    even = np.linspace(0, n, parts + 1).round().astype(np.int64)
    if n > 1 and np.all(shard_of[1:] >= shard_of[:-1]):
        starts = np.flatnonzero(np.r_[True, shard_of[1:] != shard_of[:-1]])  # first row of every shard
        if len(starts) >= parts:
            cuts = starts[np.searchsorted(starts, even[1:-1], side="left").clip(0, len(starts) - 1)]
            even = np.unique(np.r_[0, cuts, n])
    bounds = np.unique(even)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class PackDatasource(Datasource):
    """Reads a packfmt dataset as a Ray Dataset with columns ``key``, ``bytes`` and the user columns.

    ``columns``: user columns to include (default all); ``batch_rows``: rows per block;
    ``storage_options`` / ``cache``: as for :func:`packfmt.open`.
    """

    def __init__(self, url, *, columns=None, batch_rows: int = 1024, storage_options: dict | None = None,
                 cache=None, **open_options):
        import packfmt
        self.url = url
        self._ds = packfmt.open(url, storage_options=storage_options, cache=cache, **open_options)
        self.columns = self._ds.columns if columns is None else list(columns)
        missing = set(self.columns) - set(self._ds.columns)
        if missing:
            raise KeyError(f"{url}: no user column(s) {sorted(missing)}; the dataset has {self._ds.columns}")
        self.batch_rows = max(1, int(batch_rows))

    def get_name(self) -> str:
        return "Packfmt"

    def estimate_inmemory_data_size(self) -> int:
        return int(self._ds.raw_lengths.sum(dtype=np.uint64)) if len(self._ds) else 0

    def _schema(self) -> pa.Schema:
        idx = self._ds.index.schema
        return pa.schema([pa.field("key", pa.string()), pa.field("bytes", pa.binary())]
                         + [idx.field(c) for c in self.columns])

    def _read(self, a: int, b: int):
        ds = self._ds
        table = ds.index
        for s in range(a, b, self.batch_rows):
            e = min(b, s + self.batch_rows)
            data = ds.get_batch(np.arange(s, e))
            cols = {"key": table.column("key").slice(s, e - s).cast(pa.string()),
                    "bytes": pa.array(data, type=pa.binary())}
            for c in self.columns:
                cols[c] = table.column(c).slice(s, e - s)
            yield pa.table(cols, schema=self._schema())

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        raw = self._ds.raw_lengths
        schema = self._schema()
        tasks = []
        for a, b in split_rows(self._ds.shard_of, parallelism):
            meta = BlockMetadata(num_rows=b - a, size_bytes=int(raw[a:b].sum(dtype=np.uint64)), exec_stats=None,
                                 input_files=None)
            tasks.append(ReadTask(lambda a=a, b=b: self._read(a, b), meta, schema=schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def read_pack(url, *, override_num_blocks: int | None = None, ray_remote_args: dict | None = None, **options):
    """A Ray Dataset over the packfmt dataset at ``url``; ``options`` are those of :class:`PackDatasource`.

    >>> # import packfmt.ray; packfmt.ray.read_pack("s3://bucket/images.pack").map_batches(decode)
    """
    extra = {"ray_remote_args": ray_remote_args} if ray_remote_args else {}
    return ray.data.read_datasource(PackDatasource(url, **options), override_num_blocks=override_num_blocks, **extra)


__all__ = ["PackDatasink", "PackDatasource", "write_pack", "read_pack", "run_build_tasks", "ensure_ray",
           "split_rows"]
