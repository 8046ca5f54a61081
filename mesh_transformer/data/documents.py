"""Input documents for data preparation: the supported input files (``INPUT_FORMATS``), finding them
below a folder, reading their documents (plain or compressed text, JSON lines, lm_dataformat's JSON
arrays, the Pile's set names), and normalising the text (ftfy, the WikiText detokenizer).

Documents stream through in bounded memory: text is read in chunks and split on "<|endoftext|>".
Every input that cannot be used raises ``PrepareError`` naming the file (and the line).
"""

from __future__ import annotations

import contextlib
import io
import json
import lzma
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

import zstandard

from mesh_transformer import storage
from mesh_transformer.tokenizer import EOT_TEXT

# Suffix -> (compression, format). Longest suffixes are matched first.
INPUT_FORMATS: dict[str, tuple[str | None, str]] = {
    ".jsonl.zst": ("zstd", "json"),
    ".json.zst": ("zstd", "json"),
    ".jsonl.xz": ("xz", "json"),
    ".jsonl": (None, "json"),
    ".txt": (None, "text"),
    ".xz": ("xz", "text"),
}
_TEXT_CHUNK_CHARS = 1 << 20


class PrepareError(ValueError):
    """Input or settings that data preparation cannot use."""


# ----------------------------------------------------------------------------------------------
# Input files


def input_format(url: str) -> tuple[str | None, str]:
    """(compression, format) of an input file, from its name."""
    for suffix in sorted(INPUT_FORMATS, key=len, reverse=True):
        if url.endswith(suffix):
            return INPUT_FORMATS[suffix]
    raise PrepareError(
        f"{url}: unsupported input file type; expected one of {', '.join(sorted(INPUT_FORMATS))}"
    )


def _is_hidden(path: str, root: str) -> bool:
    relative = path[len(root.rstrip("/")) :]
    return any(part.startswith(".") for part in relative.split("/"))


def list_input_files(input_path: str) -> list[str]:
    """``input_path`` itself, or every file below the folder (sorted; hidden files and folders skipped)."""
    fs, path = storage.filesystem(input_path)
    if not fs.exists(path):
        raise PrepareError(f"input path {input_path!r} does not exist")
    if not fs.isdir(path):
        files = [input_path]
    else:
        found = sorted(p for p in fs.find(path) if not _is_hidden(p, path))
        files = found if storage.is_local(input_path) else [fs.unstrip_protocol(p) for p in found]
        if not files:
            raise PrepareError(f"input folder {input_path!r} holds no files")
    for url in files:
        input_format(url)
    return files


@contextlib.contextmanager
def _open_text(url: str, compression: str | None) -> Iterator[TextIO]:
    """The decompressed UTF-8 text of ``url`` as a stream."""
    with storage.open_file(url, "rb") as raw:
        if compression == "zstd":
            binary = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        elif compression == "xz":
            binary = lzma.LZMAFile(raw)
        else:
            binary = raw
        yield io.TextIOWrapper(binary, encoding="utf-8")


def _split_stream(chunks: Iterable[str], separator: str) -> Iterator[str]:
    """Pieces between separators of text arriving in chunks; empty pieces are left out."""
    # Only the last len(separator) - 1 characters can start a separator that a later chunk
    # completes, so only they are searched again: a long document costs linear time.
    keep = len(separator) - 1
    parts: list[str] = []
    tail = ""
    for chunk in chunks:
        *complete, last = (tail + chunk).split(separator)
        for piece in complete:
            document = "".join(parts) + piece
            parts = []
            if document:
                yield document
        cut = max(len(last) - keep, 0)
        parts.append(last[:cut])
        tail = last[cut:]
    if document := "".join(parts) + tail:
        yield document


def _read_chunks(stream: TextIO) -> Iterator[str]:
    while chunk := stream.read(_TEXT_CHUNK_CHARS):
        yield chunk


def _json_document(value: object, url: str, line_number: int) -> str:
    if isinstance(value, str):
        return value
    text = value.get("text") if isinstance(value, dict) else None
    if isinstance(text, list):  # lm_dataformat joins a list of paragraphs
        text = "\n\n".join(text)
    if not isinstance(text, str):
        raise PrepareError(
            f"{url}, line {line_number}: expected a JSON string or an object with a string field "
            f"'text', found {type(value).__name__}"
            + (f" with keys {sorted(value)}" if isinstance(value, dict) else "")
        )
    return text


