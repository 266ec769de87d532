"""Helpers that damage or forge datasets for the corruption, regression and fuzz tests.

Two kinds of damage:
  * accidents -- bytes flipped or cut anywhere, files lost: every checksum that covers them still
    holds its old value, so packfmt must notice;
  * a hostile producer -- someone who rewrites a structure *and* fixes every checksum that covers it
    (``rewrite_index``, ``rewrite_shard_entry``), so only packfmt's structural checks stand between
    the reader and wrong bytes, out-of-bounds reads or huge allocations.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa

import packfmt
from packfmt import _core
from packfmt.writer import serialize_index

HEADER, ENTRY, FOOTER = _core.HEADER_SIZE, _core.ENTRY_SIZE, _core.FOOTER_SIZE

#: Running under tools/sanitize_tests.sh (ASan preloaded)?  ASan reserves terabytes of address space for
#: its shadow memory, so tests that bound a child with RLIMIT_AS cannot run there.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
NEEDS_RLIMIT_AS = __import__("pytest").mark.skipif(
    UNDER_ASAN, reason="bounds a child with RLIMIT_AS, which ASan's shadow memory cannot live with")


def payload(i: int) -> bytes:
    """Deterministic sample bytes of assorted sizes (0 bytes included), distinct per sample."""
    sizes = [0, 1, 7, 100, 1000, 4096, 33, 250, 3000, 12]
    n = sizes[i % len(sizes)]
    return (b"<%05d>" % i * (n // 7 + 1))[:n]


def make_dataset(path, n: int = 30, compression: str = "none", shard_size: int = 8000) -> list:
    """Write a dataset of n samples (several shards); returns the payloads."""
    payloads = [payload(i) for i in range(n)]
    with packfmt.Writer(str(path), shard_size=shard_size, compression=compression) as w:
        for i, p in enumerate(payloads):
            w.add(f"d{i % 4}/s{i:04d}.bin", p, label=i % 3)
    return payloads


def copy(src, dst) -> str:
    shutil.copytree(str(src), str(dst), symlinks=True)
    return str(dst)


def manifest(d) -> dict:
    with open(os.path.join(str(d), "manifest.json")) as f:
        return json.load(f)


def write_manifest(d, m: dict) -> None:
    with open(os.path.join(str(d), "manifest.json"), "w") as f:
        json.dump(m, f)


def read_index(d) -> pa.Table:
    with pa.memory_map(os.path.join(str(d), "index.arrow")) as src:
        return pa.ipc.open_file(src).read_all()


def rewrite_index(d, table: pa.Table) -> None:
    """Replace the global index and make the manifest agree with it (a hostile producer)."""
    raw = serialize_index(table)
    with open(os.path.join(str(d), "index.arrow"), "wb") as f:
        f.write(raw)
    m = manifest(d)
    m["index"]["size"] = len(raw)
    m["index"]["checksum"] = f"{_core.xxh64(raw):016x}"
    write_manifest(d, m)


def set_index_cell(d, column: str, row: int, value) -> None:
    t = read_index(d)
    values = t.column(column).to_pylist()
    values[row] = value
    typ = t.schema.field(column).type
    rewrite_index(d, t.set_column(t.schema.get_field_index(column), column, pa.array(values, type=typ)))


def flip(path, pos: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def shard_path(d, i: int = 0) -> str:
    return os.path.join(str(d), f"shard-{i:05d}.pack")


def footer(path) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    fp = len(data) - FOOTER
    return {"pos": fp, "index_offset": int.from_bytes(data[fp:fp + 8], "little"),
            "count": int.from_bytes(data[fp + 8:fp + 16], "little"), "size": len(data)}


def repair_shard(data: bytearray) -> bytearray:
    """Recompute the header, index and footer checksums of a shard image (not the records')."""
    data[24:32] = _core.xxh64(bytes(data[:24])).to_bytes(8, "little")
    fp = len(data) - FOOTER
    io = int.from_bytes(data[fp:fp + 8], "little")
    data[fp + 16:fp + 24] = _core.xxh64(bytes(data[io:fp])).to_bytes(8, "little")
    data[fp + 32:fp + 40] = _core.xxh64(bytes(data[fp:fp + 32])).to_bytes(8, "little")
    return data


def rewrite_shard(path, edit) -> None:
    """Apply edit(bytearray) to a shard image, then repair its checksums (a hostile producer)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    edit(data)
    with open(path, "wb") as f:
        f.write(repair_shard(data))


def set_entry_field(path, record: int, field: str, value: int) -> None:
    """Set a field of a shard's own index entry and repair the checksums."""
    pos, width = {"offset": (0, 8), "stored_len": (8, 4), "raw_len": (12, 4), "checksum": (16, 8),
                  "flags": (24, 4), "reserved": (28, 4)}[field]
    info = footer(path)

    def edit(data):
        e = info["index_offset"] + record * ENTRY + pos
        data[e:e + width] = (value % (1 << (8 * width))).to_bytes(width, "little")

    rewrite_shard(path, edit)


def fix_manifest_shard_sizes(d) -> None:
    """After a shard changed size, make the manifest's size/checksum agree (a hostile producer)."""
    m = manifest(d)
    for s in m["shards"]:
        p = os.path.join(str(d), s["name"])
        with open(p, "rb") as f:
            data = f.read()
        s["size"] = len(data)
        s["checksum"] = f"{_core.xxh64(data):016x}"
    write_manifest(d, m)


def read_everything(ds, payloads=None) -> None:
    """Read every sample every way; when payloads are given, every returned sample must equal them."""
    n = len(ds)
    got = [ds[i] for i in range(n)]
    batch = ds.get_batch(np.arange(n)[::-1])[::-1]
    assert got == batch
    if payloads is not None:
        assert got == payloads
