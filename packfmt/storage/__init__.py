"""Where datasets live: local directories, ``s3://`` prefixes, ``http(s)://`` prefixes.

>>> import tempfile
>>> from packfmt.storage import open_store
>>> store = open_store(tempfile.mkdtemp())
>>> store.put_bytes("manifest.json", b"{}")
>>> store.read_bytes("manifest.json"), store.is_local
(b'{}', True)

Every store offers the same small interface (see ``docs/remote.md``):
``read_bytes``, ``size``, ``exists`` (HEAD, never LIST), ``read_ranges`` (sorted,
coalesced, parallel, retried), ``put_bytes`` (atomic), ``open_write`` (streaming;
multipart upload on S3), ``delete``, ``local_path`` and the request counters ``stats``.
"""

from __future__ import annotations

import os
from typing import Optional
from urllib.parse import unquote, urlparse

from .base import ObjectNotFoundError, RemoteReadError, Store, StoreStats
from .local import LocalStore
from .ranges import coalesce
from .retry import RetryPolicy


def open_store(url, storage_options: Optional[dict] = None) -> Store:
    """A :class:`Store` for ``url``: a path, ``file://``, ``s3://bucket/prefix`` or ``http(s)://``.

    ``storage_options`` are backend options (``endpoint_url``, ``region_name``,
    ``aws_access_key_id`` ..., ``retries``, ``threads``, ``max_gap``, ``max_request``);
    unknown keys raise ``TypeError``. A :class:`Store` is returned unchanged.
    """
    if isinstance(url, Store):
        return url
    url = os.fspath(url)
    if url.startswith("s3://"):
        from .s3 import S3Store
        return S3Store(url, storage_options)
    if url.startswith(("http://", "https://")):
        from .http import HTTPStore
        return HTTPStore(url, storage_options)
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// url with a remote host: {url!r}")
        return LocalStore(unquote(parsed.path), storage_options)
    if "://" in url:
        raise ValueError(f"unsupported url scheme: {url!r} (use a path, file://, s3:// or http(s)://)")
    return LocalStore(url, storage_options)


def is_remote(url) -> bool:
    return isinstance(url, str) and url.startswith(("s3://", "http://", "https://"))


__all__ = ["open_store", "is_remote", "Store", "StoreStats", "LocalStore", "RemoteReadError",
           "ObjectNotFoundError", "RetryPolicy", "coalesce"]