def _pile_set_name(value: object) -> str | None:
    """``meta.pile_set_name`` of a Pile-format line, when it has one."""
    meta = value.get("meta") if isinstance(value, dict) else None
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


def _json_entry(value: object, url: str, line_number: int) -> tuple[str, str | None]:
    return _json_document(value, url, line_number), _pile_set_name(value)


def _json_array_documents(text: str, url: str) -> Iterator[tuple[str, str | None]]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{url}: invalid JSON array: {e}") from None
    return (_json_entry(value, url, 1) for value in values)


def _json_documents(stream: TextIO, url: str) -> Iterator[tuple[str, str | None]]:
    """(text, pile_set_name) of JSON lines, or of one JSON array (lm_dataformat's .json.zst, read whole)."""
    first_content = True
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        if first_content and line.lstrip().startswith("["):
            yield from _json_array_documents(line + stream.read(), url)
            return
        first_content = False
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{url}, line {line_number}: invalid JSON: {e}") from None
        yield _json_entry(value, url, line_number)


def iter_documents(url: str, split_on_eot: bool = True) -> Iterator[str]:
    """The documents of one input file.

    Text files are one document each and, like every document, are split on "<|endoftext|>"
    unless ``split_on_eot`` is False. Text is read in chunks, so memory is bounded by the largest
    document rather than the file.
    """
    return (text for text, _ in iter_documents_with_sets(url, split_on_eot))


def iter_documents_with_sets(url: str, split_on_eot: bool = True) -> Iterator[tuple[str, str | None]]:
    """(text, pile_set_name or None) of each document of one input file; see ``iter_documents``.

    The pieces a JSON document is split into on "<|endoftext|>" keep its set name."""
    compression, kind = input_format(url)
    try:
        with _open_text(url, compression) as stream:
            if kind == "json":
                for document, set_name in _json_documents(stream, url):
                    pieces = _split_stream([document], EOT_TEXT) if split_on_eot else [document]
                    yield from ((piece, set_name) for piece in pieces)
            elif split_on_eot:
                yield from ((text, None) for text in _split_stream(_read_chunks(stream), EOT_TEXT))
            else:
                yield stream.read(), None
    except UnicodeDecodeError as e:
        raise PrepareError(f"{url}: not valid UTF-8 text ({e})") from None
    except (lzma.LZMAError, zstandard.ZstdError, EOFError) as e:
        raise PrepareError(f"{url}: cannot decompress as {compression}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Normalisation

# The standard WikiText detokenizer rules, in the order they must run. Each is (pattern, replacement,
# is_regex).
_WIKITEXT_RULES: list[tuple[str, str, bool]] = [
    ("s '", "s'", False),  # plural possessive
    (" @-@ ", "-", False),  # number separators
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    *((f" {p} ", f"{p} ", False) for p in ":;.!?,"),  # space before punctuation
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),  # space inside brackets and quotes
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),  # section heading markers
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),  # WikiText's number placeholder
    (" 's", "'s", False),
]
_WIKITEXT_STEPS = [
    (re.compile(pattern), replacement) if is_regex else (pattern, replacement)
    for pattern, replacement, is_regex in _WIKITEXT_RULES
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (" @-@ ", spaces around punctuation, "= =" headings, ...)."""
    for pattern, replacement in _WIKITEXT_STEPS:
        if isinstance(pattern, str):
            text = text.replace(pattern, replacement)
        else:
            text = pattern.sub(replacement, text)
    return text


def text_normalizer(with_ftfy: bool, with_wikitext_detokenize: bool) -> Callable[[str], str]:
    """The normalisation of each document's text: ftfy's fixes (NFKC), then the WikiText detokenizer."""
    fix_text = None
    if with_ftfy:
        try:
            import ftfy
        except ImportError:
            raise PrepareError("--normalize-with-ftfy needs the ftfy package: pip install ftfy") from None
        fix_text = ftfy.fix_text

    def normalize(text: str) -> str:
        if fix_text is not None:
            text = fix_text(text, normalization="NFKC")
        if with_wikitext_detokenize:
            text = wikitext_detokenize(text)
        return text

    return normalize
