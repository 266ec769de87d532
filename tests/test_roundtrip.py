"""Round trips through ``packfmt.Writer`` and ``packfmt.open``, with the shape of the I/O varied by hypothesis.

Sizes from 0 bytes to several MiB, unicode keys, every compression mode, tiny shard sizes (so records
fall on every side of a shard boundary), random batch orders with repeats and negative indices, both
read paths (mmap and pread), user columns with missing values, pickling and fork.  Plus the Writer's
rules: unique keys, nothing published when the ``with`` block raises, existing datasets refused.
"""

import hashlib
import math
import multiprocessing
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packfmt
from packfmt import _core

MiB = 1 << 20
COMPRESSIONS = ["none", "zstd", "zstd:19", "zstd-dict"]


def payload(seed: int, size: int, kind: int) -> bytes:
    """Deterministic bytes: kind 0 incompressible, 1 repetitive, 2 text-like (compresses, shares a vocabulary)."""
    if size == 0:
        return b""
    if kind == 0:
        out = bytearray()
        block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
        while len(out) < size:
            block = hashlib.sha256(block).digest()
            out += block
        return bytes(out[:size])
    if kind == 1:
        unit = b"%d:" % seed + b"abcdefgh" * (seed % 5 + 1)
        return (unit * (size // len(unit) + 1))[:size]
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"{\"label\": ", b"}, ", b"\n"]
    out = bytearray()
    i = seed
    while len(out) < size:
        out += words[(i * 2654435761 >> 7) % len(words)]
        out += str(i % 97).encode()
        i += 1
    return bytes(out[:size])


keys_st = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=24
)
small_size = st.one_of(st.just(0), st.integers(0, 64), st.integers(0, 5000), st.integers(0, 70_000))
record_st = st.tuples(small_size, st.integers(0, 2), st.integers(0, 2**31))


def write(path, records, compression="none", shard_size="256MiB", columns=None, **kw):
    """records: list of (key, bytes).  columns: list of dicts of user columns per record."""
    with packfmt.Writer(path, shard_size=shard_size, compression=compression, **kw) as w:
        for i, (key, data) in enumerate(records):
            w.add(key, data, **(columns[i] if columns else {}))
    return path


def check_dataset(ds, records):
    assert len(ds) == len(records)
    for i, (key, data) in enumerate(records):
        assert ds.key(i) == key
        assert ds[i] == data
        assert ds[i - len(records)] == data
    assert ds.get_batch([]) == []
    assert list(ds) == [d for _, d in records]


@given(
    recs=st.lists(record_st, min_size=0, max_size=40),
    keys=st.lists(keys_st, min_size=40, max_size=40, unique=True),
    compression=st.sampled_from(COMPRESSIONS),
    shard_size=st.one_of(st.integers(1, 400), st.integers(400, 100_000), st.just(256 * MiB)),
    use_mmap=st.booleans(),
    batches=st.lists(st.lists(st.integers(-10**6, 10**6), max_size=60), min_size=1, max_size=4),
)
def test_roundtrip(tmp_path_factory, recs, keys, compression, shard_size, use_mmap, batches):
    records = [(keys[i], payload(seed, size, kind)) for i, (size, kind, seed) in enumerate(recs)]
    path = write(tmp_path_factory.mktemp("rt") / "ds", records, compression, shard_size,
                 dict_size=1024, dict_train_bytes=4096)
    ds = packfmt.open(path, mmap=use_mmap)
    check_dataset(ds, records)
    n = len(records)
    m = ds.manifest
    assert m["samples"] == n
    assert sum(s["records"] for s in m["shards"]) == n
    assert m["compression"]["codec"] == compression.split(":")[0]
    # Shard roll-over: a shard only exceeds shard_size when it holds a single record.
    for s in m["shards"]:
        assert s["records"] >= 1
        assert s["records"] == 1 or s["size"] - s["records"] * _core.ENTRY_SIZE - _core.FOOTER_SIZE <= shard_size
    # Samples keep their order across shards.
    if n:
        assert np.all(np.diff(ds.shard_of.astype(np.int64)) >= 0)
        assert ds.shard_of[-1] == len(m["shards"]) - 1
    # Random batches with repeats and negative indices.
    for batch in batches:
        idx = [b % (2 * n) - n for b in batch] if n else []
        assert ds.get_batch(idx) == [records[i][1] for i in idx]
        assert ds.get_batch(np.array(idx, dtype=np.int64)) == [records[i][1] for i in idx]
    for i, (key, _) in enumerate(records):
        assert ds.index_of(key) == i
        assert key in ds
    # Stored lengths: incompressible records are kept raw, zstd never makes a record bigger.
    assert np.all(ds.stored_lengths <= ds.raw_lengths)
    if compression == "none":
        assert not np.any(ds.codecs)
    assert np.all((ds.codecs != 0) <= (ds.stored_lengths < ds.raw_lengths))


