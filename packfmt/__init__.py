"""packfmt: pack millions of small files into few indexed shards and read any sample in O(1).

>>> import packfmt, tempfile, os
>>> d = tempfile.mkdtemp()
>>> with packfmt.Writer(os.path.join(d, "ds")) as w:
...     w.add("a.txt", b"hello", label=1)
...     w.add("b.txt", b"world", label=2)
>>> ds = packfmt.open(os.path.join(d, "ds"))
>>> len(ds), ds[1], ds.get_batch([1, 0]), ds.index_of("a.txt")
(2, b'world', [b'world', b'hello'], 0)
"""

from packfmt import _core
from packfmt.errors import (
    CorruptShardError,
    DatasetExistsError,
    DatasetNotFoundError,
    ManifestError,
    PackError,
    PackOSError,
    RemoteError,
    UnsafeKeyError,
    UnsupportedVersionError,
)

__version__ = "0.1.0"

#: The shard/dataset format version this library writes and the newest it reads.
FORMAT_VERSION = 1

if _core.FORMAT_VERSION != FORMAT_VERSION:  # a stale build of the extension
    raise ImportError(
        f"packfmt._core speaks format version {_core.FORMAT_VERSION} but the Python package expects "
        f"{FORMAT_VERSION}: rebuild the extension (pip install -e .)"
    )

from packfmt.dataset import Dataset, open  # noqa: E402
from packfmt.shuffle import EpochOrder  # noqa: E402
from packfmt.writer import Writer  # noqa: E402

__all__ = [
    "open",
    "Dataset",
    "Writer",
    "EpochOrder",
    "FORMAT_VERSION",
    "PackError",
    "CorruptShardError",
    "UnsupportedVersionError",
    "ManifestError",
    "DatasetNotFoundError",
    "DatasetExistsError",
    "UnsafeKeyError",
    "PackOSError",
    "RemoteError",
]
