"""Combining datasets without rewriting shards: ``pack merge`` and ``Writer(..., mode="append")``.

A dataset is whatever its manifest names, and shards are immutable, so combining datasets only needs the
shards to be reachable from the destination's manifest and a new global index:

* ``merge(dst, [src1, src2, ...])`` brings every shard of the sources into ``dst`` under new names (a hard
  link on a local filesystem when possible, a server-side ``CopyObject`` on S3, a streamed copy otherwise),
  then writes one index and, last, the manifest.  When ``dst`` already holds a dataset the sources are
  *appended* to it; its own shards are not touched.
* ``Writer(url, mode="append")`` writes new samples into new shards next to the existing ones and commits
  the same way.

Appending keeps readers of the previous version safe: every append writes its shards *and its index*
under names no other manifest or writer uses -- the generation number and a random tag,
``shard-g0001-3fa94c1e-00000.pack``, ``index-g0001-3fa94c1e.arrow`` -- and replaces ``manifest.json``
atomically at the very end.  A reader that loaded the old manifest keeps finding the old index and
shards; a reader that loads the new one sees the new ones.  Old indexes are left in place (a reader may
still be between reading the manifest and the index); they are garbage once no reader of that generation
is running, and a later ``overwrite`` removes them.  One committer at a time: a commit that finds the
manifest changed since it started (someone else appended meanwhile) fails and removes only its own
files (the random tag keeps two appenders from ever touching each other's).

Duplicate keys are detected across the whole result and reported by name (``DuplicateKeyError``), unless
``on_duplicate="allow"`` keeps both rows (``index_of`` then returns the first).

>>> import packfmt, tempfile, os
>>> d = tempfile.mkdtemp()
>>> for name, keys in (("a", ["x", "y"]), ("b", ["z"])):
...     with packfmt.Writer(os.path.join(d, name)) as w:
...         for k in keys:
...             w.add(k, k.encode())
>>> rep = merge(os.path.join(d, "ab"), [os.path.join(d, "a"), os.path.join(d, "b")])
>>> packfmt.open(os.path.join(d, "ab")).get_batch([0, 2])
[b'x', b'z']
"""

from __future__ import annotations

import datetime
import errno
import os
import platform
import re
import shutil
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from packfmt import _core
from packfmt import manifest as mf
from packfmt.errors import PackError

#: Largest object copied with a single CopyObject request (the S3 limit); bigger ones use multipart copy.
_MAX_SINGLE_COPY = 5 * 1024**3
_COPY_CHUNK = 8 << 20


class DuplicateKeyError(PackError, ValueError):
    """The result would hold the same key twice; ``keys`` lists (some of) them."""

    def __init__(self, message: str, keys=()):
        super().__init__(message)
        self.keys = list(keys)


class ConcurrentModificationError(PackError):
    """The destination's manifest changed while we were appending to it (another writer committed)."""


@dataclass
class MergeReport:
    generation: int = 0
    samples: int = 0
    added_samples: int = 0
    shards: int = 0
    added_shards: int = 0
    linked: int = 0         # shards brought in by hard link (local)
    server_copied: int = 0  # ... by a server-side copy (S3 CopyObject: no bytes through this machine)
    streamed: int = 0       # ... by reading and writing them (another filesystem, another store)
    bytes_streamed: int = 0
    manifest: dict | None = None
    names: list = field(default_factory=list)


# ---------------------------------------------------------------------------------- naming
def new_tag(generation: int) -> str | None:
    """Names of generation 0 are the plain ones; later generations add the generation and a random tag."""
    return None if generation == 0 else f"g{generation:04d}-{uuid.uuid4().hex[:8]}"


def shard_name(tag: str | None, i: int) -> str:
    return mf.shard_name(i) if tag is None else f"shard-{tag}-{i:05d}.pack"


def index_name(tag: str | None) -> str:
    return mf.INDEX_NAME if tag is None else f"index-{tag}.arrow"


def dictionary_name(tag: str | None) -> str:
    return mf.DICTIONARY_NAME if tag is None else f"dictionary-{tag}.zstd"


