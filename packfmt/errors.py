"""The exceptions packfmt raises.

Every failure of the native core reaches Python through one function, ``packfmt._core.check_status``,
which picks the class here.  Catch :class:`PackError` for "anything packfmt refused"; the subclasses
also derive from the builtin a caller would catch anyway (``ValueError``, ``OSError``, ...).
"""

from __future__ import annotations


class PackError(Exception):
    """Base class of every packfmt error."""


class CorruptShardError(PackError, ValueError):
    """Bytes that cannot be a valid shard, or a record whose checksum does not match.

    Attributes name where: ``shard`` (path or URL), ``offset`` (byte offset in the shard), ``expected`` and
    ``actual`` (the values compared, when there are any) and ``sample`` (global sample index, if known).
    Raised instead of ever returning wrong bytes.
    """

    def __init__(self, message, *, shard=None, offset=None, expected=None, actual=None, sample=None):
        super().__init__(message)
        self.shard = shard
        self.offset = offset
        self.expected = expected
        self.actual = actual
        self.sample = sample


class UnsupportedVersionError(PackError):
    """The file or dataset was written by a newer packfmt whose format this version cannot read."""


class ManifestError(PackError, ValueError):
    """The dataset manifest or the global index is malformed or disagrees with itself."""


class DatasetNotFoundError(PackError, FileNotFoundError):
    """No complete dataset at this location (no manifest: nothing there, or an interrupted build)."""


class DatasetExistsError(PackError, FileExistsError):
    """The destination already holds a dataset or other files and overwriting was not asked for."""


class UnsafeKeyError(PackError, ValueError):
    """A sample key that cannot be turned into a path inside the extraction directory."""


class PackOSError(PackError, OSError):
    """A system call failed; ``errno`` and ``filename`` are those of the failing call."""


class RemoteError(PackOSError):
    """A remote read or write failed after all retries; the message names the URL and byte range."""
