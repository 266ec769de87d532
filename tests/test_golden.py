"""Golden files freeze format version 1.

tests/data/golden/{raw,zstd,zstd-dict}/ were written by tools/make_golden.py.  Reading them must give the samples
that script defines; writing those samples again must give the same shard bytes, the same index content
and the same manifest (minus the ``created`` block, which records time, host and user).  A change to
these bytes is a format change: bump the format version and regenerate on purpose.

zstd's compressed output (and a trained dictionary) is not guaranteed identical across libzstd versions
(that is not a packfmt format change), so the zstd datasets' *re-written* bytes are compared exactly only
under the libzstd that wrote the golden files (recorded in golden.json); reading the golden zstd files is
checked everywhere.
"""

import importlib.util
import json
import math
import os
import struct

import pyarrow as pa
import pytest
import xxhash
import zstandard

import packfmt
from packfmt import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_golden", os.path.join(ROOT, "tools", "make_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_golden = _load_tool()
SAMPLES = make_golden.SAMPLES
NAMES = ["raw", "zstd", "zstd-dict"]
with open(os.path.join(GOLDEN, "golden.json")) as f:
    GOLDEN_INFO = json.load(f)
SAME_ZSTD = ".".join(map(str, zstandard.ZSTD_VERSION)) == GOLDEN_INFO["written_with"]["zstd"]

# The first header and footer of the raw dataset, byte for byte (see docs/format.md, "Footer").
RAW_SHARD0_HEADER = bytes.fromhex(
    "89 50 41 43 4b 0d 0a 1a"  # magic
    "01 00" "01 00"  # read_version 1, write_version 1
    "00 00 00 00"  # flags
    "00 00 00 00"  # dict_id
    "00 00 00 00"  # reserved
    "e6 39 2a ad 90 fe 4d 5f"  # XXH64 of bytes 0..23
)
RAW_SHARD0_FOOTER = bytes.fromhex(
    "4c 02 00 00 00 00 00 00"  # index_offset 588 = 32 + 300 + 0 + 256
    "03 00 00 00 00 00 00 00"  # record_count 3
    "f7 37 31 51 11 1c 50 2e"  # index_checksum: XXH64 of the 3 entries
    "01 00" "01 00"  # read_version, write_version
    "00 00 00 00"  # flags
    "38 49 9e a6 a1 64 3e 1e"  # XXH64 of footer bytes 0..31
    "89 50 41 43 4b 0d 0a 1a"  # magic
)
RAW_SHARD1_FOOTER = bytes.fromhex(
    "b0 01 00 00 00 00 00 00"  # index_offset 432 = 32 + 100 + 300
    "02 00 00 00 00 00 00 00"  # record_count 2
    "b4 2f 90 fd d9 78 f8 1f"
    "01 00" "01 00" "00 00 00 00"
    "4b ab cb a4 f8 37 44 a9"
    "89 50 41 43 4b 0d 0a 1a"
)
# The zstd dataset's first header: flags = SHARD_HAS_ZSTD.
ZSTD_SHARD0_HEADER = bytes.fromhex(
    "89 50 41 43 4b 0d 0a 1a" "01 00" "01 00" "01 00 00 00" "00 00 00 00" "00 00 00 00" "df d7 77 eb 6d 20 10 1a"
)
# The dictionary dataset's first header: flags = SHARD_HAS_ZSTD | SHARD_HAS_DICT, dict_id 0x0863047f (the id
# zstd gave the trained dictionary, so only under the same libzstd).
DICT_SHARD0_HEADER = bytes.fromhex(
    "89 50 41 43 4b 0d 0a 1a" "01 00" "01 00" "03 00 00 00" "7f 04 63 08" "00 00 00 00" "67 b5 14 fb e9 24 83 69"
)

# The index of the raw dataset, column by column.
RAW_INDEX = {
    "shard": [0, 0, 0, 1, 1],
    "offset": [32, 332, 332, 32, 132],
    "stored_len": [300, 0, 256, 100, 300],
    "raw_len": [300, 0, 256, 100, 300],
    "flags": [0, 0, 0, 0, 0],
}
ZSTD_FLAGS = [1, 0, 0, 0, 1]  # README.txt and table.csv compress; empty, 0..255 and noise stay raw


def golden(name):
    return os.path.join(GOLDEN, name)


