"""Stores: where a pipeline and its runs keep their files, a local folder or an S3 bucket prefix.

`open_store(url)` picks the store for an output location. The `*_url` helpers take one absolute
URL (a filesystem path or `s3://bucket/key`) for code that is handed full locations rather than a
store and a key, like the worker with its `--config`, `--data-snapshot` and `--out` arguments.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from controller.stores.base import Store, StoreKeyMissing
from controller.stores.local import LocalStore
from controller.stores.s3 import S3Store
from nexlify.errors import InputError

__all__ = [
    "LocalStore", "S3Store", "Store", "StoreKeyMissing", "open_store", "is_s3_url",
    "read_url_bytes", "write_url_bytes", "download_url", "upload_url",
]

ACCEPTED_FORMS = "a folder path, file:///abs/folder or s3://bucket/prefix"


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key-or-prefix) of an s3:// URL; InputError when the bucket is missing.

    >>> parse_s3_url("s3://models/runs/a")
    ('models', 'runs/a')
    """
    rest = url[len("s3://"):]
    bucket, _, path = rest.partition("/")
    if not bucket:
        raise InputError(f"S3 URL {url!r} has no bucket; the accepted form is s3://bucket/prefix")
    return bucket, path.strip("/")


def _local_path(url: str) -> str:
    """The absolute filesystem path a non-S3 URL names; InputError for other schemes (gs://, http://)."""
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"file URL {url!r} names a host; use file:///abs/path or a plain path")
        return os.path.abspath(parsed.path)
    scheme = urlparse(url).scheme
    if "://" in url and scheme:
        raise InputError(f"storage URL {url!r} has an unsupported scheme '{scheme}'; use {ACCEPTED_FORMS}")
    if not url:
        raise InputError(f"storage URL is empty; use {ACCEPTED_FORMS}")
    return os.path.abspath(os.path.expanduser(url))


def open_store(url: str) -> LocalStore | S3Store:
    """The store rooted at `url`: S3Store for s3://bucket/prefix, LocalStore for a (relative or absolute) path."""
    if is_s3_url(url):
        bucket, prefix = parse_s3_url(url)
        return S3Store(bucket, prefix)
    return LocalStore(_local_path(url))


def _store_and_key(url: str) -> tuple[LocalStore | S3Store, str]:
    """Split an absolute object URL into the store holding it and the key within that store."""
    if is_s3_url(url):
        bucket, key = parse_s3_url(url)
        if not key:
            raise InputError(f"S3 URL {url!r} names a bucket but no object; the accepted form is s3://bucket/key")
        return S3Store(bucket, ""), key
    path = _local_path(url)
    folder, name = os.path.split(path)
    if not name:
        raise InputError(f"path {url!r} names a folder, not a file")
    return LocalStore(folder), name


def read_url_bytes(url: str) -> bytes:
    """The bytes at `url`; StoreKeyMissing if there is nothing there."""
    store, key = _store_and_key(url)
    return store.read_bytes(key)


def write_url_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically."""
    store, key = _store_and_key(url)
    store.write_bytes(key, data)


def download_url(url: str, local_path: str) -> None:
    """Copy the object at `url` to `local_path`; StoreKeyMissing if absent."""
    store, key = _store_and_key(url)
    store.download_file(key, local_path)


def upload_url(url: str, local_path: str) -> None:
    """Copy `local_path` to `url` atomically (multipart for large files on S3)."""
    store, key = _store_and_key(url)
    store.upload_file(key, local_path)
