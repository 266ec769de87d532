"""The dataset manifest: the one small file that names everything else.

A dataset is the set of objects its ``manifest.json`` names; nothing is ever found by listing.  The
manifest is written last, atomically, so a dataset either opens complete or does not open.  See
docs/format.md for every field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from packfmt import _core
from packfmt.errors import ManifestError, UnsupportedVersionError

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.arrow"
DICTIONARY_NAME = "dictionary.zstd"
INCOMPLETE_MARKER = ".packfmt-incomplete"

FORMAT_NAME = "packfmt"
FORMAT_VERSION = _core.FORMAT_VERSION
MIN_READER_VERSION = _core.FORMAT_READ_VERSION

#: Largest manifest we agree to parse (a hostile URL could serve gigabytes).
MAX_MANIFEST_BYTES = 64 << 20  # ~150 bytes a shard: room for 400k shards

# Names of objects inside a dataset: one path component, no dot-dot, nothing a URL would reinterpret.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")

#: Columns of the global index that packfmt itself writes, in order.
INDEX_COLUMNS = ("key", "shard", "offset", "stored_len", "raw_len", "checksum", "flags")

CODECS = ("none", "zstd", "zstd-dict")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.pack"


def hex64(value: int) -> str:
    return f"{value:016x}"


def check_name(name, what: str) -> str:
    """A name the manifest gives for an object of the dataset must be a plain file name."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ManifestError(f"manifest names {what} {name!r}, which is not a plain file name inside the dataset")
    return name


@dataclass(frozen=True)
class ShardInfo:
    name: str
    size: int
    records: int
    checksum: int
    data_bytes: int

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "records": self.records,
                "checksum": hex64(self.checksum), "data_bytes": self.data_bytes}


def _int(obj, key, what, lo=0, hi=2**64 - 1) -> int:
    v = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ManifestError(f"manifest: {what}.{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _hex(obj, key, what) -> int:
    v = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{16}", v):
        raise ManifestError(f"manifest: {what}.{key} must be 16 hex digits, got {v!r}")
    return int(v, 16)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest.  ``raw`` keeps the JSON object; ``checksum`` identifies the content."""

    raw: dict
    checksum: int
    samples: int
    shards: tuple
    index_name: str
    index_size: int
    index_checksum: int
    codec: str
    level: int | None
    dictionary: dict | None

    @property
    def content_id(self) -> str:
        """Identity of this dataset's content (changes whenever the dataset is rewritten)."""
        return hex64(self.checksum)

    @classmethod
    def parse(cls, data: bytes, where: str = "<manifest>") -> "Manifest":
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where}: manifest of {len(data)} bytes is larger than the {MAX_MANIFEST_BYTES} limit")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise ManifestError(f"{where}: manifest is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise ManifestError(f"{where}: not a packfmt manifest (no \"format\": \"packfmt\")")
        min_reader = raw.get("min_reader_version")
        if not isinstance(min_reader, int) or min_reader < 1:
            raise ManifestError(f"{where}: manifest has no valid min_reader_version")
        if min_reader > FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"{where}: dataset needs format version {min_reader}, this packfmt reads up to "
                f"{FORMAT_VERSION}; upgrade packfmt")
        try:
            return cls._parse(raw, data, where)
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None

    @classmethod
    def _parse(cls, raw: dict, data: bytes, where: str) -> "Manifest":
        samples = _int(raw, "samples", "manifest")
        shards_raw = raw.get("shards")
        if not isinstance(shards_raw, list):
            raise ManifestError("manifest: shards must be a list")
        shards = []
        seen = set()
        for i, s in enumerate(shards_raw):
            what = f"shards[{i}]"
            name = check_name(s.get("name") if isinstance(s, dict) else None, "a shard")
            if name in seen:
                raise ManifestError(f"manifest names shard {name!r} twice")
            seen.add(name)
            shards.append(ShardInfo(
                name=name,
                size=_int(s, "size", what, lo=_core.HEADER_SIZE + _core.FOOTER_SIZE),
                records=_int(s, "records", what, hi=_core.MAX_RECORDS),
                checksum=_hex(s, "checksum", what),
                data_bytes=_int(s, "data_bytes", what)))
            last = shards[-1]
            if last.size < _core.HEADER_SIZE + _core.FOOTER_SIZE + _core.ENTRY_SIZE * last.records + last.data_bytes:
                raise ManifestError(f"manifest: {what} of {last.size} bytes cannot hold {last.records} records "
                                    f"and {last.data_bytes} data bytes")
        if sum(s.records for s in shards) != samples:
            raise ManifestError(f"manifest: shards hold {sum(s.records for s in shards)} records but samples is {samples}")
        index = raw.get("index")
        if not isinstance(index, dict):
            raise ManifestError("manifest: index must be an object")
        index_name = check_name(index.get("name"), "the index")
        if _int(index, "rows", "index") != samples:
            raise ManifestError("manifest: index rows differ from samples")
        comp = raw.get("compression")
        if not isinstance(comp, dict) or comp.get("codec") not in CODECS:
            raise ManifestError(f"manifest: compression.codec must be one of {CODECS}")
        level = comp.get("level")
        if level is not None and (not isinstance(level, int) or isinstance(level, bool)):
            raise ManifestError("manifest: compression.level must be an integer or null")
        dictionary = comp.get("dictionary")
        if dictionary is not None:
            if not isinstance(dictionary, dict):
                raise ManifestError("manifest: compression.dictionary must be an object or null")
            dictionary = dict(dictionary,
                              name=check_name(dictionary.get("name"), "the dictionary"),
                              size=_int(dictionary, "size", "dictionary", hi=64 << 20),
                              checksum=_hex(dictionary, "checksum", "dictionary"),
                              dict_id=_int(dictionary, "dict_id", "dictionary", hi=2**32 - 1))
        return cls(raw=raw, checksum=_core.xxh64(data), samples=samples, shards=tuple(shards),
                   index_name=index_name, index_size=_int(index, "size", "index"),
                   index_checksum=_hex(index, "checksum", "index"), codec=comp["codec"], level=level,
                   dictionary=dictionary)


def dump(raw: dict) -> bytes:
    return (json.dumps(raw, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