# ---------------------------------------------------------------------------------- copying
def _same_s3_service(a, b) -> bool:
    keys = ("endpoint_url", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "profile_name",
            "anon")
    return all(a.options.get(k) == b.options.get(k) for k in keys)


def copy(src_store, src_name: str, dst_store, dst_name: str, size: int | None = None) -> str:
    """Make ``dst_store/dst_name`` a copy of ``src_store/src_name``; returns how: "link", "server" or "stream".

    Local to local: a hard link (same inode: shards are never modified), or a copy through a temporary
    file when linking is not possible (other filesystem).  S3 to S3 with the same credentials: a
    server-side copy (no bytes through this machine).  Anything else: a streamed copy through
    ``open_write`` (a multipart upload on S3, aborted on failure).  The destination appears whole or not at
    all; an existing object of that name is replaced.
    """
    if src_store.is_local and dst_store.is_local:
        src, dst = src_store.local_path(src_name), dst_store.local_path(dst_name)
        tmp = os.path.join(os.path.dirname(dst), f".{dst_name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.link(src, tmp)
            how = "link"
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            how = "stream"
            try:
                with open(src, "rb") as fi, open(tmp, "wb") as fo:
                    shutil.copyfileobj(fi, fo, _COPY_CHUNK)
                    fo.flush()
                    os.fsync(fo.fileno())
            except BaseException:
                _unlink(tmp)
                raise
        try:
            os.replace(tmp, dst)
        except BaseException:
            _unlink(tmp)
            raise
        return how
    if src_store.scheme == "s3" and dst_store.scheme == "s3" and _same_s3_service(src_store, dst_store):
        _s3_server_copy(src_store, src_name, dst_store, dst_name, size)
        return "server"
    total = src_store.size(src_name) if size is None else size
    w = dst_store.open_write(dst_name)
    try:
        for off in range(0, total, _COPY_CHUNK):
            w.write(src_store.read_ranges(src_name, [(off, min(_COPY_CHUNK, total - off))])[0])
        w.close()
    except BaseException:
        w.abort()
        raise
    return "stream"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _s3_server_copy(src, src_name, dst, dst_name, size) -> None:
    source = {"Bucket": src.bucket, "Key": src.key(src_name)}
    if size is None:
        size = src.size(src_name)
    if size <= _MAX_SINGLE_COPY:
        dst._retrying(lambda: dst._call("COPY", dst_name, dst.client.copy_object, CopySource=source),
                      dst_name, "CopyObject")
        return
    # Multipart copy: UploadPartCopy per 1 GiB range; aborted on any failure (no orphan parts).
    part = 1024**3
    resp = dst._retrying(lambda: dst._call("CREATE_MULTIPART", dst_name, dst.client.create_multipart_upload),
                         dst_name, "CreateMultipartUpload")
    upload_id = resp["UploadId"]
    try:
        parts = []
        for n, off in enumerate(range(0, size, part), start=1):
            rng = f"bytes={off}-{min(off + part, size) - 1}"
            r = dst._retrying(lambda: dst._call("UPLOAD_PART_COPY", dst_name, dst.client.upload_part_copy,
                                                UploadId=upload_id, PartNumber=n, CopySource=source,
                                                CopySourceRange=rng), dst_name, f"UploadPartCopy {n} of")
            parts.append({"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]})
        dst._retrying(lambda: dst._call("COMPLETE_MULTIPART", dst_name, dst.client.complete_multipart_upload,
                                        UploadId=upload_id, MultipartUpload={"Parts": parts}),
                      dst_name, "CompleteMultipartUpload")
    except BaseException:
        try:
            dst._call("ABORT_MULTIPART", dst_name, dst.client.abort_multipart_upload, UploadId=upload_id)
        except Exception:
            pass
        raise


def abort_stale_uploads(store, names=None, pattern: str | None = None) -> int:
    """Abort unfinished multipart uploads to ``names`` (or names matching ``pattern``) on an S3 store.

    A task killed with SIGKILL cannot abort its own upload; the coordinator calls this once no task of
    the job is running any more.  Returns how many uploads were aborted.  No-op on other stores.
    """
    if store.scheme != "s3":
        return 0
    wanted = set(names or ())
    rx = re.compile(pattern) if pattern else None
    prefix = store.key("")
    aborted = 0
    kwargs = {"Bucket": store.bucket, "Prefix": prefix}
    while True:
        store.stats.count("LIST_UPLOADS")
        resp = store.client.list_multipart_uploads(**kwargs)
        for u in resp.get("Uploads", []):
            name = u["Key"][len(prefix):]
            if name in wanted or (rx is not None and rx.fullmatch(name)):
                try:
                    store._call("ABORT_MULTIPART", name, store.client.abort_multipart_upload, UploadId=u["UploadId"])
                    aborted += 1
                except Exception:
                    pass
        if not resp.get("IsTruncated"):
            return aborted
        kwargs.update(KeyMarker=resp.get("NextKeyMarker", ""), UploadIdMarker=resp.get("NextUploadIdMarker", ""))


# ---------------------------------------------------------------------------------- index helpers
def find_duplicates(keys, limit: int = 20) -> tuple:
    """(number of keys occurring more than once, up to ``limit`` of them).

    Hashes every key with XXH64 in C (as ``Dataset.index_of`` does), sorts the hashes, and compares
    only the strings whose hashes collide: ~10x faster than counting the strings themselves.
    """
    import pyarrow.compute as pc  # imported on use: 25-60 ms, and `pack` loads this module
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    n = len(keys)
    if n < 2:
        return 0, []
    wide = keys.type == pa.large_string()
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64 if wide else np.int32)
    offsets = offsets[keys.offset: keys.offset + n + 1].astype(np.int64)
    data = keys.buffers()[2]
    hashes = np.empty(n, dtype=np.uint64)
    _core.hash_strings(np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8),
                       offsets, hashes)
    order = np.argsort(hashes)
    h = hashes[order]
    same = np.flatnonzero(h[1:] == h[:-1])
    if not len(same):
        return 0, []
    candidates = np.unique(np.r_[order[same], order[same + 1]])
    counts = pc.value_counts(keys.take(pa.array(candidates)))
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return len(dup), dup.slice(0, limit).to_pylist()


def check_duplicates(table: pa.Table, on_duplicate: str, where: str) -> None:
    if on_duplicate not in ("error", "allow"):
        raise ValueError(f"on_duplicate must be 'error' or 'allow', got {on_duplicate!r}")
    if on_duplicate == "allow":
        return
    n, some = find_duplicates(table.column("key"))
    if n:
        shown = ", ".join(repr(k) for k in some) + (", ..." if n > len(some) else "")
        raise DuplicateKeyError(f"{where}: {n} key(s) would occur more than once: {shown} "
                                f"(pass on_duplicate='allow' to keep both rows)", some)


def concat_indexes(tables: list, shard_offsets: list) -> pa.Table:
    """Concatenate index tables, renumbering shards; user columns are unioned (missing values null)."""
    import pyarrow.compute as pc  # imported on use: 25-60 ms, and `pack` loads this module
    parts = []
    for t, off in zip(tables, shard_offsets):
        t = t.set_column(t.schema.get_field_index("shard"), "shard",
                         pc.add(t.column("shard"), pa.scalar(off, pa.uint32())).cast(pa.uint32()))
        if t.schema.field("key").type != pa.large_string():
            t = t.set_column(0, "key", t.column("key").cast(pa.large_string()))
        parts.append(t)
    try:
        out = pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"the datasets' user columns have incompatible types: {e}") from None
    keys = out.column("key")
    key_bytes = int(pc.sum(pc.binary_length(keys)).as_py() or 0) if len(keys) else 0
    if key_bytes < 2**31 - 1:  # the common case: 32-bit offsets, like every other index
        out = out.set_column(0, "key", keys.cast(pa.string()))
    ordered = list(mf.INDEX_COLUMNS) + [n for n in out.schema.names if n not in mf.INDEX_COLUMNS]
    return out.select(ordered).combine_chunks()


