"""URL-agnostic file access: local paths and any fsspec URL (gs://, memory://, ...) go through here."""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec


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


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one."""
    fs, path = filesystem(url)
    if is_local(url):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # Object stores publish an object only when its upload completes, so one put is atomic.
        with fs.open(path, "wb") as f:
            f.write(data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)
