"""The store interface: a local folder and an S3 bucket prefix behind the same small API.

Keys are relative, '/'-separated paths under the store's root ("initial_runs/run_1/result.json").
Every write is all-or-nothing: a reader sees the old object or the new one, never half of one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class StoreKeyMissing(FileNotFoundError):
    """The key does not exist in the store."""


@runtime_checkable
class Store(Protocol):
    root_url: str  # "/abs/folder" or "s3://bucket/prefix"

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; StoreKeyMissing if absent."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically (temporary object or file, then publish)."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) that start with prefix, sorted."""

    def delete(self, key: str) -> None:
        """Remove one key; no error if absent."""

    def move(self, key: str, new_key: str) -> None:
        """Move one object to another key (a rename in a folder, copy then delete in a bucket);
        StoreKeyMissing if absent."""

    def upload_file(self, key: str, local_path: str) -> None:
        """Copy a local file into the store (multipart for large files on S3), atomically."""

    def download_file(self, key: str, local_path: str) -> None:
        """Copy an object to a local file; StoreKeyMissing if absent."""

    def url(self, key: str) -> str:
        """Absolute location of a key: a filesystem path or s3://bucket/prefix/key."""

    def check_writable(self) -> None:
        """Write, read back and delete a probe object; raise PermanentError with a clear message if not possible."""
