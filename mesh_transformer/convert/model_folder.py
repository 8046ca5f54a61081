"""Reading a Hugging Face model folder that may be hostile: only files inside it, JSON checked.

A model folder comes from anyone; its files name other files (an index's ``weight_map``) and may be
links. A file is read only if it stays inside the folder: no absolute path, no ``..``, and, links
followed, still inside. A hub cache snapshot (``models--ORG--NAME/snapshots/REV``) links each of its
files into its repository's ``blobs/``, which counts as inside. JSON that is cut, not UTF-8, nested
past Python's recursion limit or not an object is a ``ConversionError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from mesh_transformer.errors import ConversionError

HUB_SNAPSHOTS = "snapshots"  # the hub cache: REPO/snapshots/REV/NAME links to REPO/blobs/HASH
HUB_BLOBS = "blobs"


def folder_file(directory: str, name: str, named_by: str | None = None) -> str:
    """The path of file ``name`` in the model folder ``directory``, refused if reading it would leave the
    folder or if it is not a file. ``named_by``: the file whose entry ``name`` is, named in the message."""
    where = f"{named_by}: entry {name!r}" if named_by else os.path.join(directory, name)
    if os.path.isabs(name) or re.match(r"[\\/]|[A-Za-z]:", name) or ".." in re.split(r"[\\/]", name):
        raise ConversionError(f"{where} points outside the model folder {directory}; only files inside it are read")
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in _allowed_roots(directory)):
        raise ConversionError(f"{where} links to {real}, outside the model folder {directory}; only files "
                              "inside it are read")
    if not os.path.exists(path):
        raise ConversionError(f"{where} does not exist in {directory}")
    if not os.path.isfile(path):
        raise ConversionError(f"{where} is not a file in {directory}")
    return path


def _allowed_roots(directory: str) -> list[str]:
    folder = os.path.realpath(directory)
    snapshots = os.path.dirname(folder)
    if os.path.basename(snapshots) != HUB_SNAPSHOTS:
        return [folder]
    return [folder, os.path.join(os.path.dirname(snapshots), HUB_BLOBS)]


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def json_object(text: bytes, where: str, what: str = "the file") -> dict[str, Any]:
    """``text`` parsed as a JSON object; ConversionError naming ``where`` (and ``what`` of it) otherwise."""
    try:
        value = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise ConversionError(f"{where}: {what} is nested too deeply to be read") from None
    except ValueError as e:  # cut, malformed, or not UTF-8
        raise ConversionError(f"{where}: {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{where}: {what} is not a JSON object but a {type(value).__name__}")
    return value


def read_json_object(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return json_object(f.read(), path)