def _compression(manifests: list) -> dict:
    codecs = [m["compression"]["codec"] for m in manifests]
    codec = "zstd-dict" if "zstd-dict" in codecs else "zstd" if "zstd" in codecs else "none"
    levels = {m["compression"].get("level") for m in manifests if m["compression"]["codec"] != "none"}
    return {"codec": codec, "level": levels.pop() if len(levels) == 1 else None}


def _uses_dictionary(ds) -> bool:
    return bool(len(ds) and np.any(ds.codecs == _core.CODEC_ZSTD_DICT))


# ---------------------------------------------------------------------------------- commit
def commit_generation(target, generation: int, tag: str | None, shards: list, table: pa.Table, compression: dict,
                      dict_info: dict | None, extra: dict | None = None, expect_manifest: bytes | None = None) -> dict:
    """Write the index of ``generation`` under its own name, then (last) the manifest.

    ``shards`` are ShardInfo of every shard the new manifest names (old and new).  With
    ``expect_manifest``, the current manifest must still be exactly those bytes (one writer at a time).
    """
    import pyarrow.compute as pc  # imported on use: 25-60 ms, and `pack` loads this module
    from packfmt.writer import _user, _version, serialize_index
    index_bytes = serialize_index(table)
    iname = index_name(tag)
    target.put_atomic(iname, index_bytes)
    raw_bytes = int(pc.sum(table.column("raw_len")).as_py() or 0) if table.num_rows else 0
    manifest = {
        "format": mf.FORMAT_NAME,
        "format_version": mf.FORMAT_VERSION,
        "min_reader_version": mf.MIN_READER_VERSION,
        "samples": table.num_rows,
        "compression": dict(compression, dictionary=dict_info),
        "index": {"name": iname, "size": len(index_bytes), "checksum": mf.hex64(_core.xxh64(index_bytes)),
                  "rows": table.num_rows, "columns": [f.name for f in table.schema if f.name not in mf.INDEX_COLUMNS]},
        "shards": [s.to_json() for s in shards],
        "stats": {"raw_bytes": raw_bytes, "stored_bytes": sum(s.data_bytes for s in shards),
                  "total_bytes": sum(s.size for s in shards) + len(index_bytes)},
        "created": {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "by": f"packfmt {_version()}", "host": platform.node(), "user": _user()},
        "generation": generation,
    }
    if extra:
        manifest.update(extra)
    data = mf.dump(manifest)
    mf.Manifest.parse(data, target.url)  # never publish a manifest we would refuse to read
    if expect_manifest is not None:
        try:
            now = target.store.read_bytes(mf.MANIFEST_NAME)
        except FileNotFoundError:
            now = None
        if now != expect_manifest:
            raise ConcurrentModificationError(
                f"{target.url}: the manifest changed while appending (another writer committed); nothing published")
    if generation == 0:
        target.commit(manifest)
    else:  # appending: no marker to remove, only the manifest to replace atomically
        target.put_atomic(mf.MANIFEST_NAME, data)
        target._created.remove(mf.MANIFEST_NAME)  # an abort after this point must not delete it
        if target.local:
            from packfmt.writer import _fsync_dir
            _fsync_dir(target.path)
    return manifest