def read_manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def comparable(manifest: dict) -> dict:
    """The manifest minus what legitimately varies: ``created``, and the index file's size and checksum
    (the Arrow IPC encoding belongs to pyarrow; the index *content* is compared separately)."""
    m = json.loads(json.dumps(manifest))
    m.pop("created")
    m["index"].pop("size")
    m["index"].pop("checksum")
    m["stats"].pop("total_bytes")
    return m


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("use_mmap", [True, False])
def test_read_golden(name, use_mmap):
    samples = make_golden.samples(name)
    n = len(samples)
    ds = packfmt.open(golden(name), mmap=use_mmap)
    assert len(ds) == n and n >= 5
    assert ds.shards == ["shard-00000.pack", "shard-00001.pack"]
    for i, (key, data, cols) in enumerate(samples):
        assert ds.key(i) == key
        assert ds[i] == data
        assert ds.index_of(key) == i
    order = [4, 0, 1, 1, -1, 3, 2, 0, n - 2]
    assert ds.get_batch(order) == [samples[i][1] for i in order]
    assert list(ds) == [d for _, d, _ in samples]
    assert ds.columns == ["label", "score", "split"]
    assert ds.column("label").tolist() == [c["label"] for _, _, c in samples]
    scores = ds.column("score").tolist()
    for got, (_, _, c) in zip(scores, samples):
        assert (c["score"] is None and math.isnan(got)) or got == c["score"]
    assert ds.index.column("split").to_pylist() == [c["split"] for _, _, c in samples]
    shards = [_core.Shard(golden(f"{name}/{s}")) for s in ds.shards]
    stored = [shards[ds.shard_of[i]].read(int(ds.offsets[i]), int(ds.stored_lengths[i])) for i in range(n)]
    assert ds.checksums.tolist() == [xxhash.xxh3_64_intdigest(b) for b in stored]  # records: XXH3-64
    m = ds.manifest
    assert m["created"] == make_golden.FIXED_CREATED
    assert m["format_version"] == 1 and m["min_reader_version"] == 1


def test_golden_raw_bytes_spelled_out():
    s0 = open(golden("raw/shard-00000.pack"), "rb").read()
    s1 = open(golden("raw/shard-00001.pack"), "rb").read()
    assert s0[:32] == RAW_SHARD0_HEADER and s1[:32] == RAW_SHARD0_HEADER
    assert s0[-48:] == RAW_SHARD0_FOOTER
    assert s1[-48:] == RAW_SHARD1_FOOTER
    assert len(s0) == 32 + 556 + 3 * 32 + 48 and len(s1) == 32 + 400 + 2 * 32 + 48
    # Records are the raw samples back to back after the header.
    assert s0[32:588] == SAMPLES[0][1] + SAMPLES[1][1] + SAMPLES[2][1]
    assert s1[32:432] == SAMPLES[3][1] + SAMPLES[4][1]
    # Index entries: offset, stored_len, raw_len, checksum, flags, reserved.
    # The record checksum is XXH3-64 (0x2D06800538D394C2 is XXH3-64 of 0 bytes); the index is under XXH64.
    entries = [struct.unpack_from("<QIIQII", s0, 588 + 32 * i) for i in range(3)]
    assert entries == [(32, 300, 300, xxhash.xxh3_64_intdigest(SAMPLES[0][1]), 0, 0),
                       (332, 0, 0, 0x2D06800538D394C2, 0, 0),
                       (332, 256, 256, xxhash.xxh3_64_intdigest(SAMPLES[2][1]), 0, 0)]
    assert struct.unpack_from("<Q", s0, len(s0) - 48 + 16)[0] == xxhash.xxh64_intdigest(s0[588:588 + 3 * 32])
    assert open(golden("zstd/shard-00000.pack"), "rb").read()[:32] == ZSTD_SHARD0_HEADER
    assert open(golden("zstd-dict/shard-00000.pack"), "rb").read()[:32] == DICT_SHARD0_HEADER


def test_golden_dictionary():
    m = read_manifest(golden("zstd-dict"))
    d = m["compression"]["dictionary"]
    data = open(golden("zstd-dict/dictionary.zstd"), "rb").read()
    assert d == {"name": "dictionary.zstd", "size": len(data), "checksum": f"{xxhash.xxh64_intdigest(data):016x}",
                 "dict_id": 0x0863047F}
    assert data[:4] == bytes.fromhex("37 a4 30 ec") and struct.unpack_from("<I", data, 4)[0] == d["dict_id"]
    for shard in m["shards"]:
        info = _core.Shard(golden(f"zstd-dict/{shard['name']}")).info
        assert info["dict_id"] == d["dict_id"]
        assert info["flags"] == _core.SHARD_HAS_ZSTD | _core.SHARD_HAS_DICT
    # Every non-empty sample is a dictionary frame; the frames do not carry the dictionary id.
    ds = packfmt.open(golden("zstd-dict"))
    assert ds.codecs.tolist() == [0 if not d else _core.CODEC_ZSTD_DICT for _, d, _ in make_golden.DICT_SAMPLES]
    s0 = _core.Shard(golden("zstd-dict/shard-00000.pack"))
    off, stored, raw, _, codec = s0.entry(0)
    frame = s0.read(off, stored)
    assert zstandard.get_frame_parameters(frame).dict_id == 0
    assert zstandard.get_frame_parameters(frame).content_size == raw


