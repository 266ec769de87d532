"""Atheris harness over the Python open path: ``packfmt.open`` + random reads of a mutated dataset.

Each fuzzer input is a small program of mutations applied to a copy of one of three real datasets
(raw, zstd, zstd with a dictionary; two shards each): flip / overwrite bytes of the manifest, the index,
a shard or the dictionary; truncate, extend, delete or replace a file; set a manifest field to a hostile
value (``../x``, absolute paths, URLs, huge or negative numbers, wrong types); rewrite one index cell
*and* fix the manifest's checksum of the index (a hostile producer, not an accident); rewrite a shard's
own index entry and repair its checksums.  Then the dataset is opened (mmap and pread) and read:
``ds[i]``, ``get_batch`` of random rows, ``key``, ``index_of``, ``column``, iteration.

Oracles:
  * only ``packfmt.PackError`` subclasses may escape (plus ``KeyError`` from ``index_of`` of a key the
    mutation removed); any other exception, a crash, a hang or a huge allocation is a finding;
  * never wrong bytes: when only accidents happened (no hostile-producer mutation), every sample that
    reads successfully equals the original; after a hostile-producer mutation every sample still has
    the length its index row declares.

Survey mode (``PK_FUZZ_SURVEY=DIR``, used by fuzz/run.sh): log each distinct finding (exception type,
file and function) with its input to DIR and keep going instead of stopping at the first one.

Usage:
  python fuzz/fuzz_open.py [libFuzzer flags] CORPUS_DIR     fuzz (needs ``pip install atheris``)
  python fuzz/fuzz_open.py --replay FILE...                 run inputs once, no atheris needed
  python fuzz/fuzz_open.py --export FILE OUTDIR             write the mutated dataset an input makes
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FUZZING = __name__ == "__main__" and "--replay" not in sys.argv and "--export" not in sys.argv
if FUZZING:
    import atheris

    with atheris.instrument_imports(include=["packfmt"]):
        import packfmt
        from packfmt import _core
        from packfmt import dataset as _dataset  # noqa: F401
        from packfmt import manifest as _manifest  # noqa: F401
else:
    import packfmt
    from packfmt import _core

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from packfmt.writer import serialize_index  # noqa: E402

HOSTILE_STRINGS = ["../x", "../../etc/passwd", "/etc/passwd", "/tmp/x.pack", "file:///etc/passwd",
                   "http://127.0.0.1:1/x", "s3://other-bucket/x", "shard-00000.pack/..", ".", "..", "",
                   "a\x00b", "shard-00000.pack\n", "x" * 300, "manifest.json", "index.arrow",
                   "dictionary.zstd", "shard-00001.pack", "sub/shard-00000.pack", "\u00e9\u00e9.pack",
                   "C:\\x", "~/x", "zstd", "zstd-dict", "none", "packfmt", "0000000000000000",
                   "ffffffffffffffff"]
HOSTILE_INTS = [0, 1, -1, 2, 31, 32, 80, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, 10**30]


class Input:
    """A byte consumer (the subset of atheris.FuzzedDataProvider used here, so replay needs no atheris)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def bytes(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] (lo when the input is exhausted)."""
        span = hi - lo
        if span <= 0:
            return lo
        nbytes = (span.bit_length() + 7) // 8
        b = self.bytes(nbytes)
        return lo + int.from_bytes(b, "little") % (span + 1) if b else lo

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def left(self) -> int:
        return len(self.data) - self.pos


# ------------------------------------------------------------------ base datasets

def _payload(i: int) -> bytes:
    sizes = [0, 1, 7, 100, 1000, 4096, 33, 0, 250, 3000]
    n = sizes[i % len(sizes)]
    return (b"sample %05d " % i * (n // 13 + 1))[:n]


def build_bases(root: str) -> dict:
    """Three small real datasets; returns {name: (dir, [payloads])}."""
    bases = {}
    for name, comp in (("raw", "none"), ("zstd", "zstd"), ("dict", "zstd-dict")):
        d = os.path.join(root, name)
        payloads = []
        with packfmt.Writer(d, shard_size=6000, compression=comp, dict_size=1024, dict_train_bytes=2000) as w:
            for i in range(24):
                p = _payload(i)
                payloads.append(p)
                w.add(f"dir{i % 3}/file-{i:03d}.bin", p, label=i % 5, weight=i / 3)
        bases[name] = (d, payloads)
    return bases


def _files(d: str) -> list:
    """The regular files of the dataset (what earlier mutations left of it)."""
    return sorted(f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))


def _fix_manifest_index(d: str, raw: bytes) -> None:
    with open(os.path.join(d, "manifest.json")) as f:
        m = json.load(f)
    m["index"]["size"] = len(raw)
    m["index"]["checksum"] = f"{_core.xxh64(raw):016x}"
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(m, f)


# ------------------------------------------------------------------ mutations

def _mutate_bytes(inp: Input, path: str) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    op = inp.int(0, 5)
    if op == 0 and data:  # overwrite a few bytes
        pos = inp.int(0, len(data) - 1)
        new = inp.bytes(inp.int(1, 8))
        data[pos:pos + len(new)] = new
    elif op == 1 and data:  # flip one bit
        pos = inp.int(0, len(data) - 1)
        data[pos] ^= 1 << inp.int(0, 7)
    elif op == 2:  # truncate
        del data[inp.int(0, len(data)):]
    elif op == 3:  # extend
        data += inp.bytes(inp.int(0, 64))
    elif op == 4:  # replace by the input's bytes
        data = bytearray(inp.bytes(inp.int(0, 256)))
    else:  # overwrite near the end (footers, Arrow trailers)
        if data:
            pos = max(0, len(data) - 1 - inp.int(0, 96))
            new = inp.bytes(inp.int(1, 8))
            data[pos:pos + len(new)] = new
    with open(path, "wb") as f:
        f.write(data)


def _hostile_value(inp: Input):
    kind = inp.int(0, 6)
    if kind == 0:
        return inp.pick(HOSTILE_STRINGS)
    if kind == 1:
        return inp.pick(HOSTILE_INTS)
    if kind == 2:
        return None
    if kind == 3:
        return [inp.pick(HOSTILE_STRINGS)]
    if kind == 4:
        return {"name": inp.pick(HOSTILE_STRINGS), "size": inp.pick(HOSTILE_INTS)}
    if kind == 5:
        return inp.bytes(inp.int(0, 16)).decode("latin-1")
    return float(inp.pick(HOSTILE_INTS)) + 0.5


def _mutate_manifest(inp: Input, d: str) -> None:
    path = os.path.join(d, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    # Walk to a random container, then set / delete a random key in it.
    node = m
    for _ in range(inp.int(0, 3)):
        children = [v for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, (dict, list)) and v]
        if not children:
            break
        node = inp.pick(children)
    if isinstance(node, dict):
        keys = sorted(node) + ["extra"]
        key = inp.pick(keys)
        if inp.int(0, 5) == 0:
            node.pop(key, None)
        else:
            node[key] = _hostile_value(inp)
    elif isinstance(node, list) and node:
        op = inp.int(0, 3)
        if op == 0:
            node.pop(inp.int(0, len(node) - 1))
        elif op == 1:
            node.append(node[inp.int(0, len(node) - 1)])
        elif op == 2:
            node.reverse()
        else:
            node[inp.int(0, len(node) - 1)] = _hostile_value(inp)
    with open(path, "w") as f:
        json.dump(m, f)


def _mutate_index_cell(inp: Input, d: str) -> None:
    """A hostile producer: change one cell of the global index and make the manifest agree."""
    path = os.path.join(d, "index.arrow")
    with pa.memory_map(path) as src:
        table = pa.ipc.open_file(src).read_all()
    table.validate(full=True)  # an earlier byte mutation may have broken it: pyarrow itself is not safe then
    if table.num_rows == 0:
        return
    col = inp.pick(table.schema.names)
    row = inp.int(0, table.num_rows - 1)
    typ = table.schema.field(col).type
    values = table.column(col).to_pylist()
    if pa.types.is_string(typ):
        values[row] = inp.pick(HOSTILE_STRINGS + values)
    elif pa.types.is_floating(typ):
        values[row] = float(inp.int(-(2**31), 2**31))
    else:
        bits = typ.bit_width
        signed = pa.types.is_signed_integer(typ)
        choice = inp.int(0, 3)
        if choice == 0:
            v = inp.pick(HOSTILE_INTS)
        elif choice == 1:
            v = values[row] + inp.int(-64, 64)
        elif choice == 2:
            v = values[inp.int(0, table.num_rows - 1)]
        else:
            v = inp.int(0, 2**bits - 1)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        values[row] = min(max(v, lo), hi)
    table = table.set_column(table.schema.get_field_index(col), col, pa.array(values, type=typ))
    raw = serialize_index(table)
    with open(path, "wb") as f:
        f.write(raw)
    _fix_manifest_index(d, raw)


def _mutate_shard_entry(inp: Input, d: str, shard: str) -> None:
    """A hostile producer: change a field of one entry of a shard's own index, then repair the index
    and footer checksums so the shard passes its own structural checks up to the field's meaning."""
    path = os.path.join(d, shard)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if len(data) < _core.HEADER_SIZE + _core.FOOTER_SIZE:
        return
    fpos = len(data) - _core.FOOTER_SIZE
    index_offset = int.from_bytes(data[fpos:fpos + 8], "little")
    count = int.from_bytes(data[fpos + 8:fpos + 16], "little")
    if count == 0 or index_offset + count * _core.ENTRY_SIZE != fpos:
        return
    e = index_offset + inp.int(0, count - 1) * _core.ENTRY_SIZE
    field = inp.pick([(0, 8), (8, 4), (12, 4), (16, 8), (24, 4)])
    v = inp.pick(HOSTILE_INTS) if inp.int(0, 1) else int.from_bytes(data[e + field[0]:e + sum(field)], "little") + inp.int(-40, 40)
    data[e + field[0]:e + sum(field)] = (v % (1 << (8 * field[1]))).to_bytes(field[1], "little")
    data[fpos + 16:fpos + 24] = _core.xxh64(bytes(data[index_offset:fpos])).to_bytes(8, "little")
    data[fpos + 32:fpos + 40] = _core.xxh64(bytes(data[fpos:fpos + 32])).to_bytes(8, "little")
    with open(path, "wb") as f:
        f.write(data)


