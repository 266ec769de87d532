"""Damaged and hostile datasets: each is refused with a named, specific error and never returns wrong bytes.

Accidents (a byte flipped in a record, a shard's index, footer or header; a truncated or missing shard; a
wrong manifest) and a hostile producer (who rewrites a structure and fixes its checksums: manifest naming
``../x``, absolute paths or URLs; index rows pointing past the end, into the index or footer, overflowing;
a declared raw length far beyond the cap; a newer format version; index and shards that disagree).

See docs/security.md for the threat model these tests pin down.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packfmt
from packfmt import _core

import _hostile as h

MODES = [pytest.param(True, id="mmap"), pytest.param(False, id="pread")]

# Bugs found by these tests in files this test suite does not own, reported with a fix; strict, so
# each marker must go when its bug is fixed (the test then passes and XPASS fails the run).


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A raw dataset of 30 samples in 5 shards, and its payloads."""
    d = tmp_path_factory.mktemp("pristine") / "ds"
    return str(d), h.make_dataset(d)


@pytest.fixture(scope="module")
def pristine_zstd(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine-zstd") / "ds"
    return str(d), h.make_dataset(d, compression="zstd")


@pytest.fixture
def ds_copy(pristine, tmp_path):
    src, payloads = pristine
    return h.copy(src, tmp_path / "ds"), payloads


def _read_each(ds, payloads):
    """Read every sample on its own: {index: bytes | exception}.  Successful reads must be right."""
    out = {}
    for i in range(len(ds)):
        try:
            got = ds[i]
        except packfmt.PackError as e:
            out[i] = e
            continue
        assert got == payloads[i], f"sample {i}: wrong bytes returned"
        out[i] = got
    return out


def _records_of(d):
    """(sample, shard, offset, stored_len) for every sample, from the index."""
    t = h.read_index(d)
    return list(zip(range(t.num_rows), t.column("shard").to_pylist(), t.column("offset").to_pylist(),
                    t.column("stored_len").to_pylist()))


# ----------------------------------------------------------------------------- accidents

@pytest.mark.parametrize("use_mmap", MODES)
@settings(max_examples=15)
@given(data=st.data())
def test_flipped_byte_in_record_is_caught_for_that_sample_only(pristine, tmp_path_factory, use_mmap, data):
    src, payloads = pristine
    d = h.copy(src, tmp_path_factory.mktemp("flip") / "ds")
    recs = [r for r in _records_of(d) if r[3] > 0]
    sample, shard, offset, length = data.draw(st.sampled_from(recs))
    pos = offset + data.draw(st.integers(0, length - 1))
    h.flip(h.shard_path(d, shard), pos, data.draw(st.integers(1, 255)))
    ds = packfmt.open(d, mmap=use_mmap)
    results = _read_each(ds, payloads)
    bad = {i for i, r in results.items() if isinstance(r, Exception)}
    assert bad == {sample}
    err = results[sample]
    assert isinstance(err, packfmt.CorruptShardError) and isinstance(err, ValueError)
    assert err.shard.endswith(f"shard-{shard:05d}.pack") and f"shard-{shard:05d}.pack" in str(err)
    assert err.offset == offset and str(offset) in str(err)
    # A batch containing it fails as a whole, naming the same sample; without it, the batch reads.
    with pytest.raises(packfmt.CorruptShardError) as ei:
        ds.get_batch([(sample + 1) % len(ds), sample, sample])
    assert ei.value.sample == sample
    others = [i for i in range(len(ds)) if i != sample]
    assert ds.get_batch(others) == [payloads[i] for i in others]


@pytest.fixture(scope="module")
def long_records(tmp_path_factory):
    """One shard of records long enough for the fused copy-and-hash loop (whole 1 KiB blocks, the
    prefetch running ahead, a last stripe that overlaps the one before), between short ones."""
    d = tmp_path_factory.mktemp("long") / "ds"
    rng = np.random.default_rng(7)
    payloads = [rng.bytes(n) for n in (5, 241, 3000, 9, 70_000, 1024, 4097, 100)]
    with packfmt.Writer(str(d), shard_size="1GiB") as w:
        for i, p in enumerate(payloads):
            w.add(f"r{i}", p)
    return str(d), payloads


@pytest.mark.parametrize("use_mmap", MODES)
@pytest.mark.parametrize("sample", [2, 4, 5, 6])
@pytest.mark.parametrize("where", ["first", "block", "before_last_stripe", "last_stripe", "last"])
def test_flipped_byte_in_long_record(long_records, tmp_path, use_mmap, sample, where):
    # Whatever byte of a long record differs, the read that copies and hashes it in one pass fails with the
    # record's shard and offset, alone, in a batch (pread: coalesced with its neighbours) and via ds[i];
    # the other records still read right.
    src, payloads = long_records
    d = h.copy(src, tmp_path / "ds")
    _, shard, offset, length = _records_of(d)[sample]
    at = {"first": 0, "block": length // 2, "before_last_stripe": length - 65, "last_stripe": length - 33,
          "last": length - 1}[where]
    h.flip(h.shard_path(d, shard), offset + at, 0x80)
    ds = packfmt.open(d, mmap=use_mmap)
    for read in (lambda: ds[sample], lambda: ds.get_batch(list(range(len(ds)))),
                 lambda: ds.get_batch([sample]), lambda: ds.get_batch_packed([0, sample, 1])):
        with pytest.raises(packfmt.CorruptShardError) as ei:
            read()
        assert ei.value.offset == offset and ei.value.shard.endswith(f"shard-{shard:05d}.pack")
        assert f"offset {offset}" in str(ei.value)
    others = [i for i in range(len(ds)) if i != sample]
    assert ds.get_batch(others) == [payloads[i] for i in others]
    assert packfmt.open(d, mmap=use_mmap, verify=False)[sample] != payloads[sample]  # the flip is real


@pytest.mark.parametrize("use_mmap", MODES)
def test_flipped_byte_in_zstd_record(pristine_zstd, tmp_path, use_mmap):
    src, payloads = pristine_zstd
    d = h.copy(src, tmp_path / "ds")
    t = h.read_index(d)
    flags = t.column("flags").to_pylist()
    i = flags.index(_core.CODEC_ZSTD)
    shard, off, n = (t.column(c)[i].as_py() for c in ("shard", "offset", "stored_len"))
    h.flip(h.shard_path(d, shard), off + n // 2)
    ds = packfmt.open(d, mmap=use_mmap)
    with pytest.raises(packfmt.CorruptShardError) as ei:
        ds[i]
    assert ei.value.offset == off
    results = _read_each(ds, payloads)
    assert {k for k, r in results.items() if isinstance(r, Exception)} == {i}


def _region_positions(path):
    f = h.footer(path)
    return {
        "header": list(range(0, h.HEADER)),
        "index": list(range(f["index_offset"], f["pos"])),
        "footer": list(range(f["pos"], f["size"])),
    }


@pytest.mark.parametrize("region", ["header", "index", "footer"])
@pytest.mark.parametrize("use_mmap", MODES)
def test_flipped_byte_in_shard_structure_fails_the_whole_shard(ds_copy, region, use_mmap):
    d, payloads = ds_copy
    path = h.shard_path(d, 1)
    positions = _region_positions(path)[region]
    rng = np.random.default_rng(sum(map(ord, region)) + use_mmap)
    for pos in rng.choice(positions, size=min(6, len(positions)), replace=False).tolist():
        mask = int(rng.integers(1, 256))
        h.flip(path, pos, mask)
        ds = packfmt.open(d, mmap=use_mmap)
        results = _read_each(ds, payloads)
        in_shard = set(np.flatnonzero(ds.shard_of == 1).tolist())
        failed = {i for i, r in results.items() if isinstance(r, Exception)}
        assert failed == in_shard, (region, pos)
        for i in failed:
            assert isinstance(results[i], packfmt.CorruptShardError)
            assert results[i].shard.endswith("shard-00001.pack")
        # The last damaged position stays for the low-level check below; the others are restored.
        last = (pos, mask)
        h.flip(path, pos, mask)
    h.flip(path, *last)
    # Damage to the structure is also reported by the low-level Shard with the shard's path.
    with pytest.raises(packfmt.CorruptShardError) as ei:
        _core.Shard(path)
    assert "shard-00001.pack" in str(ei.value)


def test_truncated_shard(ds_copy):
    d, payloads = ds_copy
    path = h.shard_path(d, 2)
    size = os.path.getsize(path)
    for cut in (1, h.FOOTER, h.FOOTER + 5, size // 2, size - h.HEADER):
        with open(path, "r+b") as f:
            f.truncate(size - cut)
        ds = packfmt.open(d)
        for i in np.flatnonzero(ds.shard_of == 2).tolist():
            with pytest.raises(packfmt.CorruptShardError, match="shard-00002.pack") as ei:
                ds[i]
            assert ei.value.shard.endswith("shard-00002.pack")
        assert ds.get_batch(np.flatnonzero(ds.shard_of != 2)) == [p for i, p in enumerate(payloads) if ds.shard_of[i] != 2]
    # Without the manifest's expected size, the footer is what fails.
    with pytest.raises(packfmt.CorruptShardError):
        _core.Shard(path)


def test_missing_shard(ds_copy):
    d, payloads = ds_copy
    os.unlink(h.shard_path(d, 3))
    ds = packfmt.open(d)  # opening reads no shard
    i = int(np.flatnonzero(ds.shard_of == 3)[0])
    with pytest.raises(packfmt.PackOSError) as ei:
        ds[i]
    assert ei.value.errno == errno.ENOENT and "shard-00003.pack" in str(ei.value)
    assert isinstance(ei.value, packfmt.PackError) and isinstance(ei.value, OSError)
    ok = np.flatnonzero(ds.shard_of != 3)
    assert ds.get_batch(ok) == [payloads[k] for k in ok.tolist()]


def test_missing_index_and_manifest(ds_copy):
    d, _ = ds_copy
    os.unlink(os.path.join(d, "index.arrow"))
    with pytest.raises(packfmt.ManifestError, match="index"):
        packfmt.open(d)
    os.unlink(os.path.join(d, "manifest.json"))
    with pytest.raises(packfmt.DatasetNotFoundError):
        packfmt.open(d)


def test_flipped_byte_in_index_file(ds_copy):
    d, _ = ds_copy
    path = os.path.join(d, "index.arrow")
    size = os.path.getsize(path)
    for pos in (0, size // 3, size // 2, size - 1):
        h.flip(path, pos)
        with pytest.raises(packfmt.ManifestError, match="checksum"):
            packfmt.open(d)
        h.flip(path, pos)
    packfmt.open(d)  # restored


@pytest.mark.parametrize("edit, error", [
    (lambda m: "not json{", packfmt.ManifestError),
    (lambda m: [], packfmt.ManifestError),
    (lambda m: {**m, "format": "other"}, packfmt.ManifestError),
    (lambda m: {**m, "samples": m["samples"] + 1}, packfmt.ManifestError),
    (lambda m: {**m, "samples": -1}, packfmt.ManifestError),
    (lambda m: {**m, "samples": "30"}, packfmt.ManifestError),
    (lambda m: {**m, "shards": m["shards"][:-1]}, packfmt.ManifestError),
    (lambda m: {**m, "shards": m["shards"] + m["shards"][:1]}, packfmt.ManifestError),
    (lambda m: {**m, "shards": [dict(s, records=s["records"] + (1 if k == 0 else -1 if k == 1 else 0))
                                for k, s in enumerate(m["shards"])]}, packfmt.ManifestError),
    (lambda m: {**m, "shards": [dict(s, checksum="xyz") for s in m["shards"]]}, packfmt.ManifestError),
    (lambda m: {**m, "index": dict(m["index"], checksum="0" * 16)}, packfmt.ManifestError),
    (lambda m: {**m, "index": dict(m["index"], size=m["index"]["size"] + 1)}, packfmt.ManifestError),
    (lambda m: {**m, "index": dict(m["index"], rows=1)}, packfmt.ManifestError),
    (lambda m: {**m, "compression": {"codec": "lz4"}}, packfmt.ManifestError),
    (lambda m: {**m, "min_reader_version": 0}, packfmt.ManifestError),
    (lambda m: {**m, "min_reader_version": packfmt.FORMAT_VERSION + 1}, packfmt.UnsupportedVersionError),
    (lambda m: {**m, "min_reader_version": 10**9}, packfmt.UnsupportedVersionError),
])
def test_wrong_manifest(ds_copy, edit, error):
    d, _ = ds_copy
    new = edit(h.manifest(d))
    with open(os.path.join(d, "manifest.json"), "w") as f:
        f.write(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(error):
        packfmt.open(d)


def test_manifest_shard_size_disagrees_with_file(ds_copy):
    d, payloads = ds_copy
    m = h.manifest(d)
    m["shards"][0]["size"] += 1
    h.write_manifest(d, m)
    ds = packfmt.open(d)
    with pytest.raises(packfmt.PackError) as ei:
        ds[0]
    assert "shard-00000.pack" in str(ei.value)
    assert ds[len(ds) - 1] == payloads[-1]


def test_newer_shard_format_version(ds_copy):
    d, _ = ds_copy
    path = h.shard_path(d, 0)
    for where in ("footer", "header"):
        def edit(data, where=where):
            if where == "footer":
                fp = len(data) - h.FOOTER
                data[fp + 24:fp + 26] = (packfmt.FORMAT_VERSION + 1).to_bytes(2, "little")
            else:
                data[8:10] = (packfmt.FORMAT_VERSION + 1).to_bytes(2, "little")
        h.rewrite_shard(path, edit)
        with pytest.raises(packfmt.UnsupportedVersionError, match="upgrade packfmt"):
            _core.Shard(path)
        h.fix_manifest_shard_sizes(d)
        with pytest.raises(packfmt.UnsupportedVersionError):
            packfmt.open(d)[0]


# ----------------------------------------------------------------------------- a hostile manifest

HOSTILE_NAMES = ["../x.pack", "../../etc/passwd", "/etc/passwd", "/tmp/shard-00000.pack", "sub/shard-00000.pack",
                 "file:///etc/passwd", "http://127.0.0.1:1/shard.pack", "s3://other-bucket/shard.pack",
                 "..", ".", "", "shard-00000.pack\n", "shard\x00.pack", "~/shard.pack", "C:\\shard.pack",
                 "x" * 300, 7, None, ["shard-00000.pack"]]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
@pytest.mark.parametrize("what", ["shard", "index", "dictionary"])
def test_manifest_names_outside_the_dataset(ds_copy, tmp_path, name, what, request):
    d, _ = ds_copy
    # A perfectly valid dataset object sits just outside: it must never be opened.
    h.copy(os.path.join(d), tmp_path / "outside")
    m = h.manifest(d)
    if what == "shard":
        m["shards"][0]["name"] = name
    elif what == "index":
        m["index"]["name"] = name
    else:
        m["compression"]["dictionary"] = {"name": name, "size": 10, "checksum": "0" * 16, "dict_id": 1}
    h.write_manifest(d, m)
    with pytest.raises(packfmt.ManifestError):
        packfmt.open(d)


def test_manifest_is_not_a_regular_file(ds_copy):
    d, _ = ds_copy
    mpath = os.path.join(d, "manifest.json")
    os.unlink(mpath)
    os.mkdir(mpath)
    with pytest.raises(packfmt.PackError):
        packfmt.open(d)


@h.NEEDS_RLIMIT_AS
def test_manifest_symlink_to_endless_file_is_bounded(ds_copy):
    """manifest.json -> /dev/zero must be refused after at most the manifest size cap, not read forever."""
    d, _ = ds_copy
    mpath = os.path.join(d, "manifest.json")
    os.unlink(mpath)
    os.symlink("/dev/zero", mpath)
    code = ("import resource, packfmt\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))\n"
            f"try:\n    packfmt.open({d!r})\nexcept packfmt.PackError as e:\n    print('refused', type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------- a hostile index

def test_index_row_points_past_the_end_or_into_index_or_footer(ds_copy):
    d, payloads = ds_copy
    m = h.manifest(d)
    size0 = m["shards"][0]["size"]
    f = h.footer(h.shard_path(d, 0))
    cases = [
        ("offset", 1, size0 + 10),                   # past the end
        ("offset", 1, f["index_offset"]),            # the shard's own index
        ("offset", 1, f["pos"]),                     # the footer
        ("offset", 1, 0),                            # the header
        ("offset", 1, 2**64 - 10),                   # offset + length overflows
        ("stored_len", 1, 2**32 - 1),                # length overflows the data region
        ("stored_len", 2, f["index_offset"]),        # runs into the index
        ("shard", 0, len(m["shards"])),              # a shard the manifest does not have
        ("shard", 0, 2**32 - 1),
        ("flags", 3, 7),                             # unknown codec
        ("flags", 3, _core.CODEC_ZSTD_DICT),          # dictionary that does not exist
        ("raw_len", 3, 2**32 - 1),                   # uncompressed but raw != stored; beyond the cap
    ]
    for col, row, value in cases:
        dd = h.copy(d, os.path.join(d + f"-{col}-{value}"))
        h.set_index_cell(dd, col, row, value)
        with pytest.raises(packfmt.PackError) as ei:
            ds = packfmt.open(dd)
            ds[row]
        assert isinstance(ei.value, (packfmt.ManifestError, packfmt.CorruptShardError)), (col, value, ei.value)


def test_index_not_a_regular_file(ds_copy):
    d, _ = ds_copy
    ipath = os.path.join(d, "index.arrow")
    os.unlink(ipath)
    os.mkdir(ipath)
    with pytest.raises(packfmt.PackError):
        packfmt.open(d)


def test_manifest_shard_records_exceed_its_size(ds_copy):
    """A manifest whose shard cannot hold its records' index entries (size < 80 + 32 * records)."""
    d, _ = ds_copy
    m = h.manifest(d)
    m["shards"][0]["size"] = h.HEADER + h.FOOTER
    h.write_manifest(d, m)
    with pytest.raises(packfmt.PackError):
        ds = packfmt.open(d)
        ds[0]


def test_index_with_invalid_string_offsets_does_not_crash(ds_copy):
    """A hostile index whose key column has offsets out of bounds (checksums fixed): refused, no crash.
    Run in a child: the bug this pins down was a SIGBUS/SIGSEGV in index_of()."""
    d, _ = ds_copy
    code = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import numpy as np, pyarrow as pa, packfmt, _hostile as h
t = h.read_index({d!r})
keys = t.column("key").chunk(0)
offs = np.frombuffer(keys.buffers()[1], dtype=np.int32).copy()
offs[2] = 1 << 24
bad = pa.Array.from_buffers(pa.string(), len(keys), [None, pa.py_buffer(offs.tobytes()), keys.buffers()[2]])
h.rewrite_index({d!r}, t.set_column(0, "key", bad))
try:
    ds = packfmt.open({d!r})
    ds.index_of("d3/s0003.bin")
    ds.key(1)
    print("accepted")
except packfmt.PackError as e:
    print("refused", type(e).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-2000:]}"
    assert "refused ManifestError" in r.stdout


@pytest.mark.parametrize("use_mmap", MODES)
def test_index_and_shards_disagree(ds_copy, use_mmap):
    """Index rows shifted within the data region or carrying another record's checksum never read as
    wrong bytes: the record checksum from the index catches them."""
    d, payloads = ds_copy
    t = h.read_index(d)
    offs = t.column("offset").to_pylist()
    lens = t.column("stored_len").to_pylist()
    sums = t.column("checksum").to_pylist()
    for row in (3, 4, 5):  # records of 100+ bytes, so a shifted row reads other bytes
        for col, value in (("offset", offs[row] + 1), ("offset", offs[row] - 1), ("stored_len", lens[row] - 1),
                           ("checksum", sums[row] ^ 1), ("checksum", sums[row + 1])):
            dd = h.copy(d, d + f"-{row}-{col}-{value}")
            h.set_index_cell(dd, col, row, value)
            try:
                ds = packfmt.open(dd, mmap=use_mmap)
            except packfmt.ManifestError:
                continue
            results = _read_each(ds, payloads)
            assert isinstance(results[row], packfmt.CorruptShardError), (row, col, value)
            assert [i for i, r in results.items() if isinstance(r, Exception)] == [row]


def test_shards_swapped(ds_copy):
    d, payloads = ds_copy
    a, b = h.shard_path(d, 0), h.shard_path(d, 1)
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    h.fix_manifest_shard_sizes(d)  # even with sizes made to agree
    try:
        ds = packfmt.open(d)
    except packfmt.ManifestError:  # the index's bounds checks may already see it
        return
    results = _read_each(ds, payloads)
    for i in np.flatnonzero(ds.shard_of <= 1).tolist():
        if payloads[i]:
            assert isinstance(results[i], packfmt.CorruptShardError)


# ----------------------------------------------------------------------------- a hostile shard

@pytest.mark.parametrize("field, value", [
    ("offset", 0),                     # overlaps the header
    ("offset", 2**63),                 # far past the end
    ("offset", 2**64 - 1),             # offset + length overflows
    ("stored_len", 2**31),             # beyond the record size cap
    ("stored_len", 2**32 - 1),
    ("raw_len", 2**32 - 1),            # a decompression bomb declared in the shard
    ("flags", 0x10),                   # unknown flag bits
    ("flags", 3),                      # unknown codec
    ("reserved", 1),
])
def test_hostile_shard_entry(ds_copy, field, value):
    d, _ = ds_copy
    path = h.shard_path(d, 0)
    h.set_entry_field(path, 1, field, value)
    if field == "reserved":
        _core.Shard(path)  # reserved bits are ignored in entries, but the record is still served right
        return
    with pytest.raises(packfmt.CorruptShardError) as ei:
        _core.Shard(path)
    assert "shard-00000.pack" in str(ei.value)


def test_hostile_shard_entries_overlap_index_and_footer(tmp_path):
    """Entries that tile the data region but a footer that claims the index starts later or earlier."""
    path = str(tmp_path / "s.pack")
    w = _core.ShardWriter(path)
    for k in range(4):
        w.append(b"r%d" % k * 10, 20)
    w.close()
    f = h.footer(path)
    for delta in (-32, -1, 1, 32, h.FOOTER):
        def edit(data, delta=delta):
            fp = len(data) - h.FOOTER
            data[fp:fp + 8] = (f["index_offset"] + delta).to_bytes(8, "little")
        p2 = str(tmp_path / f"s{delta}.pack")
        with open(path, "rb") as src, open(p2, "wb") as dst:
            dst.write(src.read())
        h.rewrite_shard(p2, edit)
        with pytest.raises(packfmt.CorruptShardError):
            _core.Shard(p2)
    for count in (0, 5, 2**32, 2**64 - 1):
        def edit(data, count=count):
            fp = len(data) - h.FOOTER
            data[fp + 8:fp + 16] = count.to_bytes(8, "little")
        p2 = str(tmp_path / f"c{count}.pack")
        with open(path, "rb") as src, open(p2, "wb") as dst:
            dst.write(src.read())
        h.rewrite_shard(p2, edit)
        with pytest.raises(packfmt.CorruptShardError):
            _core.Shard(p2)


def test_shardset_refuses_rows_outside_the_data_region(tmp_path):
    """The C batch reader checks every row itself, whatever the Python layer checked before."""
    path = str(tmp_path / "s.pack")
    w = _core.ShardWriter(path)
    w.append(b"abcdef", 6)
    w.append(b"ghijkl", 6)
    info = w.close()
    size = info["size"]
    data_end = size - h.FOOTER - 2 * h.ENTRY
    rows = [(32, 6), (38, 6), (0, 6), (data_end - 3, 6), (data_end, 1), (2**64 - 3, 6), (size, 6), (32, 2**32 - 1)]
    n = len(rows)
    ss = _core.ShardSet([path], np.array([size], dtype=np.uint64), np.zeros(n, dtype=np.uint32),
                        np.array([r[0] for r in rows], dtype=np.uint64),
                        np.array([min(r[1], 2**32 - 1) for r in rows], dtype=np.uint32),
                        np.array([_core.xxh3_64(b"abcdef"), _core.xxh3_64(b"ghijkl")] + [0] * (n - 2), dtype=np.uint64),
                        use_mmap=False)
    assert ss.read_rows(np.array([1, 0], dtype=np.int64)) == [b"ghijkl", b"abcdef"]
    for k in range(2, n):
        if rows[k][1] > 2**20:
            continue  # read_rows would allocate the declared length first; covered by test_decompression_bomb
        with pytest.raises(packfmt.CorruptShardError) as ei:
            ss.read_rows(np.array([0, k], dtype=np.int64))
        assert ei.value.sample == k


# ----------------------------------------------------------------------------- decompression bombs

def test_decompression_bomb_declared_beyond_the_cap_is_refused_at_open(tmp_path):
    d = str(tmp_path / "ds")
    h.make_dataset(d, compression="zstd")
    t = h.read_index(d)
    row = t.column("flags").to_pylist().index(_core.CODEC_ZSTD)
    for value in (_core.MAX_RECORD_SIZE + 1, 2**32 - 1):
        h.set_index_cell(d, "raw_len", row, value)
        with pytest.raises(packfmt.ManifestError, match="raw"):
            packfmt.open(d)


def test_decompression_bomb_within_the_cap_does_not_allocate(tmp_path):
    """Every zstd row of a batch declares 2 GiB - 1 raw bytes for a ~1 KiB frame: refused as corrupt,
    and the process never touches gigabytes (run in a child so its peak RSS is its own)."""
    d = str(tmp_path / "ds")
    payloads = h.make_dataset(d, compression="zstd")
    t = h.read_index(d)
    flags = np.array(t.column("flags").to_pylist())
    raw = np.array(t.column("raw_len").to_pylist(), dtype=np.uint64)
    raw[flags != _core.CODEC_NONE] = _core.MAX_RECORD_SIZE
    import pyarrow as pa
    h.rewrite_index(d, t.set_column(t.schema.get_field_index("raw_len"), "raw_len", pa.array(raw, pa.uint32())))
    zrows = np.flatnonzero(flags != _core.CODEC_NONE).tolist()
    assert len(zrows) >= 3
    code = f"""
import resource, packfmt
ds = packfmt.open({d!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for rows in ({zrows[:1]!r}, {zrows!r}, {zrows!r} * 20):
    try:
        ds.get_batch(rows)
        print("READ")
    except packfmt.CorruptShardError as e:
        assert "decompress" in str(e), e
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("growth_kib", after - before)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "READ" not in r.stdout
    growth = int(r.stdout.split("growth_kib")[1])
    assert growth < 256 * 1024, f"peak RSS grew by {growth} KiB"
    # The honest raw records of that dataset still read.
    ds = packfmt.open(d)
    raw_rows = np.flatnonzero(flags == _core.CODEC_NONE).tolist()
    assert ds.get_batch(raw_rows) == [payloads[i] for i in raw_rows]


@h.NEEDS_RLIMIT_AS
def test_decompression_bomb_refused_before_allocating_under_memory_limit(tmp_path):
    """Found by fuzz_open.py: forged 2 GiB raw lengths, in a child whose address space has 1 GiB of room
    left (a container's limit, a loader with many workers), must be refused as corrupt before anything that
    size is allocated -- not die of MemoryError."""
    d = str(tmp_path / "ds")
    h.make_dataset(d, compression="zstd")
    t = h.read_index(d)
    flags = np.array(t.column("flags").to_pylist())
    zrows = np.flatnonzero(flags != _core.CODEC_NONE).tolist()
    honest, bomb = zrows[0], zrows[1]
    h.set_index_cell(d, "raw_len", bomb, _core.MAX_RECORD_SIZE)
    code = f"""
import resource, packfmt
ds = packfmt.open({d!r})
ds.get_batch([{honest}])
vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")][0] * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
for rows in ([{bomb}], [{honest}, {bomb}, {bomb}], [{honest}] + [{bomb}] * 8):
    try:
        ds.get_batch(rows)
        print("READ")
    except packfmt.CorruptShardError as e:
        print("refused")
    except MemoryError:
        print("MemoryError")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["refused"] * 3, (r.stdout, r.stderr[-2000:])


def test_zstd_frame_that_decodes_to_other_length(tmp_path):
    d = str(tmp_path / "ds")
    payloads = h.make_dataset(d, compression="zstd")
    t = h.read_index(d)
    row = t.column("flags").to_pylist().index(_core.CODEC_ZSTD)
    h.set_index_cell(d, "raw_len", row, len(payloads[row]) + 1)
    ds = packfmt.open(d)
    with pytest.raises(packfmt.CorruptShardError) as ei:
        ds[row]
    assert ei.value.sample == row


# ----------------------------------------------------------------------------- a hostile HTTP server

class _HostileHandler(__import__("http.server").server.BaseHTTPRequestHandler):
    """Serves a dataset directory, with one hostile behaviour chosen by the server's ``mode``."""

    def log_message(self, *a):
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        srv = self.server
        srv.hits.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if srv.mode == "endless-manifest" and name == "manifest.json":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"1000000\r\n" + b" " * 0x1000000 + b"\r\n"
            try:
                for _ in range(36):  # 576 MiB of whitespace, more than twice the manifest cap
                    self.wfile.write(chunk)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if srv.mode == "redirect-elsewhere" and name.endswith(".pack"):
            self.send_response(302)
            self.send_header("Location", f"{srv.elsewhere}/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = os.path.join(srv.root, name)
        flip = srv.mode == "flip-once" and name.endswith(".pack") and not srv.flipped and not head
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(path, "rb") as f:
            data = f.read()
        rng = self.headers.get("Range")
        if rng:
            a, b = rng.split("=")[1].split("-")
            a, b = int(a), min(int(b), len(data) - 1)
            body = data[a:b + 1]
            if flip and len(body) > 100:
                srv.flipped = True
                body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0x40]) + body[len(body) // 2 + 1:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _serve(root, mode, elsewhere=""):
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostileHandler)
    srv.root, srv.mode, srv.elsewhere, srv.hits, srv.flipped = root, mode, elsewhere, [], False
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@h.NEEDS_RLIMIT_AS
def test_http_endless_manifest_is_bounded(pristine, tmp_path):
    """A server that answers manifest.json with a huge chunked body (no Content-Length): refused once the
    256 MiB cap is passed, without holding the whole body (the child's peak RSS stays under 450 MiB)."""
    src, _ = pristine
    srv, url = _serve(src, "endless-manifest")
    try:
        code = ("import resource, packfmt\n"
                "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))\n"
                f"try:\n    packfmt.open({url + '/ds'!r}, cache=False)\n"
                "except packfmt.PackError as e:\n    print('refused', type(e).__name__, str(e)[:200])\n"
                "print('peak_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        srv.shutdown()
    assert r.returncode == 0 and "refused" in r.stdout, r.stderr[-2000:]
    assert "MemoryError" not in r.stdout, f"refused only because memory ran out: {r.stdout}"
    peak = int(r.stdout.split("peak_mib")[1])
    assert peak < 450, f"peak RSS {peak} MiB: the whole body was held in memory"


def test_http_redirect_to_another_host_is_not_followed(pristine, tmp_path):
    src, payloads = pristine
    other, other_url = _serve(src, "plain")
    srv, url = _serve(src, "redirect-elsewhere", elsewhere=other_url + "/ds")
    try:
        try:
            ds = packfmt.open(url + "/ds", cache=False)
            got = ds[len(ds) - 1]
            assert got == payloads[-1]
        except packfmt.PackError:
            pass
    finally:
        srv.shutdown()
        other.shutdown()
    assert other.hits == [], f"the reader followed a redirect to another host: {other.hits}"


def test_http_corrupt_answer_is_caught_and_not_cached_for_good(pristine, tmp_path):
    """One ranged GET answers with a flipped byte (a bad proxy, a flaky NIC): the record checksum catches
    it, the reader drops the poisoned blocks from the page cache and fetches them once more -- so the batch
    comes back right, never wrong bytes -- and later readers sharing the cache get the right bytes too."""
    from packfmt.cache import PageCache

    src, payloads = pristine
    srv, url = _serve(src, "flip-once")
    try:
        cache_dir = str(tmp_path / "cache")
        ds = packfmt.open(url + "/ds", cache=PageCache(cache_dir, capacity="64MiB", block_size=64 << 10))
        rows = list(range(len(ds)))
        assert ds.get_batch(rows) == payloads
        assert srv.flipped  # the corrupt answer was served, and caught
        outcomes = []
        for attempt in range(3):
            ds2 = packfmt.open(url + "/ds", cache=PageCache(cache_dir))
            try:
                got = ds2.get_batch(rows)
                assert got == payloads, "wrong bytes returned"
                outcomes.append("ok")
            except packfmt.CorruptShardError:
                outcomes.append("corrupt")
    finally:
        srv.shutdown()
    assert outcomes == ["ok"] * 3, f"the corrupt block stayed in the page cache: {outcomes}"
