"""The C core's XXH64 (written from the public xxHash spec) equals the reference ``xxhash`` package."""

import os

import xxhash
from hypothesis import given
from hypothesis import strategies as st

import packfmt
from packfmt import _core

seeds = st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.sampled_from([1, 2**32 - 1, 2**63, 2**64 - 1]))


def test_spec_vectors():
    # Values from the xxHash reference implementation (also what the `xxhash` package returns).
    assert _core.xxh64(b"", 0) == 0xEF46DB3751D8E999
    assert _core.xxh64(b"a", 0) == 0xD24EC4F1A98C6E5B
    assert _core.xxh64(b"abc", 0) == 0x44BC2CF5AD770999
    assert _core.xxh64(b"", 1) == xxhash.xxh64_intdigest(b"", 1)


def test_every_tail_length():
    # Every length 0..160 exercises each branch: < 32 bytes, whole stripes, and every 8/4/1-byte tail.
    data = bytes(range(256)) * 2
    for seed in (0, 1, 0x9E3779B185EBCA87, 2**64 - 1):
        for n in range(0, 161):
            assert _core.xxh64(data[:n], seed) == xxhash.xxh64_intdigest(data[:n], seed), (n, seed)


@given(data=st.binary(max_size=4096), seed=seeds)
def test_small_inputs(data, seed):
    assert _core.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


@given(stripes=st.integers(0, 3200), tail=st.integers(0, 64), seed=seeds, salt=st.integers(0, 2**32))
def test_large_inputs(stripes, tail, seed, salt):
    # Up to ~100 KiB: 32-byte stripes plus every tail length 0..64.
    n = stripes * 32 + tail
    data = (salt.to_bytes(5, "little") + os.urandom(n))[:n]
    assert _core.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


@given(data=st.binary(max_size=300), offset=st.integers(0, 7))
def test_unaligned_buffers(data, offset):
    # Loads are byte-wise: a buffer that does not start on an 8-byte boundary hashes the same.
    buf = bytearray(offset) + data
    view = memoryview(buf)[offset:]
    assert _core.xxh64(view, 0) == xxhash.xxh64_intdigest(data, 0)


def test_accepts_buffer_types():
    data = b"0123456789" * 10
    want = xxhash.xxh64_intdigest(data)
    assert _core.xxh64(bytearray(data)) == want
    assert _core.xxh64(memoryview(data)) == want
    import numpy as np

    assert _core.xxh64(np.frombuffer(data, dtype=np.uint8)) == want


@given(records=st.lists(st.binary(max_size=3000), max_size=20), big=st.integers(0, 3))
def test_streaming_state_via_shard_checksum(tmp_path_factory, records, big):
    # The writer hashes the whole file with the streaming state as it writes, in pieces of every size
    # (header, records, index, footer, and writes larger than its 1 MiB buffer).
    path = tmp_path_factory.mktemp("shard") / "s.pack"
    if big:
        records = records + [os.urandom(big * (1 << 20) // 2 + 7)]
    w = _core.ShardWriter(str(path))
    for r in records:
        w.append(r, len(r))
    summary = w.close()
    file_bytes = path.read_bytes()
    assert summary["size"] == len(file_bytes)
    assert summary["records"] == len(records)
    assert summary["checksum"] == xxhash.xxh64_intdigest(file_bytes)
    assert summary["data_bytes"] == sum(map(len, records))


def test_shard_hash_range_matches(tmp_path):
    # Shard.hash_range hashes with the streaming state in 1 MiB chunks (pread mode) or one shot (mmap).
    path = tmp_path / "s.pack"
    w = _core.ShardWriter(str(path))
    for n in (0, 1, 31, 32, 33, (1 << 20) + 5, 100):
        w.append(os.urandom(n), n)
    w.close()
    data = path.read_bytes()
    for use_mmap in (False, True):
        s = _core.Shard(str(path), use_mmap=use_mmap)
        for a, b in [(0, len(data)), (0, 0), (5, 5 + (1 << 20) + 3), (32, 65), (len(data) - 48, len(data))]:
            assert s.hash_range(a, b) == xxhash.xxh64_intdigest(data[a:b]), (use_mmap, a, b)


def test_manifest_checksums_are_xxh64(tmp_path):
    # The manifest's hex checksums are the same function, so any tool can recompute them.
    out = tmp_path / "ds"
    with packfmt.Writer(out) as w:
        w.add("a", b"x" * 100)
    m = packfmt.open(out).manifest
    shard = (out / m["shards"][0]["name"]).read_bytes()
    assert m["shards"][0]["checksum"] == f"{xxhash.xxh64_intdigest(shard):016x}"
    index = (out / "index.arrow").read_bytes()
    assert m["index"]["checksum"] == f"{xxhash.xxh64_intdigest(index):016x}"