def test_golden_index_content():
    for name in NAMES:
        samples = make_golden.samples(name)
        ds = packfmt.open(golden(name))
        t = ds.index
        assert t.schema.names == ["key", "shard", "offset", "stored_len", "raw_len", "checksum", "flags",
                                  "label", "score", "split"]
        assert [str(t.schema.field(c).type) for c in t.schema.names] == [
            "string", "uint32", "uint64", "uint32", "uint32", "uint64", "uint32", "int64", "double", "string"]
        assert t.column("key").to_pylist() == [k for k, _, _ in samples]
        assert t.column("raw_len").to_pylist() == [len(d) for _, d, _ in samples]
        if name == "raw":
            for col, want in RAW_INDEX.items():
                assert t.column(col).to_pylist() == want, col
        elif name == "zstd":
            assert t.column("shard").to_pylist() == RAW_INDEX["shard"]
            assert t.column("flags").to_pylist() == ZSTD_FLAGS
            stored = t.column("stored_len").to_pylist()
            assert all(s < len(d) for s, (_, d, _), f in zip(stored, SAMPLES, ZSTD_FLAGS) if f)
        with pa.memory_map(golden(f"{name}/index.arrow")) as src:
            assert pa.ipc.open_file(src).num_record_batches == 1


@pytest.mark.parametrize("name", NAMES)
def test_rewrite_is_identical(tmp_path, name):
    assert GOLDEN_INFO["datasets"][name] == make_golden.DATASETS[name]
    out = str(tmp_path / name)
    make_golden.write_dataset(out, name)
    fresh, gold = packfmt.open(out), packfmt.open(golden(name))
    assert fresh.get_batch(range(len(gold))) == gold.get_batch(range(len(gold)))
    exact = name == "raw" or SAME_ZSTD
    if exact and name == "zstd-dict":
        assert open(os.path.join(out, "dictionary.zstd"), "rb").read() == open(golden("zstd-dict/dictionary.zstd"), "rb").read()
    for shard in gold.shards:
        a = open(os.path.join(out, shard), "rb").read()
        b = open(golden(f"{name}/{shard}"), "rb").read()
        if exact:
            assert a == b, f"{name}/{shard} differs from the golden file: the format changed"
        else:  # another libzstd: same structure, same headers, possibly other compressed bytes
            assert a[:32] == b[:32]
    if exact:
        assert fresh.index.equals(gold.index)
        assert comparable(fresh.manifest) == comparable(gold.manifest)
    else:
        for col in ("key", "shard", "raw_len", "label", "score", "split"):
            assert fresh.index.column(col).equals(gold.index.column(col)), col
    # The fields comparable() leaves out are still right for the files they describe.
    m = read_manifest(golden(name))
    index = open(golden(f"{name}/index.arrow"), "rb").read()
    assert m["index"]["size"] == len(index) and m["index"]["checksum"] == f"{xxhash.xxh64_intdigest(index):016x}"
    assert m["stats"]["total_bytes"] == sum(s["size"] for s in m["shards"]) + len(index)
    for s in m["shards"]:
        data = open(golden(f"{name}/{s['name']}"), "rb").read()
        assert s["size"] == len(data) and s["checksum"] == f"{xxhash.xxh64_intdigest(data):016x}"


def test_golden_manifest():
    m = comparable(read_manifest(golden("raw")))
    assert m == {
        "format": "packfmt",
        "format_version": 1,
        "min_reader_version": 1,
        "samples": 5,
        "compression": {"codec": "none", "level": None, "dictionary": None},
        "index": {"name": "index.arrow", "rows": 5, "columns": ["label", "score", "split"]},
        "shards": [
            {"name": "shard-00000.pack", "size": 732, "records": 3, "checksum": "a25afb880e4a1863", "data_bytes": 556},
            {"name": "shard-00001.pack", "size": 544, "records": 2, "checksum": "11cd27ed88647e54", "data_bytes": 400},
        ],
        "stats": {"raw_bytes": 956, "stored_bytes": 956},
    }
    z = comparable(read_manifest(golden("zstd")))
    assert z["compression"] == {"codec": "zstd", "level": 3, "dictionary": None}
    assert [s["records"] for s in z["shards"]] == [3, 2]


def test_golden_shards_open_alone():
    # `pack ls SHARD.pack` style: a lone shard, no manifest, validated from its tail, decoded by zstd alone.
    for name in NAMES:
        m = read_manifest(golden(name))
        samples = make_golden.samples(name)
        dctx = {_core.CODEC_ZSTD: zstandard.ZstdDecompressor()}
        if name == "zstd-dict":
            d = zstandard.ZstdCompressionDict(open(golden("zstd-dict/dictionary.zstd"), "rb").read())
            dctx[_core.CODEC_ZSTD_DICT] = zstandard.ZstdDecompressor(dict_data=d)
        first = 0
        for shard in m["shards"]:
            n = shard["records"]
            path = golden(f"{name}/{shard['name']}")
            data = open(path, "rb").read()
            info = _core.check_tail(data[-(48 + 32 * n):], len(data))
            assert info["records"] == n
            s = _core.Shard(path)
            want_flags = {"raw": 0, "zstd": _core.SHARD_HAS_ZSTD}.get(name, _core.SHARD_HAS_ZSTD | _core.SHARD_HAS_DICT)
            assert s.info["flags"] == want_flags
            assert s.verify_records(0, n) == ([], 0)
            for j in range(n):
                off, stored, raw, _, codec = s.entry(j)
                b = s.read(off, stored)
                got = dctx[codec].decompress(b, max_output_size=raw) if codec else b
                assert got == samples[first + j][1]
            first += n
        assert first == len(samples)
