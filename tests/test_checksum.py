"""The C core's XXH64 and XXH3-64 (written from the public xxHash spec) equal the reference ``xxhash`` package.

XXH3-64 is checked on both of its code paths in this process (the portable scalar loop and the AVX2 loop,
switched with ``_core.xxh3_impl``), and ``PACKFMT_NO_SIMD=1`` is checked in a child process."""

import contextlib
import os
import struct
import subprocess
import sys

import xxhash
from hypothesis import given
from hypothesis import strategies as st

import packfmt
from packfmt import _core
from packfmt.verify import _RemoteShard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ["scalar", "avx2"]


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


@contextlib.contextmanager
def xxh3_impl(name):
    """Run the body with the given XXH3 code path, then restore the one in use before."""
    before = _core.xxh3_impl()
    try:
        yield _core.xxh3_impl(name)
    finally:
        _core.xxh3_impl(before)


def xxh3_both(data):
    """_core.xxh3_64(data) on each code path (they must agree with each other and with the package)."""
    out = []
    for name in IMPLS:
        with xxh3_impl(name):
            out.append(_core.xxh3_64(data))
    return out

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


# ------------------------------------------------------------------------------------------- XXH3-64


def test_xxh3_paths_available():
    # The AVX2 loop is really what runs on a CPU that has AVX2 (the default), and can be turned off.
    if sys.platform == "linux" and os.uname().machine == "x86_64" and cpu_has_avx2():
        assert _core.xxh3_impl("avx2") == "avx2"
        if not os.environ.get("PACKFMT_NO_SIMD"):
            assert _core.xxh3_impl() == "avx2"
    with xxh3_impl("scalar") as got:
        assert got == "scalar" and _core.xxh3_impl() == "scalar"


def test_xxh3_no_simd_env():
    code = "from packfmt import _core; print(_core.xxh3_impl(), _core.xxh3_64(bytes(range(256)) * 40))"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PACKFMT_NO_SIMD", None)
    want = xxhash.xxh3_64_intdigest(bytes(range(256)) * 40)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PACKFMT_NO_SIMD": "1"},
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["scalar", str(want)]
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["avx2" if _core.xxh3_impl("avx2") == "avx2" else "scalar", str(want)]


def test_xxh3_spec_vectors():
    # XXH3-64, seed 0, default secret (what xxhash.xxh3_64_intdigest returns).
    for name in IMPLS:
        with xxh3_impl(name):
            assert _core.xxh3_64(b"") == 0x2D06800538D394C2
            assert _core.xxh3_64(b"a") == 0xE6C632B61E964E1F
            assert _core.xxh3_64(b"abc") == 0x78AF5F94892F3950


def test_xxh3_every_length_to_300():
    # Exhaustively every length 0..300 (all the short paths: 0, 1-3, 4-8, 9-16, 17-128, 129-240, and the
    # first long inputs), on two kinds of data, and at every start offset 0..7 of the buffer.
    for data in (bytes(range(256)) + bytes(range(255, -1, -1)), os.urandom(512)):
        for n in range(0, 301):
            want = xxhash.xxh3_64_intdigest(data[:n])
            assert xxh3_both(data[:n]) == [want, want], n
            off = n % 8
            view = memoryview(bytearray(off) + data[:n])[off:]
            assert _core.xxh3_64(view) == want, (n, off)


@given(data=st.binary(max_size=4096))
def test_xxh3_small_inputs(data):
    want = xxhash.xxh3_64_intdigest(data)
    assert xxh3_both(data) == [want, want]


@given(stripes=st.integers(0, 1600), tail=st.integers(0, 128), salt=st.integers(0, 2**32))
def test_xxh3_large_inputs(stripes, tail, salt):
    # Up to ~100 KiB: whole 64-byte stripes (and 1 KiB blocks, where the accumulators are scrambled)
    # plus every tail length, which decides how the last stripe overlaps the one before.
    n = stripes * 64 + tail
    data = (salt.to_bytes(5, "little") + os.urandom(n))[:n]
    want = xxhash.xxh3_64_intdigest(data)
    assert xxh3_both(data) == [want, want]


@given(data=st.binary(min_size=0, max_size=5000), offset=st.integers(0, 63))
def test_xxh3_unaligned_buffers(data, offset):
    # Vector loads are unaligned loads: a buffer at any address hashes the same.
    buf = bytearray(offset) + data
    view = memoryview(buf)[offset:]
    want = xxhash.xxh3_64_intdigest(data)
    assert xxh3_both(view) == [want, want]


def test_xxh3_block_boundaries():
    # Around the 1 KiB block and 64-byte stripe edges, where the loop structure changes.
    data = os.urandom(8 * 1024 + 300)
    for n in sorted({k * 1024 + d for k in range(1, 9) for d in (-65, -64, -63, -1, 0, 1, 63, 64, 65)}):
        want = xxhash.xxh3_64_intdigest(data[:n])
        assert xxh3_both(data[:n]) == [want, want], n


def test_xxh3_accepts_buffer_types():
    import numpy as np

    data = b"0123456789" * 100
    want = xxhash.xxh3_64_intdigest(data)
    assert _core.xxh3_64(bytearray(data)) == want
    assert _core.xxh3_64(memoryview(data)) == want
    assert _core.xxh3_64(np.frombuffer(data, dtype=np.uint8)) == want
    assert _core.xxh3_64(np.frombuffer(data, dtype=np.uint32)) == want  # cast to bytes


