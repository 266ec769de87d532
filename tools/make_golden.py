#!/usr/bin/env python3
"""Write the golden datasets in tests/data/golden/ that freeze format version 1.

    python tools/make_golden.py            # (re)write tests/data/golden/
    python tools/make_golden.py --check    # write into a temporary directory and compare bytes, change nothing
                                           # (index.arrow bytes also depend on the pyarrow version)

Only run it to write when the format changes on purpose (and the format version with it): the files it
writes are what tests/test_golden.py compares every future build against.  The output is deterministic:
the samples below are fixed, and the one field of the manifest that varies between runs (``created``) is
replaced by fixed values.  Three datasets are written:

  raw/        compression "none", shard_size 600 bytes  -> 2 shards
  zstd/       compression "zstd:3", shard_size 400 bytes -> 2 shards; records zstd does not shrink stay raw
  zstd-dict/  compression "zstd-dict:3", the 5 samples plus 24 JSON-like ones (a dictionary needs at least
              8 samples to train on), dict_size 1024, shard_size 500 -> 2 shards and dictionary.zstd

golden.json records the library versions that wrote them (zstd's output may differ between libzstd
versions without any format change; the test compares zstd shard bytes only under the same libzstd).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")

FIXED_CREATED = {"at": "2026-01-01T00:00:00+00:00", "by": "packfmt tools/make_golden.py", "host": "golden",
                 "user": "golden"}


def _noise(n: int) -> bytes:
    """Incompressible but reproducible bytes (a SHA-256 chain)."""
    out, block = bytearray(), b"packfmt golden noise"
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


#: (key, data, user columns).  An empty sample, a unicode key, bytes zstd cannot shrink, text it can.
SAMPLES = [
    ("README.txt", (b"packfmt golden sample: the quick brown fox jumps over the lazy dog. " * 5)[:300],
     {"label": 0, "score": 0.5, "split": "train"}),
    ("empty", b"", {"label": 1, "score": None, "split": "train"}),
    ("donn\u00e9es/\u00fcn\u00efc\u00f8d\u00e9-\u952e.bin", bytes(range(256)), {"label": 2, "score": -1.25, "split": None}),
    ("noise.bin", _noise(100), {"label": 3, "score": 1e10, "split": "test"}),
    ("table.csv", b"".join(b"%d,%d,%s\n" % (i, i * i, b"row") for i in range(40))[:300],
     {"label": 4, "score": 0.0, "split": "test"}),
]

#: More samples for the dictionary dataset: similar small JSON records, what a dictionary is for.
DICT_SAMPLES = SAMPLES + [
    (f"records/{i:02d}.json",
     b'{"id": %d, "name": "item-%d", "tags": ["alpha", "beta"], "value": %d.%d}\n' % (i, i, i * 37 % 101, i % 10) * 3,
     {"label": 5 + i % 3, "score": None, "split": None})
    for i in range(24)
]

#: name -> Writer arguments.
DATASETS = {
    "raw": {"compression": "none", "shard_size": 600},
    "zstd": {"compression": "zstd:3", "shard_size": 400},
    "zstd-dict": {"compression": "zstd-dict:3", "shard_size": 500, "dict_size": 1024},
}


def samples(name: str) -> list:
    return DICT_SAMPLES if name == "zstd-dict" else SAMPLES


def write_dataset(path: str, name: str) -> None:
    import packfmt

    with packfmt.Writer(path, **DATASETS[name]) as w:
        for key, data, cols in samples(name):
            w.add(key, data, **{k: v for k, v in cols.items() if v is not None})
    fix_manifest(path)


def fix_manifest(path: str) -> None:
    """Replace the manifest's ``created`` block (time, host, user) by fixed values, atomically."""
    from packfmt import manifest as mf

    mpath = os.path.join(path, mf.MANIFEST_NAME)
    with open(mpath, "rb") as f:
        raw = json.loads(f.read())
    raw["created"] = dict(FIXED_CREATED)
    tmp = mpath + ".tmp"
    with open(tmp, "wb") as f:
        f.write(mf.dump(raw))
    os.replace(tmp, mpath)


def versions() -> dict:
    import pyarrow
    import zstandard

    import packfmt

    return {"packfmt": packfmt.__version__, "format_version": packfmt.FORMAT_VERSION,
            "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)), "pyarrow": pyarrow.__version__}


def write_all(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name in DATASETS:
        d = os.path.join(out, name)
        if os.path.exists(d):
            shutil.rmtree(d)
        write_dataset(d, name)
        with open(os.path.join(d, "manifest.json")) as f:
            m = json.load(f)
        assert len(m["shards"]) == 2, f"{name}: expected 2 shards, got {len(m['shards'])}: adjust shard_size"
        assert (m["compression"]["dictionary"] is not None) == (name == "zstd-dict"), name
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"written_with": versions(), "datasets": DATASETS}, f, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare a fresh write with tests/data/golden/")
    p.add_argument("--out", default=GOLDEN, help="where to write (default: tests/data/golden/)")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    if not args.check:
        write_all(args.out)
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_all(tmp)
        bad = []
        for name in DATASETS:
            a, b = os.path.join(GOLDEN, name), os.path.join(tmp, name)
            for f in sorted(os.listdir(b)):
                if not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False):
                    bad.append(f"{name}/{f}")
        print("identical" if not bad else "differ: " + ", ".join(bad))
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
