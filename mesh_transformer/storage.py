"""URL-agnostic file access: local paths and any fsspec URL (gs://, memory://, ...) go through here."""

from __future__ import annotations

import logging
import os
import posixpath
import uuid

import fsspec

log = logging.getLogger(__name__)


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join path components for a local path or a URL."""
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return posixpath.join(base, *parts)


def dirname(url: str) -> str:
    return os.path.dirname(local_path(url)) if is_local(url) else posixpath.dirname(url.rstrip("/"))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def open_file(url: str, mode: str = "rb"):
    """Open a local path or URL; use as a context manager."""
    return fsspec.open(url, mode)


def read_text(url: str) -> str:
    with open_file(url, "r") as f:
        return f.read()


class AtomicWriter:
    """A file written piece by piece that appears at ``url`` whole or not at all.

    Locally it is written under a temporary name next to ``url`` (``.NAME.HEX.tmp``) and renamed on
    ``commit``. An object store publishes an object only when its upload completes, so there the
    upload goes straight to ``url`` (no copy, which object stores do slowly) and ``abort`` cancels it.
    """

    def __init__(self, url: str):
        self.fs, self.path = filesystem(url)
        self._tmp = None
        if is_local(url):
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, exist_ok=True)
            self._tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{uuid.uuid4().hex}.tmp")
            self._file = open(self._tmp, "wb")
        else:
            self._file = self.fs.open(self.path, "wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        if self._tmp is None:
            self._file.close()  # completes the upload
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._tmp is not None:
            self._file.close()
            os.remove(self._tmp)
            return
        # An upload that is never completed publishes nothing; cancelling it only frees the service's
        # resources early, so a service that cannot cancel (the GCS emulator answers 501) is no error.
        try:
            self._file.discard()
        except Exception as e:  # each backend raises its own HTTP errors
            log.debug("could not cancel the upload of %s: %s", self.path, e)
        # Marked closed, or garbage collection would close it, which uploads what was buffered.
        self._file.closed = True


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one."""
    writer = AtomicWriter(url)
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    writer.commit()


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)
