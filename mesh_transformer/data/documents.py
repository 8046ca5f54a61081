"""Input documents for data preparation: the supported input files (``INPUT_FORMATS``), finding them
below a folder (other files are skipped and listed), reading their documents (plain or compressed text,
JSON lines, lm_dataformat's JSON arrays, the Pile's set names, the text files of a .tar.gz), and
normalising the text (ftfy, the WikiText detokenizer).

Documents stream through in bounded memory: text is read in chunks and split on "<|endoftext|>".
Every input that cannot be used raises ``PrepareError`` naming the file (and the line). A compressed
file is read to its end and checked whole: a truncated or corrupt archive is an error saying so.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import logging
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

import zstandard

from mesh_transformer import storage
from mesh_transformer.tokenizer import EOT_TEXT

logger = logging.getLogger(__name__)

# Suffix -> (compression, format). Longest suffixes are matched first. "tar": each file in the archive
# is a text document, as the original script's reader (lm_dataformat) takes them.
INPUT_FORMATS: dict[str, tuple[str | None, str]] = {
    ".jsonl.zst": ("zstd", "json"),
    ".json.zst": ("zstd", "json"),
    ".jsonl.xz": ("xz", "json"),
    ".jsonl": (None, "json"),
    ".txt": (None, "text"),
    ".xz": ("xz", "text"),
    ".tar.gz": ("gzip", "tar"),
}
_TEXT_CHUNK_CHARS = 1 << 20
_DRAIN_BYTES = 1 << 20
_LISTED_SKIPPED_FILES = 10
# What the decompressors raise on damaged data (a truncation is an EOFError, from xz and gzip).
_CORRUPTION_ERRORS = (lzma.LZMAError, zstandard.ZstdError, gzip.BadGzipFile, zlib.error)


class PrepareError(ValueError):
    """Input or settings that data preparation cannot use."""


# ----------------------------------------------------------------------------------------------
# Input files


def _suffix_format(url: str) -> tuple[str | None, str] | None:
    for suffix in sorted(INPUT_FORMATS, key=len, reverse=True):
        if url.endswith(suffix):
            return INPUT_FORMATS[suffix]
    return None


def input_format(url: str) -> tuple[str | None, str]:
    """(compression, format) of an input file, from its name."""
    if (found := _suffix_format(url)) is None:
        raise PrepareError(f"{url}: unsupported input file type; expected one of {_format_names()}")
    return found


def _format_names() -> str:
    return ", ".join(sorted(INPUT_FORMATS))


@dataclass(frozen=True)
class InputFiles:
    """The input files found, sorted, and the files found with them that are not an input format."""

    files: list[str]
    skipped: list[str]


def skipped_files_note(skipped: list[str]) -> str:
    """One line naming the skipped files (the first few) and how many there are."""
    more = len(skipped) - _LISTED_SKIPPED_FILES
    names = ", ".join(skipped[:_LISTED_SKIPPED_FILES]) + (f" and {more} more" if more > 0 else "")
    files = "1 file that is" if len(skipped) == 1 else f"{len(skipped)} files that are"
    return f"skipped {files} not an input format: {names}"


def select_input_files(found: Iterable[str], where: str) -> InputFiles:
    """The files of ``found`` that are an input format; the others are skipped, as the original script
    skips them, and logged. None found is an error ``where ...``."""
    found = sorted(found)
    files = [url for url in found if _suffix_format(url) is not None]
    skipped = [url for url in found if _suffix_format(url) is None]
    if not files:
        listed = f"; {skipped_files_note(skipped)}" if skipped else ""
        raise PrepareError(f"{where} holds no input files ({_format_names()}){listed}")
    if skipped:
        logger.info(skipped_files_note(skipped))
    return InputFiles(files, skipped)


def _is_hidden(path: str, root: str) -> bool:
    relative = path[len(root.rstrip("/")) :]
    return any(part.startswith(".") for part in relative.split("/"))


def find_input_files(input_path: str) -> InputFiles:
    """``input_path`` itself (which must be an input format), or the input files below the folder
    (hidden files and folders left out, other files skipped)."""
    fs, path = storage.filesystem(input_path)
    if not fs.exists(path):
        raise PrepareError(f"input path {input_path!r} does not exist")
    if not fs.isdir(path):
        input_format(input_path)
        return InputFiles([input_path], [])
    found = [p for p in fs.find(path) if not _is_hidden(p, path)]
    return select_input_files(found if storage.is_local(input_path) else map(fs.unstrip_protocol, found),
                              f"input folder {input_path!r}")


# ----------------------------------------------------------------------------------------------
# Compressed files, checked whole

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC, _SKIPPABLE_MAGIC_MASK = 0x184D2A50, 0xFFFFFFF0
_DICTIONARY_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # flag 0 with a single segment: 1


class _ZstdFrames:
    """The compressed bytes of a zstd file, passed on to the decompressor while their frame structure
    (RFC 8878: frame header, block headers and sizes, the optional checksum; skippable frames) is
    followed. python-zstandard's stream reader ends quietly when the data stops inside a frame; this
    tells that end from the end of a frame, and raises at the end of the file if it is truncated."""

    def __init__(self, raw: BinaryIO, url: str):
        self._raw, self._url = raw, url
        self._offset = 0  # bytes read
        self._field = bytearray()  # the header field being read
        self._expect(4, self._magic)
        self._skip = 0  # block (or skippable frame) bytes still to pass over
        self._checksum = False
        self._frames = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._follow(data)
        elif not self._between_frames():
            raise PrepareError(f"{self._url}: truncated zstd archive: it ends inside a frame, "
                               f"after {self._offset} bytes")
        elif not self._frames:
            raise PrepareError(f"{self._url}: truncated zstd archive: it holds no zstd frame")
        return data

    def _between_frames(self) -> bool:
        return self._on_field == self._magic and not self._field and not self._skip

    def _follow(self, data: bytes) -> None:
        position = 0
        while position < len(data):
            if self._skip:
                passed = min(self._skip, len(data) - position)
                self._skip -= passed
                position += passed
                continue
            taken = min(self._wanted - len(self._field), len(data) - position)
            self._field += data[position : position + taken]
            position += taken
            if len(self._field) == self._wanted:
                field = bytes(self._field)
                self._field.clear()
                self._on_field(field, self._offset + position - len(field))
        self._offset += len(data)

    def _expect(self, length: int, handler: Callable[[bytes, int], None]) -> None:
        self._wanted, self._on_field = length, handler

    def _corrupt(self, what: str, at: int) -> PrepareError:
        return PrepareError(f"{self._url}: corrupt zstd archive: {what} at byte {at}")

    def _magic(self, field: bytes, at: int) -> None:
        magic = int.from_bytes(field, "little")
        if magic == _ZSTD_MAGIC:
            self._expect(1, self._descriptor)
        elif magic & _SKIPPABLE_MAGIC_MASK == _SKIPPABLE_MAGIC:
            self._expect(4, self._skippable_size)
        else:
            raise self._corrupt("no zstd frame starts", at)

    def _skippable_size(self, field: bytes, at: int) -> None:
        self._skip = int.from_bytes(field, "little")
        self._expect(4, self._magic)

    def _descriptor(self, field: bytes, at: int) -> None:
        descriptor = field[0]
        if descriptor & 0x08:
            raise self._corrupt("a reserved bit is set in the frame header", at)
        single_segment = bool(descriptor & 0x20)
        self._checksum = bool(descriptor & 0x04)
        window_bytes = 0 if single_segment else 1
        content_size_bytes = _CONTENT_SIZE_BYTES[descriptor >> 6] or (1 if single_segment else 0)
        rest = window_bytes + _DICTIONARY_ID_BYTES[descriptor & 0x03] + content_size_bytes
        if rest:
            self._expect(rest, self._header_end)
        else:
            self._header_end(b"", at)

    def _header_end(self, field: bytes, at: int) -> None:
        self._expect(3, self._block)

    def _block(self, field: bytes, at: int) -> None:
        header = int.from_bytes(field, "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise self._corrupt("a block of the reserved type", at)
        self._skip = 1 if kind == 1 else size  # an RLE block holds its one byte
        if not last:
            self._expect(3, self._block)
        elif self._checksum:
            self._expect(4, self._frame_end)
        else:
            self._frame_end(b"", at)

    def _frame_end(self, field: bytes, at: int) -> None:
        self._frames += 1
        self._expect(4, self._magic)


def _read_to_end(binary: BinaryIO) -> None:
    """Read the rest of a decompressed stream, so that the decompressor checks the end of the archive
    (gzip and xz check their trailer and checksums there; zstd its last frame)."""
    while binary.read(_DRAIN_BYTES):
        pass


@contextlib.contextmanager
def _open_binary(url: str, compression: str | None) -> Iterator[BinaryIO]:
    """The decompressed bytes of ``url``; a compressed file is read to its end when the block ends."""
    with storage.open_file(url, "rb") as raw:
        if compression is None:
            yield raw
            return
        if compression == "zstd":
            binary = io.BufferedReader(
                zstandard.ZstdDecompressor().stream_reader(_ZstdFrames(raw, url), read_across_frames=True))
        elif compression == "xz":
            binary = lzma.LZMAFile(raw)
        else:
            binary = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            yield binary
        except (PrepareError, UnicodeDecodeError, tarfile.TarError):
            # Garbled content (invalid JSON or UTF-8) can be the first sign of a damaged archive: if
            # the rest of it does not check out, that is the error to report.
            _read_to_end(binary)
            raise
        _read_to_end(binary)


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

    The pieces a JSON document is split into on "<|endoftext|>" keep its set name. Each file in a
    .tar.gz is a text document (empty files, folders and links left out)."""
    compression, kind = input_format(url)
    try:
        with _open_binary(url, compression) as binary:
            if kind == "tar":
                yield from _tar_documents(binary, url, split_on_eot)
                return
            stream = io.TextIOWrapper(binary, encoding="utf-8")
            if kind == "json":
                for document, set_name in _json_documents(stream, url):
                    pieces = _split_stream([document], EOT_TEXT) if split_on_eot else [document]
                    yield from ((piece, set_name) for piece in pieces)
            else:
                yield from _text_documents(_read_chunks(stream), split_on_eot)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{url}: not valid UTF-8 text ({e})") from None
    except EOFError as e:
        raise PrepareError(f"{url}: truncated {compression} archive: {e}") from None
    except _CORRUPTION_ERRORS as e:
        raise PrepareError(f"{url}: corrupt {compression} archive: {e}") from None
    except tarfile.TarError as e:
        raise PrepareError(f"{url}: corrupt tar archive: {e}") from None


def _text_documents(chunks: Iterable[str], split_on_eot: bool) -> Iterator[tuple[str, None]]:
    if split_on_eot:
        yield from ((text, None) for text in _split_stream(chunks, EOT_TEXT))
    else:
        yield "".join(chunks), None


def _decoded_chunks(binary: BinaryIO) -> Iterator[str]:
    """UTF-8 text of ``binary`` in chunks, as it is: a tar member's text is not newline-translated,
    as the original takes it (text files are, as Python's text mode does in the original)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    while chunk := binary.read(_TEXT_CHUNK_CHARS):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def _tar_documents(binary: BinaryIO, url: str, split_on_eot: bool) -> Iterator[tuple[str, None]]:
    """The text documents of a tar stream, one per file, in the archive's order."""
    with tarfile.open(fileobj=binary, mode="r|") as archive:
        for member in archive:
            if not (member.isfile() and member.size):
                continue
            try:
                yield from _text_documents(_decoded_chunks(archive.extractfile(member)), split_on_eot)
            except UnicodeDecodeError as e:
                raise PrepareError(f"{url}: member {member.name}: not valid UTF-8 text ({e})") from None


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