class _Base:
    """The dataset being appended to: its manifest bytes, parsed manifest, index and dictionary."""

    def __init__(self, target, storage_options):
        import packfmt
        try:
            self.manifest_bytes = target.store.read_bytes(mf.MANIFEST_NAME)
        except FileNotFoundError:
            self.manifest_bytes = None
            self.ds = None
            return
        self.ds = packfmt.open(target.store, storage_options=storage_options, cache=False)
        self.generation = int(self.ds.manifest.get("generation", 0)) + 1
        self.tag = new_tag(self.generation)

    @property
    def shards(self) -> list:
        return list(self.ds._manifest.shards)


# ---------------------------------------------------------------------------------- Writer(mode="append")
class AppendSession:
    """State of a ``Writer(url, mode="append")``: installed into the writer by :func:`begin_append`."""

    def __init__(self, writer, base: _Base):
        self.base = base
        self.generation = base.generation
        self.tag = base.tag
        self.writer = writer

    def commit(self, writer, table: pa.Table) -> dict:
        base = self.base.ds
        full = concat_indexes([base.index, table], [0, len(base.shards)])
        check_duplicates(full, "error", writer._target.url)
        m = [base.manifest, {"compression": {"codec": writer.compression.codec, "level": writer.compression.level}}]
        if not len(table):
            m = m[:1]
        extra = {"metadata": writer.metadata} if writer.metadata else None
        return commit_generation(writer._target, self.generation, self.tag, self.base.shards + writer._shards, full,
                                 _compression(m), base.manifest["compression"].get("dictionary"), extra,
                                 expect_manifest=self.base.manifest_bytes)