def test_record_checksums_are_xxh3(tmp_path):
    # Every index entry carries the XXH3-64 of the record's stored bytes; the index itself is under XXH64.
    path = tmp_path / "s.pack"
    records = [os.urandom(n) for n in (0, 1, 17, 240, 241, 5000, 70000)]
    w = _core.ShardWriter(str(path))
    for r in records:
        w.append(r, len(r))
    w.close()
    s = _core.Shard(str(path))
    for i, r in enumerate(records):
        assert s.entry(i)[3] == xxhash.xxh3_64_intdigest(r)
    data = path.read_bytes()
    index_offset, count, index_checksum = struct.unpack_from("<QQQ", data, len(data) - _core.FOOTER_SIZE)
    assert count == len(records)
    assert index_checksum == xxhash.xxh64_intdigest(data[index_offset:index_offset + count * _core.ENTRY_SIZE])
    assert s.verify_records(0, len(records)) == ([], 0)


def test_remote_verify_records_uses_xxh3(tmp_path):
    # pack verify on a remote dataset checks downloaded records in Python: the same hash as the C reader.
    path = tmp_path / "s.pack"
    records = [os.urandom(n) for n in (3, 300, 4000)]
    w = _core.ShardWriter(str(path))
    for r in records:
        w.append(r, len(r))
    w.close()
    data = bytearray(path.read_bytes())
    rs = _RemoteShard.__new__(_RemoteShard)  # without downloading: the shard's bytes are already here
    rs.data = bytes(data)
    rs.info = _core.check_tail(rs.data, len(rs.data), str(path))
    entries = rs.entries()
    assert rs.verify_records(entries, 10) == ([], 0)
    data[int(entries[1]["offset"]) + 7] ^= 0x10
    rs.data = bytes(data)
    assert rs.verify_records(entries, 10) == ([1], 1)


# --------------------------------------------------------------------- XXH3-64 fused with the copy


def copy_both(data, src_off=0, dst_off=0, slack=0):
    """_core.xxh3_64_copy(data) on each code path, into a destination at dst_off of a buffer with `slack`
    guard bytes after it, from a source at src_off.  Returns [(hash, copied bytes, guard intact), ...]."""
    src = memoryview(bytearray(src_off) + data)[src_off:]
    out = []
    for name in IMPLS:
        with xxh3_impl(name):
            buf = bytearray(b"\xa5" * (dst_off + len(data) + slack))
            h = _core.xxh3_64_copy(memoryview(buf)[dst_off:], src)
            out.append((h, bytes(buf[dst_off:dst_off + len(data)]),
                        buf[:dst_off] == b"\xa5" * dst_off and buf[dst_off + len(data):] == b"\xa5" * slack))
    return out


def test_xxh3_copy_every_length_to_300():
    # Every length 0..300 (all the short paths, and the first long inputs, where the copy and the hash are
    # fused), at every source and destination offset 0..7: the hash equals the package's, the copy is
    # byte for byte the source, and no byte after the copy is written.
    data = os.urandom(512)
    for n in range(0, 301):
        want = xxhash.xxh3_64_intdigest(data[:n])
        for off in range(8):
            got = copy_both(data[:n], src_off=off, dst_off=(n + off) % 8, slack=8)
            assert got == [(want, data[:n], True)] * 2, (n, off)


@given(data=st.binary(max_size=5000), src_off=st.integers(0, 63), dst_off=st.integers(0, 63))
def test_xxh3_copy_small_inputs(data, src_off, dst_off):
    want = xxhash.xxh3_64_intdigest(data)
    assert copy_both(data, src_off, dst_off, slack=64) == [(want, data, True)] * 2


@given(size=st.one_of(st.integers(241, 64 << 10), st.integers(64 << 10, 4 << 20)), src_off=st.integers(0, 63),
       dst_off=st.integers(0, 63), salt=st.integers(0, 2**32))
def test_xxh3_copy_large_inputs(size, src_off, dst_off, salt):
    # Long inputs up to 4 MiB (half of the draws above 64 KiB): many 1 KiB blocks (the prefetch runs ahead
    # inside the record, never past it), every tail length, unaligned on both sides.
    data = (salt.to_bytes(5, "little") + os.urandom(size))[:size]
    want = xxhash.xxh3_64_intdigest(data)
    assert copy_both(data, src_off, dst_off, slack=64) == [(want, data, True)] * 2


def test_xxh3_copy_block_boundaries():
    data = os.urandom(8 * 1024 + 300)
    for n in sorted({k * 1024 + d for k in range(1, 9) for d in (-65, -64, -63, -1, 0, 1, 63, 64, 65)}):
        want = xxhash.xxh3_64_intdigest(data[:n])
        assert copy_both(data[:n], 3, 5, slack=3) == [(want, data[:n], True)] * 2, n


def test_xxh3_copy_checks_its_arguments():
    import pytest

    with pytest.raises(ValueError, match="shorter"):
        _core.xxh3_64_copy(bytearray(3), b"abcd")
    buf = bytearray(100)
    with pytest.raises(ValueError, match="overlap"):
        _core.xxh3_64_copy(memoryview(buf)[10:], memoryview(buf)[:50])
    with pytest.raises(BufferError):  # bytes are read-only
        _core.xxh3_64_copy(b"read-only!", b"abc")
    assert _core.xxh3_64_copy(bytearray(), b"") == xxhash.xxh3_64_intdigest(b"")


def test_xxh3_copy_no_simd_env():
    # PACKFMT_NO_SIMD=1 selects the scalar copy loop too (a long input, so the fused loop runs).
    code = ("import os; from packfmt import _core; d = bytes(range(256)) * 40; b = bytearray(len(d)); "
            "h = _core.xxh3_64_copy(b, d); print(_core.xxh3_impl(), h, bytes(b) == d)")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PACKFMT_NO_SIMD": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["scalar", str(xxhash.xxh3_64_intdigest(bytes(range(256)) * 40)), "True"]