def apply(inp: Input, d: str) -> bool:
    """Mutate the dataset in d; returns True when a hostile-producer mutation was applied."""
    hostile = False
    for _ in range(inp.int(1, 3)):
        files = _files(d)
        kind = inp.int(0, 7)
        if kind <= 1 and files:
            _mutate_bytes(inp, os.path.join(d, inp.pick(files)))
        elif kind == 2 and files:
            os.unlink(os.path.join(d, inp.pick(files)))
        elif kind == 3 and "manifest.json" in files:
            try:
                _mutate_manifest(inp, d)
            except ValueError:  # the manifest is no longer JSON: a byte mutation came first
                pass
        elif kind == 4 and "index.arrow" in files and "manifest.json" in files:
            try:
                _mutate_index_cell(inp, d)
                hostile = True
            except Exception:  # noqa: BLE001 - an earlier mutation already broke the index: nothing to rewrite
                pass
        elif kind == 5:
            shards = [f for f in files if f.endswith(".pack")]
            if shards:
                _mutate_shard_entry(inp, d, inp.pick(shards))
                hostile = True
        elif kind == 6 and files:  # a symlink in place of a file, pointing outside the dataset
            victim = os.path.join(d, inp.pick(files))
            os.unlink(victim)
            os.symlink(inp.pick(["/dev/zero", "/dev/null", "/proc/self/mem", "/etc/passwd", "/nonexistent"]), victim)
        elif kind == 7 and files:  # a directory in place of a file
            victim = os.path.join(d, inp.pick(files))
            os.unlink(victim)
            os.mkdir(victim)
    return hostile