def begin_append(writer, storage_options=None) -> AppendSession:
    """Set up ``writer`` to add samples to the dataset at its target (which must exist)."""
    from packfmt.errors import DatasetNotFoundError
    from packfmt.writer import Encoder
    base = _Base(writer._target, storage_options)
    if base.ds is None:
        raise DatasetNotFoundError(f"no packfmt dataset at {writer._target.url} to append to "
                                   f"(use mode='create' to make one)")
    s = AppendSession(writer, base)
    writer._shard_name = lambda i, tag=s.tag: shard_name(tag, i)
    writer._seen = set(base.ds.keys.to_pylist())
    if writer.compression.codec == "zstd-dict":
        info = base.ds._manifest.dictionary
        if info is None:
            raise ValueError(f"{writer._target.url} has no dictionary to append zstd-dict records with; "
                             f"append with compression='zstd'")
        writer._dictionary = base.ds._dictionary()
        writer._encoder = Encoder(writer.compression, writer._dictionary)
    return s


# ---------------------------------------------------------------------------------- merge
def merge(dst, sources, *, on_duplicate: str = "error", storage_options: dict | None = None,
          source_options: dict | None = None, progress=None) -> MergeReport:
    """Combine the datasets ``sources`` into ``dst`` (created, or appended to when it holds a dataset).

    No shard is rewritten: the sources' shards are linked or copied into ``dst`` under new names and a
    new index and manifest are written.  Sample order: ``dst``'s own samples first (when appending), then
    each source's samples in the order given.  Duplicate keys raise :class:`DuplicateKeyError` naming
    them (``on_duplicate="allow"`` keeps both rows).  ``progress(nbytes)`` is called after each shard.
    ``storage_options`` are for ``dst`` and, unless ``source_options`` is given, for sources on the same
    kind of store.
    """
    import packfmt
    from packfmt.writer import Target
    if on_duplicate not in ("error", "allow"):
        raise ValueError(f"on_duplicate must be 'error' or 'allow', got {on_duplicate!r}")
    if not sources:
        raise ValueError("merge needs at least one source dataset")
    target = Target(dst, storage_options=storage_options)
    def options_for(src):  # by default a source on the destination's kind of store shares its options
        if source_options is not None:
            return source_options
        same = str(src).split("://")[0] == str(target.url).split("://")[0] and "://" in str(src)
        return storage_options if same else None
    srcs = [packfmt.open(s, storage_options=options_for(s), cache=False) for s in sources]
    for s in srcs:
        if s._store.url == target.store.url:
            raise ValueError(f"cannot merge {s.url} into itself")
    base = _Base(target, storage_options)
    generation = 0 if base.ds is None else base.generation
    tag = None if base.ds is None else base.tag
    # One dictionary per dataset: zstd-dict records of different dictionaries cannot share a manifest.
    dicts = {}
    for ds in ([base.ds] if base.ds is not None else []) + srcs:
        info = ds._manifest.dictionary
        if info is not None and (_uses_dictionary(ds) or ds is base.ds):
            dicts.setdefault(info["checksum"], (ds, info))
    if len(dicts) > 1:
        raise ValueError("the datasets use different zstd dictionaries; merging them would need re-encoding "
                         "(merge datasets built with the same dictionary, or with compression zstd)")
    old_shards = base.shards if base.ds is not None else []
    tables = ([base.ds.index] if base.ds is not None else []) + [s.index for s in srcs]
    offsets, n = [], len(old_shards)
    if base.ds is not None:
        offsets.append(0)
    for s in srcs:
        offsets.append(n)
        n += len(s.shards)
    full = concat_indexes(tables, offsets)
    check_duplicates(full, on_duplicate, target.url)
    rep = MergeReport(generation=generation)
    if base.ds is None:
        target.prepare()
    try:
        new_shards = []
        j = 0
        for s in srcs:
            for info in s._manifest.shards:
                name = shard_name(tag, j)
                j += 1
                target.created(name)
                how = copy(s._store, info.name, target.store, name, info.size)
                if how == "link":
                    rep.linked += 1
                elif how == "server":
                    rep.server_copied += 1
                else:
                    rep.streamed += 1
                    rep.bytes_streamed += info.size
                got = target.store.size(name)
                if got != info.size:
                    raise PackError(f"copy of {s._store.object_url(info.name)} to {target.store.object_url(name)} "
                                    f"has {got} bytes, expected {info.size}")
                new_shards.append(mf.ShardInfo(name=name, size=info.size, records=info.records,
                                               checksum=info.checksum, data_bytes=info.data_bytes))
                rep.names.append(name)
                if progress is not None:
                    progress(info.size)
        dict_info = None
        if dicts:
            ds, info = next(iter(dicts.values()))
            if base.ds is not None and ds is base.ds:
                dict_info = base.ds.manifest["compression"]["dictionary"]
            else:
                dname = dictionary_name(tag)
                target.created(dname)
                copy(ds._store, info["name"], target.store, dname, info["size"])
                dict_info = dict(ds.manifest["compression"]["dictionary"], name=dname)
        manifests = [d.manifest for d in ([base.ds] if base.ds is not None else []) + srcs]
        extra = {"merged_from": [s.url for s in srcs]}
        rep.manifest = commit_generation(target, generation, tag, old_shards + new_shards, full, _compression(manifests),
                                         dict_info, extra, expect_manifest=base.manifest_bytes)
    except BaseException:
        target.abort()
        abort_stale_uploads(target.store, target._created) if target.store.scheme == "s3" else None
        raise
    rep.samples = rep.manifest["samples"]
    rep.added_samples = sum(len(s) for s in srcs)
    rep.shards = len(rep.manifest["shards"])
    rep.added_shards = len(new_shards)
    return rep


