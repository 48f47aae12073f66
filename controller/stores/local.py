"""A store in a local folder: the default for a pipeline on one machine.

Writes are atomic: the bytes go to a temporary file in the destination's own folder (same file
system, so the rename cannot turn into a copy), are fsynced, and are then published with
`os.replace`. A reader, or a pipeline resumed after a crash, sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO, Callable

import structlog

from controller.stores.base import StoreKeyMissing
from controller.stores.keys import clean_key, clean_prefix, new_probe_key
from nexlify.errors import PermanentError

log = structlog.get_logger(__name__)

TEMP_PREFIX = ".nexlify-tmp-"  # temporary files being written; never listed


class LocalStore:
    """Keys are '/'-separated paths under `root`; `url(key)` is the file's absolute path."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.root_url = self.root

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *clean_key(key).split("/"))

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreKeyMissing(f"{path} does not exist") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._write_atomically(path, lambda handle: handle.write(data))
        log.debug("store_write", url=path, size=len(data))

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        prefix = clean_prefix(prefix)
        # Walk only the deepest folder the prefix names, then filter by the leading characters.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *folder.split("/")) if folder else self.root
        keys: list[str] = []
        for directory, _subdirs, files in os.walk(start):
            relative_dir = os.path.relpath(directory, self.root).replace(os.sep, "/")
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = name if relative_dir == "." else f"{relative_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        except OSError as error:
            raise PermanentError(f"cannot delete {path}: {error.strerror or error}") from error

    def move(self, key: str, new_key: str) -> None:
        path, new_path = self._path(key), self._path(new_key)
        if not os.path.isfile(path):
            raise StoreKeyMissing(f"{path} does not exist")
        with _as_permanent(f"cannot move {path} to {new_path}"):
            os.makedirs(os.path.dirname(new_path), exist_ok=True)
            os.replace(path, new_path)

    def upload_file(self, key: str, local_path: str) -> None:
        path = self._path(key)
        try:
            source = open(local_path, "rb")
        except OSError as error:
            raise PermanentError(f"cannot read {local_path} to store it at {path}: {error.strerror or error}") from error
        with source:
            self._write_atomically(path, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))
        log.debug("store_upload", url=path, source=local_path)

    def download_file(self, key: str, local_path: str) -> None:
        path = self._path(key)
        try:
            source = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreKeyMissing(f"{path} does not exist") from None
        with source:
            self._write_atomically(
                os.path.abspath(local_path), lambda handle: shutil.copyfileobj(source, handle, 1 << 20)
            )

    def url(self, key: str) -> str:
        return self._path(key)

    def check_writable(self) -> None:
        probe = new_probe_key()
        payload = secrets.token_bytes(32)
        try:
            self.write_bytes(probe, payload)
            if self.read_bytes(probe) != payload:
                raise PermanentError(f"output folder {self.root} returned different bytes than were written")
        except (PermanentError, StoreKeyMissing) as error:
            raise PermanentError(
                f"output folder {self.root} is not writable ({error}); check that the path is a folder "
                "you may write to"
            ) from error
        finally:
            with contextlib.suppress(PermanentError):
                self.delete(probe)

    @staticmethod
    def _write_atomically(path: str, write: Callable[[BinaryIO], object]) -> None:
        """Write through `write` into a temporary sibling of `path`, fsync, then publish with os.replace."""
        folder = os.path.dirname(path)
        with _as_permanent(f"cannot write {path}"):
            os.makedirs(folder, exist_ok=True)
            fd, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
        try:
            with _as_permanent(f"cannot write {path}"):
                with os.fdopen(fd, "wb") as handle:
                    write(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(temp_path, 0o644)  # mkstemp makes 0600; published files are readable like any output
                os.replace(temp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp_path)
            raise
        _fsync_folder(folder)


@contextlib.contextmanager
def _as_permanent(what: str) -> Iterator[None]:
    """Turn an OSError (no space, no permission, a file where a folder should be) into PermanentError."""
    try:
        yield
    except OSError as error:
        raise PermanentError(f"{what}: {error.strerror or error}") from error


def _fsync_folder(folder: str) -> None:
    """Persist the rename itself (the folder entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
