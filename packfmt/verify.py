"""``pack verify``: check every byte of a dataset against its checksums and every structure against
the others (manifest, global index, each shard's own index and footer)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from packfmt import _core
from packfmt.errors import PackError

_ENTRY = np.dtype([("offset", "<u8"), ("stored_len", "<u4"), ("raw_len", "<u4"), ("checksum", "<u8"),
                   ("flags", "<u4"), ("reserved", "<u4")])


@dataclass
class VerifyReport:
    samples: int = 0
    shards: int = 0
    bytes_checked: int = 0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_index(path: str, info: dict) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(info["index_offset"])
        data = f.read(info["records"] * _core.ENTRY_SIZE)
    return np.frombuffer(data, dtype=_ENTRY)


class _LocalShard:
    """A local shard, validated and checked by the C reader."""

    def __init__(self, ds, s):
        self.path = ds._store.local_path(s.name)
        self._shard = _core.Shard(self.path, expected_size=s.size)
        self.info = self._shard.info

    def hash_range(self, a, b):
        return self._shard.hash_range(a, b)

    def entries(self):
        return _read_index(self.path, self.info)

    def verify_records(self, entries, max_report):
        return self._shard.verify_records(0, self.info["records"], max_report)

    def close(self):
        self._shard.close()


class _RemoteShard:
    """A remote shard, downloaded whole (one shard at a time) and checked with the same C code."""

    def __init__(self, ds, s):
        self.data = ds._store.read_ranges(s.name, [(0, s.size)])[0]
        tail = _core.ENTRY_SIZE * s.records + _core.FOOTER_SIZE
        name = ds._store.object_url(s.name)
        self.info = _core.check_tail(self.data[-tail:] if tail <= len(self.data) else self.data, len(self.data), name)
        head = self.data[:_core.HEADER_SIZE]
        if head[:8] != _core.MAGIC or _core.xxh64(head[:24]) != int.from_bytes(head[24:32], "little"):
            raise PackError(f"{name}: bad shard header (magic or checksum)")
        self.info["dict_id"] = int.from_bytes(head[16:20], "little")

    def hash_range(self, a, b):
        return _core.xxh64(memoryview(self.data)[a:b])  # whole-file checksum: XXH64

    def entries(self):
        off = self.info["index_offset"]
        return np.frombuffer(self.data, dtype=_ENTRY, count=self.info["records"], offset=off)

    def verify_records(self, entries, max_report):
        view = memoryview(self.data)
        bad = []
        for k, e in enumerate(entries):
            o = int(e["offset"])
            if _core.xxh3_64(view[o:o + int(e["stored_len"])]) != int(e["checksum"]):  # record: XXH3-64
                bad.append(k)
        return bad[:max_report], len(bad)

    def close(self):
        self.data = None


def verify_dataset(ds, progress=None, max_report: int = 1000) -> VerifyReport:
    """Check ``ds`` (an open local Dataset).  ``progress(nbytes)`` is called as bytes are checked."""
    m = ds._manifest
    rep = VerifyReport(samples=m.samples, shards=len(m.shards))
    cols = ds._cols
    shard_col = cols["shard"]
    order = np.lexsort((cols["offset"], shard_col))  # rows grouped by shard, by offset
    bounds = np.searchsorted(shard_col[order], np.arange(len(m.shards) + 1))

    def problem(msg):
        if len(rep.problems) < max_report:
            rep.problems.append(msg)

    for i, s in enumerate(m.shards):
        try:
            shard = _LocalShard(ds, s) if not ds._remote else _RemoteShard(ds, s)
        except (PackError, OSError) as e:
            problem(f"{s.name}: {e}")
            if progress:
                progress(s.size)
            continue
        try:
            info = shard.info
            if info["records"] != s.records:
                problem(f"{s.name}: shard holds {info['records']} records, the manifest says {s.records}")
            want_dict = m.dictionary["dict_id"] if m.dictionary is not None else None
            if info["flags"] & _core.SHARD_HAS_DICT and info.get("dict_id", want_dict) != want_dict:
                problem(f"{s.name}: shard was compressed with dictionary {info['dict_id']}, the dataset's is {want_dict}")
            whole = shard.hash_range(0, info["file_size"])
            if whole != s.checksum:
                problem(f"{s.name}: file checksum {whole:016x} differs from the manifest's {s.checksum:016x}")
            entries = shard.entries()
            bad, nbad = shard.verify_records(entries, max_report)
            for rec in bad:
                e = entries[rec]
                problem(f"{s.name}: record {rec} at offset {int(e['offset'])}: checksum mismatch"
                        + _sample_name(ds, order[bounds[i]:bounds[i + 1]], int(e["offset"])))
            if nbad > len(bad):
                problem(f"{s.name}: {nbad - len(bad)} more records with a checksum mismatch")
            rows = order[bounds[i]:bounds[i + 1]]
            if len(rows) != len(entries):
                problem(f"{s.name}: global index has {len(rows)} samples in this shard, its own index {len(entries)}")
            else:
                for name in ("offset", "stored_len", "raw_len", "checksum", "flags"):
                    diff = np.flatnonzero(cols[name][rows] != entries[name])
                    if len(diff):
                        r = int(rows[diff[0]])
                        problem(f"{s.name}: global index row {r} (key {ds.key(r)!r}) disagrees with the shard's "
                                f"index on {name} ({len(diff)} rows differ)")
            rep.bytes_checked += info["file_size"]
        finally:
            shard.close()
        if progress:
            progress(s.size)
    if m.dictionary is not None:
        try:
            ds._dictionary()
        except PackError as e:
            problem(str(e))
    return rep


def _sample_name(ds, rows: np.ndarray, offset: int) -> str:
    hit = rows[ds._cols["offset"][rows] == offset]
    if len(hit) == 0:
        return ""
    r = int(hit[0])
    return f" (sample {r}, key {ds.key(r)!r})"