# ---------------------------------------------------------------------------------- CLI
def cmd_merge(a) -> int:
    from packfmt.cli import human
    rep = merge(a.dst, a.sources, on_duplicate="allow" if a.allow_duplicates else "error")
    if not a.quiet:
        verb = "appended" if rep.generation else "merged"
        print(f"{verb} {rep.added_samples:,} samples in {rep.added_shards} shard(s) from {len(a.sources)} "
              f"dataset(s) into {a.dst}: {rep.samples:,} samples in {rep.shards} shards, generation "
              f"{rep.generation} (shards: {rep.linked} linked, {rep.server_copied} copied server-side, "
              f"{rep.streamed} streamed, {human(rep.bytes_streamed)})")
    return 0


def register_cli(subparsers) -> None:
    m = subparsers.add_parser(
        "merge", help="combine datasets into DST without rewriting shards",
        description="Combine the datasets SRC... into DST. If DST holds a dataset, the sources are appended "
                    "to it (its shards are not touched, readers of the previous version keep working); "
                    "otherwise DST is created. Shards are hard-linked (local) or copied server-side (S3); "
                    "only a new index and manifest are written. Duplicate keys are an error.")
    m.add_argument("dst", metavar="DST")
    m.add_argument("sources", metavar="SRC", nargs="+")
    m.add_argument("--allow-duplicates", action="store_true",
                   help="keep samples whose key already occurs (index_of returns the first)")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_merge)


__all__ = ["merge", "copy", "MergeReport", "DuplicateKeyError", "ConcurrentModificationError",
           "abort_stale_uploads", "begin_append"]