@settings(max_examples=max(4, settings.default.max_examples // 25))
@given(
    sizes=st.lists(st.sampled_from([0, 1, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 5 * MiB]), min_size=1, max_size=4),
    compression=st.sampled_from(["none", "zstd", "zstd-dict"]),
    use_mmap=st.booleans(),
    kind=st.sampled_from([0, 1]),
)
def test_large_records(tmp_path_factory, sizes, compression, use_mmap, kind):
    # Records larger than the writer's 1 MiB buffer and the reader's coalescing limits.
    records = [(f"big/{i}.bin", payload(i + 1, size, kind)) for i, size in enumerate(sizes)]
    path = write(tmp_path_factory.mktemp("big") / "ds", records, compression, shard_size=4 * MiB)
    for m in (use_mmap, not use_mmap):
        ds = packfmt.open(path, mmap=m)
        check_dataset(ds, records)
        order = list(range(len(records)))[::-1] * 2
        assert ds.get_batch(order) == [records[i][1] for i in order]


def test_zstd_19_large_record(tmp_path):
    data = payload(7, 3 * MiB + 5, 2)
    path = write(tmp_path / "ds", [("k", data), ("e", b"")], "zstd:19")
    ds = packfmt.open(path)
    assert ds.manifest["compression"] == {"codec": "zstd", "level": 19, "dictionary": None}
    assert ds.codecs.tolist() == [_core.CODEC_ZSTD, _core.CODEC_NONE]
    assert ds.stored_lengths[0] < len(data) // 10
    assert ds.get_batch([1, 0, -2]) == [b"", data, data]


def test_zstd_dict_uses_a_trained_dictionary(tmp_path):
    records = [(f"doc/{i:04d}.json", payload(i, 300 + i % 200, 2)) for i in range(400)]
    records.append(("noise.bin", payload(1, 2000, 0)))  # incompressible: stored raw
    records.append(("empty", b""))
    path = write(tmp_path / "ds", records, "zstd-dict", shard_size=16 * 1024, dict_size=4096)
    ds = packfmt.open(path)
    d = ds.manifest["compression"]["dictionary"]
    assert d is not None and d["name"] == "dictionary.zstd" and d["size"] == (path / "dictionary.zstd").stat().st_size
    assert d["dict_id"] != 0
    codecs = ds.codecs
    assert np.all(codecs[:400] == _core.CODEC_ZSTD_DICT)
    assert codecs[400] == _core.CODEC_NONE and codecs[401] == _core.CODEC_NONE
    # Every shard that holds dictionary records names the dictionary in its header.
    for i, name in enumerate(ds.shards):
        info = _core.Shard(str(path / name)).info
        assert info["dict_id"] == d["dict_id"]
        assert info["flags"] == _core.SHARD_HAS_ZSTD | _core.SHARD_HAS_DICT
    assert len(ds.shards) > 1
    rng = np.random.default_rng(0)
    idx = rng.integers(-len(records), len(records), size=500)
    assert ds.get_batch(idx) == [records[i][1] for i in idx]
    check_dataset(ds, records)
    # Smaller than plain zstd on KB-sized samples: the point of the dictionary.
    plain = packfmt.open(write(tmp_path / "plain", records, "zstd", shard_size=16 * 1024))
    assert int(ds.stored_lengths.sum()) < int(plain.stored_lengths.sum())


def test_zstd_dict_with_too_little_to_train_falls_back(tmp_path):
    records = [("a", b"hello world" * 3), ("b", b"")]
    ds = packfmt.open(write(tmp_path / "ds", records, "zstd-dict"))
    assert ds.manifest["compression"]["dictionary"] is None
    assert _core.CODEC_ZSTD_DICT not in ds.codecs.tolist()
    check_dataset(ds, records)


values_st = {
    "int": st.one_of(st.none(), st.integers(-2**62, 2**62)),
    "float": st.one_of(st.none(), st.floats(allow_nan=False, width=64)),
    "str": st.one_of(st.none(), st.text(max_size=10)),
}


@given(
    n=st.integers(1, 30),
    spec=st.dictionaries(st.sampled_from(["label", "weight", "caption", "z"]), st.sampled_from(list(values_st)),
                         min_size=1, max_size=4),
    data=st.data(),
)
def test_user_columns(tmp_path_factory, n, spec, data):
    cols = [{name: data.draw(values_st[kind]) for name, kind in spec.items()} for _ in range(n)]
    cols = [{k: v for k, v in c.items() if v is not None or data.draw(st.booleans())} for c in cols]
    seen = {k for c in cols for k in c}
    records = [(f"s{i}", b"%d" % i) for i in range(n)]
    path = write(tmp_path_factory.mktemp("cols") / "ds", records, columns=cols, shard_size=64)
    ds = packfmt.open(path)
    check_dataset(ds, records)
    present = [k for k in seen if any(c.get(k) is not None for c in cols)]
    for name in present:
        assert name in ds.columns
        kind = spec[name]
        got = ds.index.column(name).to_pylist()
        want = [c.get(name) for c in cols]
        if kind == "float":
            assert all((w is None and g is None) or (w is not None and g == w) for g, w in zip(got, want))
        else:
            assert got == want
        arr = ds.column(name)
        assert len(arr) == n
        if kind == "int" and all(w is not None for w in want):
            assert arr.dtype.kind == "i" and arr.tolist() == want
        if kind in ("int", "float") and any(w is None for w in want):
            # missing numeric values come back as NaN
            assert all(math.isnan(a) if w is None else a == float(w) for a, w in zip(arr.tolist(), want)), (arr, want)
    assert ds.manifest["index"]["columns"] == [c for c in ds.index.schema.names
                                               if c not in ("key", "shard", "offset", "stored_len", "raw_len",
                                                            "checksum", "flags")]


def test_index_of_missing_and_hash_collisions_are_safe(tmp_path):
    records = [(k, k.encode()) for k in ["a", "b", "ä", "日本/語.txt", "a/", " a", "A"]]
    ds = packfmt.open(write(tmp_path / "ds", records))
    for i, (k, _) in enumerate(records):
        assert ds.index_of(k) == i
    for missing in ["", "c", "a ", "日本"]:
        with pytest.raises(KeyError):
            ds.index_of(missing)
        assert missing not in ds


def test_out_of_range_indices(tmp_path):
    ds = packfmt.open(write(tmp_path / "ds", [("a", b"1"), ("b", b"2")]))
    for bad in (2, -3, 10**12):
        with pytest.raises(IndexError):
            ds[bad]
        with pytest.raises(IndexError):
            ds.get_batch([0, bad])
    with pytest.raises(TypeError):
        ds.get_batch([0.5])
    assert ds[0:2] == [b"1", b"2"] and ds[::-1] == [b"2", b"1"]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_get_batch_index_forms(tmp_path, compression):
    # Every form of indices gives the same answer: lists, int64 arrays (the fast path straight into the C
    # core once the dataset has read a batch), other integer dtypes, non-contiguous and 2-D arrays.
    records = _sample_records(20)
    ds = packfmt.open(write(tmp_path / "ds", records, compression))
    want = lambda idx: [records[i][1] for i in idx]  # noqa: E731
    idx = [3, -1, 0, 3, -20, 19]
    for _ in range(2):  # the first call primes the fast path
        assert ds.get_batch(np.array(idx, dtype=np.int64)) == want(idx)
        assert ds.get_batch(idx) == want(idx)
    for dt in (np.int32, np.int16, np.uint64, np.uint8):
        assert ds.get_batch(np.array([5, 1, 5], dtype=dt)) == want([5, 1, 5])
    a = np.arange(20, dtype=np.int64)
    assert ds.get_batch(a[::-3]) == want(a[::-3].tolist())  # not contiguous
    assert ds.get_batch(a[:6].reshape(2, 3)) == want(range(6))
    assert ds.get_batch(np.zeros(0, dtype=np.int64)) == []
    for bad in ([20], [-21], [0, 10**12], [-(2**63)]):
        with pytest.raises(IndexError, match="out of range"):
            ds.get_batch(np.array(bad, dtype=np.int64))
    with pytest.raises(TypeError):
        ds.get_batch(np.array([0.0, 1.0]))
    if compression == "none":  # the low-level call wraps negative rows too
        assert ds._shardset.read_rows(np.array([-1, 0], dtype=np.int64)) == [records[-1][1], records[0][1]]


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(
    sizes=st.lists(st.one_of(st.integers(0, 64), st.integers(0, 5000)), max_size=60),
    compression=st.sampled_from(["none", "zstd"]),
    use_mmap=st.booleans(),
    batch_size=st.integers(1, 70),
    picks=st.none() | st.lists(st.integers(0, 10**6), max_size=80),
)
def test_iteration_and_iter_batches(tmp_path_factory, sizes, compression, use_mmap, batch_size, picks):
    # iter(ds) yields every sample in order; iter_batches cuts the given indices (default: all, in order;
    # negative ones count from the end, repeats allowed) into consecutive batches of batch_size.
    records = [(f"k{i}", payload(i, n, i % 3)) for i, n in enumerate(sizes)]
    ds = packfmt.open(write(tmp_path_factory.mktemp("it") / "ds", records, compression), mmap=use_mmap)
    n = len(records)
    it = iter(ds)
    assert iter(it) is it
    assert list(it) == [d for _, d in records] and list(it) == []
    idx = list(range(n)) if picks is None or not n else [p % (2 * n) - n for p in picks]
    batches = list(ds.iter_batches(batch_size, indices=None if picks is None else idx))
    assert [len(b) for b in batches] == [min(batch_size, len(idx) - k) for k in range(0, len(idx), batch_size)]
    assert [x for b in batches for x in b] == [records[i][1] for i in idx]


def test_iter_batches_checks_its_arguments_up_front(tmp_path):
    ds = packfmt.open(write(tmp_path / "ds", _sample_records(5)))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            next(ds.iter_batches(bad))
    with pytest.raises(TypeError):
        next(ds.iter_batches(2.5))
    batches = ds.iter_batches(2, indices=[0, 1, 2, 5])
    with pytest.raises(IndexError):  # before the first batch, not when reaching the bad index
        next(batches)
    assert list(ds.iter_batches(10)) == [[d for _, d in _sample_records(5)]]


def test_empty_dataset(tmp_path):
    path = write(tmp_path / "ds", [])
    ds = packfmt.open(path)
    assert len(ds) == 0 and ds.shards == [] and ds.get_batch([]) == [] and list(ds) == []
    with pytest.raises(IndexError):
        ds[0]


# ---------------------------------------------------------------- pickling and fork

def _sample_records(n=50):
    return [(f"k/{i}", payload(i, (i * 37) % 700, i % 3)) for i in range(n)]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_pickle(tmp_path, compression):
    records = _sample_records()
    ds = packfmt.open(write(tmp_path / "ds", records, compression, shard_size=2000), mmap=False)
    assert ds[3] == records[3][1]  # shards opened in the parent
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # a URL and options, not the index or file handles
    ds2 = pickle.loads(blob)
    check_dataset(ds2, records)
    assert ds2._options["mmap"] is False


def _child_reads(ds, idx, q):
    try:
        q.put(("ok", ds.get_batch(idx), ds[idx[0]], ds.index_of(ds.key(idx[0]))))
    except BaseException as e:  # report, do not hang the parent
        q.put(("error", repr(e), None, None))


@pytest.mark.parametrize("method,use_mmap", [("fork", True), ("fork", False), ("spawn", False)])
def test_multiprocessing_child_reads(tmp_path, method, use_mmap):
    records = _sample_records()
    ds = packfmt.open(write(tmp_path / "ds", records, "zstd", shard_size=3000), mmap=use_mmap)
    idx = [49, 0, 7, 7, -1, 23]
    parent = ds.get_batch(idx)  # the parent has shards open before forking
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(ds, idx, q))
    p.start()
    status, batch, one, pos = q.get(timeout=60)
    p.join(60)
    assert status == "ok", batch
    assert p.exitcode == 0
    assert batch == parent == [records[i][1] for i in idx]
    assert one == records[49][1] and pos == 49
    assert ds.get_batch(idx) == parent  # the parent's handles still work


# ---------------------------------------------------------------- Writer rules

def test_duplicate_key_raises(tmp_path):
    with pytest.raises(ValueError, match="duplicate key"):
        with packfmt.Writer(tmp_path / "ds") as w:
            w.add("a", b"1")
            w.add("b", b"2")
            w.add("a", b"3")
    assert not (tmp_path / "ds" / "manifest.json").exists()


@pytest.mark.parametrize("bad", ["", "a\x00b", 5, b"bytes"])
def test_invalid_keys(tmp_path, bad):
    with packfmt.Writer(tmp_path / "ds") as w:
        with pytest.raises((TypeError, ValueError)):
            w.add(bad, b"x")
        w.add("fine", b"y")
    assert packfmt.open(tmp_path / "ds")[0] == b"y"


@pytest.mark.parametrize("compression", ["none", "zstd", "zstd-dict"])
def test_exception_inside_with_publishes_nothing(tmp_path, compression):
    out = tmp_path / "ds"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with packfmt.Writer(out, shard_size=500, compression=compression) as w:
            for i in range(100):
                w.add(f"k{i}", payload(i, 100, 2))
            raise Boom()
    assert not (out / "manifest.json").exists()
    left = sorted(os.listdir(out)) if out.exists() else []
    assert not [f for f in left if f.endswith(".pack") or f in ("index.arrow", "dictionary.zstd")], left
    with pytest.raises(packfmt.DatasetNotFoundError):
        packfmt.open(out)
    # The directory can be written again afterwards.
    write(out, [("x", b"1")])
    assert packfmt.open(out)[0] == b"1"


def test_writer_not_closed_is_not_a_dataset(tmp_path):
    out = tmp_path / "ds"
    w = packfmt.Writer(out, shard_size=100)
    for i in range(20):
        w.add(f"k{i}", b"x" * 30)
    # Shards exist on disk, the manifest does not: nothing opens.
    assert any(f.endswith(".pack") for f in os.listdir(out))
    assert (out / ".packfmt-incomplete").exists()
    with pytest.raises(packfmt.DatasetNotFoundError, match="interrupted"):
        packfmt.open(out)
    w.close()
    assert not (out / ".packfmt-incomplete").exists()
    assert len(packfmt.open(out)) == 20
    with pytest.raises(packfmt.PackError):
        w.add("more", b"")


def test_existing_dataset_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    write(out, [("a", b"old"), ("b", b"old2")], shard_size=10)
    with pytest.raises(packfmt.DatasetExistsError):
        packfmt.Writer(out)
    with pytest.raises(FileExistsError):  # DatasetExistsError is a FileExistsError too
        write(out, [("a", b"new")])
    assert packfmt.open(out)[0] == b"old"
    write(out, [("c", b"new")], overwrite=True)
    ds = packfmt.open(out)
    assert len(ds) == 1 and ds[0] == b"new" and ds.key(0) == "c"
    assert ds.shards == ["shard-00000.pack"]
    assert not (out / "shard-00001.pack").exists()  # the old dataset's second shard is gone


def test_non_empty_directory_refused(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(packfmt.DatasetExistsError):
        packfmt.Writer(out)
    assert (out / "precious.txt").read_text() == "mine"


def test_sizes_and_compression_specs(tmp_path):
    with pytest.raises(ValueError):
        packfmt.Writer(tmp_path / "a", compression="lz4")
    with pytest.raises(ValueError):
        packfmt.Writer(tmp_path / "b", shard_size="12 parsecs")
    with pytest.raises(ValueError):
        packfmt.Writer(tmp_path / "c", compression="zstd:99")
    ds = packfmt.open(write(tmp_path / "d", [("a", b"a" * 1000)], "zstd:1", shard_size="1KiB"))
    assert ds.manifest["compression"]["level"] == 1 and ds[0] == b"a" * 1000


def test_file_url(tmp_path):
    records = _sample_records(5)
    write(tmp_path / "ds", records)
    check_dataset(packfmt.open(f"file://{tmp_path / 'ds'}"), records)


def test_reading_never_lists(tmp_path, monkeypatch):
    records = _sample_records(30)
    path = write(tmp_path / "ds", records, "zstd", shard_size=1000)

    def no_listing(*a, **k):
        raise AssertionError("a reader listed a directory")

    monkeypatch.setattr(os, "listdir", no_listing)
    monkeypatch.setattr(os, "scandir", no_listing)
    ds = packfmt.open(path)
    check_dataset(ds, records)


def test_opening_does_not_read_shards(tmp_path):
    records = _sample_records(30)
    path = write(tmp_path / "ds", records, shard_size=1000)
    for name in packfmt.open(path).shards:
        os.chmod(path / name, 0)
    if os.access(path / "shard-00000.pack", os.R_OK):
        # root ignores permissions: remove the shards instead and check only that open() succeeds
        for name in packfmt.open(path).shards:
            os.unlink(path / name)
    ds = packfmt.open(path)
    assert len(ds) == 30 and ds.key(5) == "k/5" and ds.index_of("k/29") == 29
    with pytest.raises(OSError):
        ds[0]