# ------------------------------------------------------------------ reading

ALLOWED = (packfmt.PackError,)


def read_all(inp: Input, d: str, payloads: list, hostile: bool) -> None:
    try:
        ds = packfmt.open(d, mmap=bool(inp.int(0, 1)), verify=True)
    except ALLOWED:
        return
    n = len(ds)
    if n == 0:
        return

    def check(i: int, got) -> None:
        assert isinstance(got, bytes), type(got)
        if hostile:
            assert len(got) == int(ds.raw_lengths[i]), (i, len(got), int(ds.raw_lengths[i]))
        else:
            assert i < len(payloads) and got == payloads[i], f"wrong bytes for sample {i}"

    for _ in range(inp.int(1, 4)):
        op = inp.int(0, 6)
        try:
            if op == 0:
                i = inp.int(0, n - 1)
                check(i, ds[i])
            elif op == 1:
                rows = [inp.int(0, n - 1) for _ in range(inp.int(1, 40))]
                for i, got in zip(rows, ds.get_batch(rows)):
                    check(i, got)
            elif op == 2:
                for i, got in enumerate(ds):
                    check(i, got)
            elif op == 3:
                i = inp.int(0, n - 1)
                k = ds.key(i)
                assert isinstance(k, str)
                try:
                    j = ds.index_of(k)
                    assert ds.key(j) == k
                except KeyError:
                    pass
            elif op == 4:
                for c in ds.columns:
                    ds.column(c)
            elif op == 5:
                try:
                    ds.index_of(inp.pick(HOSTILE_STRINGS))
                except KeyError:
                    pass
            else:
                rows = np.array([inp.int(0, n - 1) for _ in range(inp.int(1, 300))], dtype=np.int64)
                for i, got in zip(rows.tolist(), ds.get_batch(rows)):
                    check(i, got)
        except ALLOWED:
            pass


