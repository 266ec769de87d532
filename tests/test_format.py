"""The format as written down in docs/format.md is the format the C core reads and writes.

* The constants of ``packfmt._core`` equal the doc's constants table (and the numbers pinned here).
* A pure-Python reference decoder, built from the doc's byte tables with ``struct``, agrees with the C
  reader on random shards, and accepts exactly the corrupted shards the C reader accepts.
* A file or dataset that needs a newer reader is refused with ``UnsupportedVersionError``.
"""

import json
import os
import re
import struct

import numpy as np
import pyarrow as pa
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import packfmt
from packfmt import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "format.md")


# ---------------------------------------------------------------- the doc's tables

def doc_table(name: str) -> list:
    """Rows (lists of cell strings) of the table after ``<!-- table:NAME -->`` in docs/format.md."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    marker = f"<!-- table:{name} -->"
    assert marker in text, f"docs/format.md lacks {marker}"
    rows = []
    for line in text.split(marker, 1)[1].lstrip("\n").splitlines():
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows[1:]  # without the heading row


def unquote(cell: str) -> str:
    return cell.strip("`")


STRUCT_CODES = {"u16": "H", "u32": "I", "u64": "Q"}


class Layout:
    """A structure as the doc describes it: fields (name, offset, size, type) and a struct format."""

    def __init__(self, name: str):
        self.fields = []
        fmt = "<"
        pos = 0
        for off, size, typ, field, _desc in doc_table(name):
            off, size, field = int(off), int(size), unquote(field)
            assert off == pos, f"{name}: field {field} at {off}, previous field ended at {pos} (gap or overlap)"
            if typ == "bytes":
                fmt += f"{size}s"
            else:
                assert struct.calcsize("<" + STRUCT_CODES[typ]) == size, f"{name}.{field}: {typ} is not {size} bytes"
                fmt += STRUCT_CODES[typ]
            self.fields.append((field, off, size, typ))
            pos = off + size
        self.size = pos
        self.struct = struct.Struct(fmt)
        assert self.struct.size == self.size

    def decode(self, data: bytes) -> dict:
        assert len(data) == self.size
        return dict(zip([f[0] for f in self.fields], self.struct.unpack(data)))

    def offset_of(self, field: str) -> int:
        return next(off for name, off, _, _ in self.fields if name == field)


HEADER = Layout("header")
ENTRY = Layout("entry")
FOOTER = Layout("footer")


def doc_constants() -> dict:
    out = {}
    for name, value, _ in doc_table("constants"):
        name, value = unquote(name), unquote(value)
        out[name] = bytes.fromhex(value) if " " in value else int(value)
    return out


# ---------------------------------------------------------------- constants

PINNED = {
    "MAGIC": b"\x89PACK\r\n\x1a",
    "FORMAT_VERSION": 1,
    "FORMAT_READ_VERSION": 1,
    "HEADER_SIZE": 32,
    "ENTRY_SIZE": 32,
    "FOOTER_SIZE": 48,
    "MAX_RECORD_SIZE": 2**31 - 1,
    "MAX_RECORDS": 2**32 - 1,
    "CODEC_NONE": 0,
    "CODEC_ZSTD": 1,
    "CODEC_ZSTD_DICT": 2,
    "SHARD_HAS_ZSTD": 1,
    "SHARD_HAS_DICT": 2,
}


def test_constants_pinned():
    for name, value in PINNED.items():
        assert getattr(_core, name) == value, name
    assert packfmt.FORMAT_VERSION == _core.FORMAT_VERSION


def test_constants_match_the_doc():
    doc = doc_constants()
    assert set(doc) == set(PINNED)
    for name, value in doc.items():
        assert getattr(_core, name) == value, f"docs/format.md says {name} = {value!r}"


def test_layouts_match_the_doc_and_the_core():
    assert HEADER.size == _core.HEADER_SIZE
    assert ENTRY.size == _core.ENTRY_SIZE
    assert FOOTER.size == _core.FOOTER_SIZE
    assert [f[0] for f in HEADER.fields] == ["magic", "read_version", "write_version", "flags", "dict_id", "reserved",
                                              "header_checksum"]
    assert [f[0] for f in ENTRY.fields] == ["offset", "stored_len", "raw_len", "checksum", "flags", "reserved"]
    assert [f[0] for f in FOOTER.fields] == ["index_offset", "record_count", "index_checksum", "read_version",
                                              "write_version", "flags", "footer_checksum", "magic"]
    assert FOOTER.fields[-1][1] + FOOTER.fields[-1][2] == FOOTER.size  # the footer ends with the magic


def test_format_h_agrees_with_the_doc():
    # The byte tables in the comments of src_c/format.h list the same offsets, sizes and names.
    with open(os.path.join(ROOT, "src_c", "format.h")) as f:
        h = f.read()
    for layout, title in ((HEADER, "Header"), (ENTRY, "Index entry"), (FOOTER, "Footer")):
        block = h.split(f" * {title},", 1)[1].split("*/", 1)[0]
        rows = re.findall(r"^\s*\*\s+(\d+)\s+(\d+)\s+(\w+)", block, re.M)
        got = [(int(o), int(s), n) for o, s, n in rows]
        want = [(off, size, name) for name, off, size, _ in layout.fields]
        assert [g[:2] for g in got] == [w[:2] for w in want], title
        for (_, _, gname), (_, _, wname) in zip(got, want):
            # format.h calls the header's checksum just "checksum"
            assert gname == wname or (gname, wname) == ("checksum", "header_checksum"), (title, gname, wname)


# ---------------------------------------------------------------- reference decoder

class RefError(Exception):
    pass


def ref_decode(data: bytes, reader_version: int = 1) -> dict:
    """Decode and validate a shard from the doc alone (the steps of "Opening a shard")."""
    c = doc_constants()
    size = len(data)
    if size < c["HEADER_SIZE"] + c["FOOTER_SIZE"]:
        raise RefError("too short")
    f = FOOTER.decode(data[-FOOTER.size:])
    if f["magic"] != c["MAGIC"]:
        raise RefError("footer magic")
    if xxhash.xxh64_intdigest(data[-FOOTER.size:][:FOOTER.offset_of("footer_checksum")]) != f["footer_checksum"]:
        raise RefError("footer checksum")
    if f["read_version"] > reader_version:
        raise RefError("version")
    if f["flags"] & ~(c["SHARD_HAS_ZSTD"] | c["SHARD_HAS_DICT"]):
        raise RefError("footer flags")
    if f["record_count"] > c["MAX_RECORDS"]:
        raise RefError("record count")
    footer_pos = size - FOOTER.size
    n = f["record_count"]
    if not (c["HEADER_SIZE"] <= f["index_offset"] and f["index_offset"] + n * ENTRY.size == footer_pos):
        raise RefError("index position")
    index = data[f["index_offset"]:footer_pos]
    if xxhash.xxh64_intdigest(index) != f["index_checksum"]:
        raise RefError("index checksum")
    entries = []
    pos = c["HEADER_SIZE"]
    for i in range(n):
        e = ENTRY.decode(index[i * ENTRY.size:(i + 1) * ENTRY.size])
        if e["flags"] > c["CODEC_ZSTD_DICT"]:
            raise RefError("entry flags")
        if max(e["stored_len"], e["raw_len"]) > c["MAX_RECORD_SIZE"]:
            raise RefError("entry length")
        if e["flags"] == c["CODEC_NONE"] and e["stored_len"] != e["raw_len"]:
            raise RefError("raw length")
        if e["offset"] != pos or pos + e["stored_len"] > f["index_offset"]:
            raise RefError("tiling")
        pos += e["stored_len"]
        entries.append(e)
    if pos != f["index_offset"]:
        raise RefError("records end")
    h = HEADER.decode(data[:HEADER.size])
    if h["magic"] != c["MAGIC"]:
        raise RefError("header magic")
    if xxhash.xxh64_intdigest(data[:HEADER.offset_of("header_checksum")]) != h["header_checksum"]:
        raise RefError("header checksum")
    if h["read_version"] > reader_version:
        raise RefError("version")
    if h["flags"] & ~(c["SHARD_HAS_ZSTD"] | c["SHARD_HAS_DICT"]) or h["reserved"] != 0:
        raise RefError("header flags")
    if h["flags"] != f["flags"]:
        raise RefError("flags differ")
    records = [data[e["offset"]:e["offset"] + e["stored_len"]] for e in entries]
    bad = [i for i, (e, r) in enumerate(zip(entries, records)) if xxhash.xxh3_64_intdigest(r) != e["checksum"]]
    return {"header": h, "footer": f, "entries": entries, "records": records, "bad": bad}


def c_decode(path: str, use_mmap: bool) -> dict:
    s = _core.Shard(path, use_mmap=use_mmap)
    entries = [s.entry(i) for i in range(len(s))]
    records = [s.read(e[0], e[1]) for e in entries]
    bad, nbad = s.verify_records(0, len(s))
    return {"info": s.info, "entries": entries, "records": records, "bad": bad}


shard_st = st.fixed_dictionaries({
    "records": st.lists(st.tuples(st.binary(max_size=600), st.sampled_from([0, 1, 2]), st.integers(0, 5000)),
                        max_size=30),
    "flags": st.sampled_from([0, 1, 3]),
    "dict_id": st.integers(0, 2**32 - 1),
})


def write_shard(path, spec) -> list:
    flags = spec["flags"]
    dict_id = spec["dict_id"] if flags & _core.SHARD_HAS_DICT else 0
    w = _core.ShardWriter(path, flags, dict_id)
    want = []
    for data, codec, extra in spec["records"]:
        if codec == 2 and not flags & 2 or codec == 1 and not flags & 1:
            codec = 0
        raw = len(data) if codec == 0 else len(data) + extra  # the core stores bytes as given
        w.append(data, raw, codec)
        want.append((data, raw, codec))
    summary = w.close()
    return want, summary, dict_id


@given(spec=shard_st)
def test_reference_decoder_agrees_with_c(tmp_path_factory, spec):
    path = str(tmp_path_factory.mktemp("fmt") / "s.pack")
    want, summary, dict_id = write_shard(path, spec)
    data = open(path, "rb").read()
    ref = ref_decode(data)
    assert ref["bad"] == []
    h, f = ref["header"], ref["footer"]
    assert h["magic"] == f["magic"] == _core.MAGIC
    assert h["read_version"] == f["read_version"] == _core.FORMAT_READ_VERSION
    assert h["write_version"] == f["write_version"] == _core.FORMAT_VERSION
    assert h["flags"] == f["flags"] == spec["flags"] and h["dict_id"] == dict_id and h["reserved"] == 0
    assert f["record_count"] == len(want) == summary["records"]
    assert summary["size"] == len(data) and summary["checksum"] == xxhash.xxh64_intdigest(data)
    assert [(r, e["raw_len"], e["flags"]) for r, e in zip(ref["records"], ref["entries"])] == want
    assert all(e["reserved"] == 0 for e in ref["entries"])
    for use_mmap in (False, True):
        c = c_decode(path, use_mmap)
        info = c["info"]
        assert info["records"] == f["record_count"] and info["index_offset"] == f["index_offset"]
        assert info["flags"] == h["flags"] and info["dict_id"] == h["dict_id"] and info["file_size"] == len(data)
        assert (info["read_version"], info["write_version"]) == (f["read_version"], f["write_version"])
        assert c["entries"] == [(e["offset"], e["stored_len"], e["raw_len"], e["checksum"], e["flags"])
                                for e in ref["entries"]]
        assert c["records"] == ref["records"] and c["bad"] == []
    # The tail alone (one ranged read of 48 + 32 * record_count bytes) validates.
    tail = data[-(FOOTER.size + ENTRY.size * len(want)):]
    assert _core.check_tail(tail, len(data))["records"] == len(want)


@settings(max_examples=max(60, settings.default.max_examples))
@given(spec=shard_st, where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), data=st.data())
def test_corruption_verdicts_agree(tmp_path_factory, spec, where, bit, data):
    """Flip one bit anywhere: the C reader accepts the shard iff the reference decoder does, and a flip in a
    record is reported by both for that record only."""
    d = tmp_path_factory.mktemp("flip")
    path = str(d / "s.pack")
    write_shard(path, spec)
    buf = bytearray(open(path, "rb").read())
    region = data.draw(st.sampled_from(["any", "tail", "head"]))
    if region == "tail":
        at = len(buf) - 1 - int(where * min(len(buf), FOOTER.size + 64))
    elif region == "head":
        at = int(where * HEADER.size)
    else:
        at = int(where * len(buf))
    buf[at] ^= 1 << bit
    bad_path = str(d / "bad.pack")
    with open(bad_path, "wb") as f:
        f.write(buf)
    try:
        ref = ref_decode(bytes(buf))
    except RefError:
        ref = None
    for use_mmap in (False, True):
        if ref is None:
            with pytest.raises(packfmt.CorruptShardError):
                _core.Shard(bad_path, use_mmap=use_mmap)
        else:
            c = c_decode(bad_path, use_mmap)
            assert c["bad"] == ref["bad"]
            assert len(ref["bad"]) == 1  # the flip is in a record: exactly that record is reported


def test_truncated_shards_refused(tmp_path):
    path = str(tmp_path / "s.pack")
    write_shard(path, {"records": [(b"abc" * 50, 0, 0)] * 5, "flags": 0, "dict_id": 0})
    data = open(path, "rb").read()
    for n in (0, 1, 47, 48, 79, 80, 100, len(data) - 48, len(data) - 1):
        p = tmp_path / f"t{n}.pack"
        p.write_bytes(data[:n])
        with pytest.raises(packfmt.CorruptShardError):
            _core.Shard(str(p))
        with pytest.raises(RefError):
            ref_decode(data[:n])
    with pytest.raises(packfmt.CorruptShardError, match="truncated"):
        _core.Shard(str(tmp_path / "t100.pack"), expected_size=len(data))


# ---------------------------------------------------------------- versions

def with_read_version(data: bytes, version: int, header=True, footer=True) -> bytes:
    """The same shard with another read_version, every checksum recomputed: only the version is "wrong"."""
    buf = bytearray(data)
    if header:
        struct.pack_into("<H", buf, HEADER.offset_of("read_version"), version)
        hc = HEADER.offset_of("header_checksum")
        struct.pack_into("<Q", buf, hc, xxhash.xxh64_intdigest(bytes(buf[:hc])))
    if footer:
        fp = len(buf) - FOOTER.size
        struct.pack_into("<H", buf, fp + FOOTER.offset_of("read_version"), version)
        fc = FOOTER.offset_of("footer_checksum")
        struct.pack_into("<Q", buf, fp + fc, xxhash.xxh64_intdigest(bytes(buf[fp:fp + fc])))
    return bytes(buf)


def with_write_version(data: bytes, version: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<H", buf, HEADER.offset_of("write_version"), version)
    hc = HEADER.offset_of("header_checksum")
    struct.pack_into("<Q", buf, hc, xxhash.xxh64_intdigest(bytes(buf[:hc])))
    fp = len(buf) - FOOTER.size
    struct.pack_into("<H", buf, fp + FOOTER.offset_of("write_version"), version)
    fc = FOOTER.offset_of("footer_checksum")
    struct.pack_into("<Q", buf, fp + fc, xxhash.xxh64_intdigest(bytes(buf[fp:fp + fc])))
    return bytes(buf)


@pytest.mark.parametrize("where", ["both", "footer", "header"])
def test_newer_read_version_is_refused(tmp_path, where):
    path = str(tmp_path / "s.pack")
    write_shard(path, {"records": [(b"hello", 0, 0), (b"", 0, 0)], "flags": 0, "dict_id": 0})
    data = with_read_version(open(path, "rb").read(), 2, header=where != "footer", footer=where != "header")
    v2 = tmp_path / "v2.pack"
    v2.write_bytes(data)
    with pytest.raises(RefError, match="version"):
        ref_decode(data)
    assert ref_decode(data, reader_version=2)["records"] == [b"hello", b""]  # only the version differs
    for use_mmap in (False, True):
        with pytest.raises(packfmt.UnsupportedVersionError) as e:
            _core.Shard(str(v2), use_mmap=use_mmap)
        msg = str(e.value)
        assert "v2.pack" in msg and "version 2" in msg and "up to 1" in msg and "upgrade" in msg, msg
        assert not isinstance(e.value, packfmt.CorruptShardError)
        assert isinstance(e.value, packfmt.PackError)
    if where != "header":
        with pytest.raises(packfmt.UnsupportedVersionError):
            _core.check_tail(data[-(FOOTER.size + 2 * ENTRY.size):], len(data))


def test_newer_write_version_alone_is_readable(tmp_path):
    # write_version is informational: a newer writer that keeps read_version 1 stays readable.
    path = str(tmp_path / "s.pack")
    write_shard(path, {"records": [(b"hello", 0, 0)], "flags": 0, "dict_id": 0})
    p = tmp_path / "w7.pack"
    p.write_bytes(with_write_version(open(path, "rb").read(), 7))
    s = _core.Shard(str(p))
    assert s.info["write_version"] == 7 and s.info["read_version"] == 1
    assert s.read(*s.entry(0)[:2]) == b"hello"


def make_dataset(tmp_path, name="ds"):
    out = tmp_path / name
    with packfmt.Writer(out, shard_size=100) as w:
        for i in range(6):
            w.add(f"k{i}", b"v%d" % i * 20, label=i)
    return out


def rewrite_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_dataset_with_newer_min_reader_version_is_refused(tmp_path):
    out = make_dataset(tmp_path)
    rewrite_manifest(out, lambda m: m.update(min_reader_version=2, format_version=2))
    with pytest.raises(packfmt.UnsupportedVersionError) as e:
        packfmt.open(out)
    msg = str(e.value)
    assert "manifest.json" in msg and "version 2" in msg and "up to 1" in msg and "upgrade" in msg, msg


def test_dataset_with_newer_format_version_but_old_min_reader_opens(tmp_path):
    out = make_dataset(tmp_path)
    rewrite_manifest(out, lambda m: m.update(format_version=3, some_future_field={"x": 1}))
    ds = packfmt.open(out)
    assert ds.get_batch([5, 0]) == [b"v5" * 20, b"v0" * 20]


def test_dataset_with_a_newer_shard_is_refused_on_read(tmp_path):
    out = make_dataset(tmp_path)
    ds = packfmt.open(out)
    name = ds.shards[1]
    data = with_read_version((out / name).read_bytes(), 2)
    (out / name).write_bytes(data)
    rewrite_manifest(out, lambda m: m["shards"][1].update(checksum=f"{xxhash.xxh64_intdigest(data):016x}"))
    ds = packfmt.open(out)
    row = int(np.flatnonzero(ds.shard_of == 1)[0])
    with pytest.raises(packfmt.UnsupportedVersionError, match=name):
        ds[row]
    with pytest.raises(packfmt.UnsupportedVersionError):
        ds.get_batch([0, row])
    assert ds[0] == b"v0" * 20  # the other shard is fine


# ---------------------------------------------------------------- the dataset files

def test_index_is_one_uncompressed_memory_mappable_batch(tmp_path):
    out = tmp_path / "ds"
    with packfmt.Writer(out, shard_size=200, compression="zstd") as w:
        for i in range(300):
            w.add(f"k{i}", b"x" * (i % 50), label=i, name=str(i))
    path = str(out / "index.arrow")
    source = pa.memory_map(path, "r")
    reader = pa.ipc.open_file(source)
    assert reader.num_record_batches == 1
    table = reader.read_all()
    # Zero-copy: every buffer of every column lies inside the mapped file (compressed buffers would not).
    mapped = pa.memory_map(path, "r").read_buffer()
    lo, hi = mapped.address, mapped.address + mapped.size
    reader = pa.ipc.open_file(mapped)
    batch = reader.get_batch(0)
    for col in batch.columns:
        for buf in col.buffers():
            if buf is not None and buf.size:
                assert lo <= buf.address and buf.address + buf.size <= hi, col.type
    names = [unquote(r[0]) for r in doc_table("index")]
    types = {unquote(r[0]): unquote(r[1].split()[0]) for r in doc_table("index")}
    assert table.schema.names[:len(names)] == names
    for n in names:
        assert str(table.schema.field(n).type) == types[n], n
    assert table.schema.names[len(names):] == ["label", "name"] == packfmt.open(out).manifest["index"]["columns"]


def test_manifest_fields_are_documented(tmp_path):
    out = tmp_path / "ds"
    with packfmt.Writer(out, compression="zstd-dict", dict_size=1024, metadata={"a": 1}) as w:
        for i in range(200):
            w.add(f"k{i}", b"sample %d of a text-like corpus, %s" % (i, b"abc" * (i % 30)))
    m = packfmt.open(out).manifest
    assert m["compression"]["dictionary"] is not None
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    section = doc.split("## manifest.json", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_.\[\]]+)`", section, re.M))
    documented |= {x for row in re.findall(r"^\| (`[^|]+`(?:, `[^|]+`)+) \|", section, re.M)
                   for x in re.findall(r"`([^`]+)`", row)}

    def paths(obj, prefix=""):
        for k, v in obj.items():
            p = f"{prefix}{k}"
            yield p
            if isinstance(v, dict) and k not in ("metadata",):
                yield from paths(v, p + ".")
            if isinstance(v, list) and v and isinstance(v[0], dict):
                yield from paths(v[0], p + "[].")

    missing = [p for p in paths(m) if p not in documented and p not in ("compression", "index", "stats", "created",
                                                                          "compression.dictionary")]
    assert not missing, f"manifest fields not in docs/format.md: {missing}"


def test_golden_header_example_in_the_doc_is_real():
    # The hex example in the doc is the golden shard's real header and footer.
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    data = open(os.path.join(ROOT, "tests", "data", "golden", "raw", "shard-00000.pack"), "rb").read()
    block = doc.split("```\nheader", 1)[1].split("```", 1)[0]
    lines = ("header" + block).splitlines()
    hexes = [ln.split(None, 1)[1] if ln.startswith(("header", "footer")) else ln for ln in lines]
    hexes = [h for h in hexes if re.fullmatch(r"[0-9a-f ]+", h.strip())]
    got = bytes.fromhex("".join(h.replace(" ", "") for h in hexes))
    assert got == data[:32] + data[-48:]
