"""Seed corpora for the fuzzers, generated from real shards written by packfmt itself.

    python fuzz/make_corpus.py OUTDIR

writes
  OUTDIR/shard/*.pack   whole shard files (fuzz_shard.c): empty shard, one empty record, raw records of
                        assorted sizes, zstd and zstd+dictionary records, a shard with a thousand records;
                        plus a few hand-made near-misses (footer magic only, truncated, header only)
  OUTDIR/open/*.bin     seeds for fuzz_open.py: byte strings that drive its structured mutations

Deterministic: the same command writes the same bytes (up to the zstd version).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile

import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from packfmt import _core  # noqa: E402


def _shard(path, records, flags=0, dict_id=0):
    w = _core.ShardWriter(path, flags, dict_id)
    for stored, raw_len, codec in records:
        w.append(stored, raw_len, codec)
    w.close()
    with open(path, "rb") as f:
        return f.read()


def shard_seeds() -> dict:
    rng = random.Random(1234)
    seeds = {}
    tmp = tempfile.mkdtemp(prefix="pk-corpus-")
    n = 0

    def make(name, records, flags=0, dict_id=0):
        nonlocal n
        n += 1
        seeds[name] = _shard(os.path.join(tmp, f"{n}.pack"), records, flags, dict_id)

    make("empty", [])
    make("one-empty-record", [(b"", 0, _core.CODEC_NONE)])
    make("raw-small", [(bytes([i]) * i, i, _core.CODEC_NONE) for i in range(1, 9)])
    make("raw-mixed", [(rng.randbytes(s), s, _core.CODEC_NONE) for s in (0, 1, 31, 32, 33, 100, 0, 4096)])
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False, write_dict_id=False)
    texts = [(b"sample text %d " % i) * (1 + i % 7) for i in range(12)]
    make("zstd", [(cctx.compress(t), len(t), _core.CODEC_ZSTD) for t in texts], flags=_core.SHARD_HAS_ZSTD)
    train = [(b"{\"id\": %d, \"name\": \"item-%d\", \"tags\": [\"a\", \"b\"]}" % (i, i * 7)) for i in range(400)]
    d = zstandard.train_dictionary(2048, train)
    dctx = zstandard.ZstdCompressor(level=3, dict_data=d, write_content_size=True, write_checksum=False,
                                    write_dict_id=False)
    make("zstd-dict", [(dctx.compress(t), len(t), _core.CODEC_ZSTD_DICT) for t in train[:10]]
         + [(b"raw", 3, _core.CODEC_NONE)], flags=_core.SHARD_HAS_ZSTD | _core.SHARD_HAS_DICT, dict_id=d.dict_id())
    many = [rng.randbytes(rng.randrange(0, 12)) for _ in range(1000)]
    make("many", [(b, len(b), _core.CODEC_NONE) for b in many])
    # Near misses: structures a reader meets when a shard is cut short or still being written.
    raw = seeds["raw-small"]
    seeds["truncated-footer"] = raw[:-1]
    seeds["no-footer"] = raw[:-_core.FOOTER_SIZE]
    seeds["header-only"] = raw[:_core.HEADER_SIZE]
    seeds["footer-only"] = raw[-_core.FOOTER_SIZE:]
    seeds["zero-prefix"] = bytes(_core.HEADER_SIZE) + raw[_core.HEADER_SIZE:]
    for f in os.listdir(tmp):
        os.unlink(os.path.join(tmp, f))
    os.rmdir(tmp)
    return seeds


def open_seeds() -> dict:
    rng = random.Random(99)
    seeds = {"zero": bytes(16), "ones": b"\xff" * 16}
    for i in range(24):
        seeds[f"rand-{i:02d}"] = rng.randbytes(rng.randrange(8, 96))
    return seeds


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    for sub, seeds in (("shard", shard_seeds()), ("open", open_seeds())):
        d = os.path.join(out, sub)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, f"{name}.{'pack' if sub == 'shard' else 'bin'}"), "wb") as f:
                f.write(data)
        print(f"{d}: {len(seeds)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