# ------------------------------------------------------------------ driver

_STATE = {}


def _setup():
    if not _STATE:
        root = tempfile.mkdtemp(prefix="pk-fuzz-open-")
        _STATE["bases"] = build_bases(os.path.join(root, "bases"))
        _STATE["work"] = os.path.join(root, "work")
    return _STATE


def make_dataset(data: bytes, out: str):
    """Materialise the mutated dataset an input describes; returns (input, payloads, hostile)."""
    st = _setup()
    inp = Input(data)
    name = inp.pick(sorted(st["bases"]))
    base, payloads = st["bases"][name]
    if os.path.lexists(out):
        shutil.rmtree(out)
    shutil.copytree(base, out)
    hostile = apply(inp, out)
    return inp, payloads, hostile


def TestOneInput(data: bytes) -> None:
    st = _setup()
    inp, payloads, hostile = make_dataset(data, st["work"])
    survey = os.environ.get("PK_FUZZ_SURVEY")
    if survey and "rlimit" not in st:  # turn runaway allocations into MemoryError findings
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))
        st["rlimit"] = True
    if not survey:
        read_all(inp, st["work"], payloads, hostile)
        return
    # Survey mode: log each distinct finding (exception type + innermost packfmt frame) with the input
    # that caused it, and keep fuzzing instead of stopping at the first one.
    try:
        read_all(inp, st["work"], payloads, hostile)
    except Exception as e:  # noqa: BLE001 - that is the point
        import hashlib
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/packfmt/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].name}" if frames else "?"
        sig = f"{type(e).__name__} {where}"
        seen = st.setdefault("seen", set())
        if sig not in seen:
            seen.add(sig)
            os.makedirs(survey, exist_ok=True)
            name = hashlib.sha1(data).hexdigest()[:16]
            with open(os.path.join(survey, f"finding-{name}.bin"), "wb") as f:
                f.write(data)
            with open(os.path.join(survey, "findings.txt"), "a") as f:
                f.write(f"== {sig} finding-{name}.bin\n{traceback.format_exc()}\n")


def main(argv) -> int:
    if argv[1:2] == ["--replay"]:
        for path in argv[2:]:
            with open(path, "rb") as f:
                TestOneInput(f.read())
            print(f"ok {path}")
        return 0
    if argv[1:2] == ["--export"]:
        with open(argv[2], "rb") as f:
            make_dataset(f.read(), argv[3])
        print(f"wrote {argv[3]}")
        return 0
    _setup()
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
