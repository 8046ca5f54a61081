"""TFRecord files of ``tf.train.Example`` protos, read and written without TensorFlow.

Framing of one record, exactly as TensorFlow writes it::

    uint64 length (little endian) | uint32 masked CRC32C(length bytes) | data | uint32 masked CRC32C(data)

The Example protobuf is encoded by hand. Only int64 features are supported, which is all the
mesh-transformer-jax data format uses: feature "text" holds the token ids of one sequence.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import BinaryIO

import crc32c
import numpy as np

from mesh_transformer import storage
from mesh_transformer.errors import DataError

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
HEADER_SIZE = _LENGTH.size + _CRC.size
FOOTER_SIZE = _CRC.size
_CRC_MASK_DELTA = 0xA282EAD8

# Protobuf wire types.
_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5

# Field numbers of the tf.train.Example family of messages.
_EXAMPLE_FEATURES = 1
_FEATURES_ENTRY = 1
_ENTRY_KEY = 1
_ENTRY_VALUE = 2
_FEATURE_INT64_LIST = 3
_INT64_LIST_VALUE = 1

_MAX_VARINT_BYTES = 10
# How many bytes past a damaged header are searched for the next valid one at a time.
_RESYNC_WINDOW_BYTES = 1 << 20

IntValues = Sequence[int] | np.ndarray


class TFRecordError(DataError):
    """A TFRecord file is corrupt, truncated or holds a record the reader cannot use."""


class CorruptRecordError(TFRecordError):
    """A record whose bytes are damaged (a CRC mismatch, a truncation, undecodable bytes), as opposed to
    intact data that does not fit the run; the loader can be told to skip these."""


class ExampleError(ValueError):
    """Bytes that are not a valid tf.train.Example with int64 features."""


def masked_crc32c(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """``data`` wrapped in TFRecord framing."""
    length = _LENGTH.pack(len(data))
    return b"".join(
        (length, _CRC.pack(masked_crc32c(length)), data, _CRC.pack(masked_crc32c(data)))
    )


# ----------------------------------------------------------------------------------------------
# tf.train.Example encoding


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _as_int64_array(values: IntValues) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError as e:
        raise ExampleError(f"int64 feature value out of range [-2**63, 2**63): {e}") from None


def encode_varints(values: IntValues) -> bytes:
    """Protobuf varints of int64 values; negatives take 10 bytes (two's complement)."""
    unsigned = _as_int64_array(values).reshape(-1).view(np.uint64)
    byte_counts = np.ones(unsigned.shape, dtype=np.int64)
    for group in range(1, _MAX_VARINT_BYTES):
        byte_counts += (unsigned >> np.uint64(7 * group)) > 0
    starts = np.cumsum(byte_counts) - byte_counts
    out = np.empty(int(byte_counts.sum()), dtype=np.uint8)
    for group in range(int(byte_counts.max(initial=0))):
        has_group = byte_counts > group
        bits = (unsigned[has_group] >> np.uint64(7 * group)) & np.uint64(0x7F)
        continuation = np.where(byte_counts[has_group] > group + 1, 0x80, 0)
        out[starts[has_group] + group] = bits.astype(np.uint8) | continuation.astype(np.uint8)
    return out.tobytes()


def _field(field_number: int, payload: bytes) -> bytes:
    tag = _encode_varint((field_number << 3) | _LENGTH_DELIMITED)
    return tag + _encode_varint(len(payload)) + payload


def encode_int64_feature(values: IntValues) -> bytes:
    """A ``tf.train.Feature`` holding an ``Int64List`` (packed, as proto3 serializes it)."""
    packed = encode_varints(values)
    int64_list = _field(_INT64_LIST_VALUE, packed) if packed else b""
    return _field(_FEATURE_INT64_LIST, int64_list)


def encode_example(features: Mapping[str, IntValues]) -> bytes:
    """A serialized ``tf.train.Example`` of int64 features.

    Map entries are written in sorted key order, as protobuf's deterministic serialization does,
    so equal content always gives equal bytes.
    """
    entries = b"".join(
        _field(
            _FEATURES_ENTRY,
            _field(_ENTRY_KEY, key.encode("utf-8"))
            + _field(_ENTRY_VALUE, encode_int64_feature(features[key])),
        )
        for key in sorted(features)
    )
    return _field(_EXAMPLE_FEATURES, entries)


# ----------------------------------------------------------------------------------------------
# tf.train.Example decoding


def _decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise ExampleError(f"varint at byte {pos} runs past the end of its message")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos + i + 1
    raise ExampleError(f"varint at byte {pos} is longer than {_MAX_VARINT_BYTES} bytes")


def _iter_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field; a varint's value is its unsigned int."""
    pos = 0
    while pos < len(buf):
        tag, pos = _decode_varint(buf, pos)
        field_number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, pos = _decode_varint(buf, pos)
            yield field_number, wire_type, value
        elif wire_type == _LENGTH_DELIMITED:
            size, pos = _decode_varint(buf, pos)
            if pos + size > len(buf):
                raise ExampleError(
                    f"field {field_number} at byte {pos} claims {size} bytes but only "
                    f"{len(buf) - pos} remain"
                )
            yield field_number, wire_type, buf[pos : pos + size]
            pos += size
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
            if pos > len(buf):
                raise ExampleError(f"fixed-size field {field_number} runs past the end")
        else:
            raise ExampleError(f"unsupported protobuf wire type {wire_type} (field {field_number})")


def decode_varints(packed: bytes) -> np.ndarray:
    """Packed varints as int64 (values of 2**63 and above wrap to negatives, as int64 does)."""
    raw = np.frombuffer(packed, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    if raw[-1] & 0x80:
        raise ExampleError("packed int64 list ends in the middle of a varint")
    ends = np.flatnonzero(raw < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise ExampleError(f"packed int64 list holds a varint longer than {_MAX_VARINT_BYTES} bytes")
    position_in_varint = np.arange(raw.size) - np.repeat(starts, lengths)
    shifted = (raw & 0x7F).astype(np.uint64) << (7 * position_in_varint).astype(np.uint64)
    return np.bitwise_or.reduceat(shifted, starts).view(np.int64)


def _decode_int64_list(buf: bytes) -> list[np.ndarray]:
    # A writer may emit values packed, one by one, or both; protobuf concatenates them in order.
    parts = []
    for field_number, wire_type, value in _iter_fields(buf):
        if field_number != _INT64_LIST_VALUE:
            continue
        if wire_type == _LENGTH_DELIMITED:
            parts.append(decode_varints(value))
        elif wire_type == _VARINT:
            parts.append(np.array([value], dtype=np.uint64).view(np.int64))
    return parts


def _decode_feature(buf: bytes) -> np.ndarray | None:
    """The int64 values of a Feature, or None when it holds bytes or floats."""
    parts = None
    for field_number, wire_type, value in _iter_fields(buf):
        if field_number == _FEATURE_INT64_LIST and wire_type == _LENGTH_DELIMITED:
            parts = (parts or []) + _decode_int64_list(value)
    if parts is None:
        return None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _decode_entry(buf: bytes) -> tuple[str, np.ndarray | None]:
    key, feature = "", b""
    for field_number, wire_type, value in _iter_fields(buf):
        if wire_type != _LENGTH_DELIMITED:
            continue
        if field_number == _ENTRY_KEY:
            try:
                key = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ExampleError(f"feature name {value!r} is not valid UTF-8") from None
        elif field_number == _ENTRY_VALUE:
            feature = value
    return key, _decode_feature(feature)


def decode_int64_features(data: bytes) -> dict[str, np.ndarray]:
    """The int64 features of a serialized Example as int64 arrays; other kinds are left out."""
    features: dict[str, np.ndarray] = {}
    for field_number, wire_type, value in _iter_fields(data):
        if field_number != _EXAMPLE_FEATURES or wire_type != _LENGTH_DELIMITED:
            continue
        for entry_number, entry_type, entry in _iter_fields(value):
            if entry_number == _FEATURES_ENTRY and entry_type == _LENGTH_DELIMITED:
                key, values = _decode_entry(entry)
                if values is not None:
                    features[key] = values
    return features


def decode_example(data: bytes) -> dict[str, list[int]]:
    """The int64 features of a serialized Example as lists of Python ints."""
    return {key: values.tolist() for key, values in decode_int64_features(data).items()}


# ----------------------------------------------------------------------------------------------
# Writing


class TFRecordWriter:
    """Appends framed records to an open binary file object."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def write(self, data: bytes) -> None:
        self._f.write(frame_record(data))

    def write_example(self, features: Mapping[str, IntValues]) -> None:
        self.write(encode_example(features))


@contextlib.contextmanager
def open_writer(url: str) -> Iterator[TFRecordWriter]:
    """A writer to a new file at a local path or URL, closed when the block ends."""
    with storage.open_file(url, "wb") as f:
        yield TFRecordWriter(f)


# ----------------------------------------------------------------------------------------------
# Reading


def _read_length(f: BinaryIO, name: str, offset: int) -> int | None:
    """The data length in the header at ``offset`` (where ``f`` is), or None at end of file."""
    header = f.read(HEADER_SIZE)
    if not header:
        return None
    if len(header) < HEADER_SIZE:
        raise CorruptRecordError(
            f"{name}: truncated record at byte offset {offset}: header has {len(header)} of "
            f"{HEADER_SIZE} bytes"
        )
    length_bytes, crc_bytes = header[: _LENGTH.size], header[_LENGTH.size :]
    _check_crc(length_bytes, crc_bytes, f"{name}: corrupt record at byte offset {offset}: length")
    return _LENGTH.unpack(length_bytes)[0]


def _check_crc(data: bytes, crc_bytes: bytes, what: str) -> None:
    (stored,) = _CRC.unpack(crc_bytes)
    computed = masked_crc32c(data)
    if computed != stored:
        raise CorruptRecordError(
            f"{what} CRC mismatch: expected the stored masked CRC32C 0x{stored:08x}, the bytes give 0x{computed:08x}"
        )


def _read_data(f: BinaryIO, name: str, offset: int, length: int) -> bytes:
    body = f.read(length + FOOTER_SIZE)
    if len(body) < length + FOOTER_SIZE:
        raise CorruptRecordError(
            f"{name}: truncated record at byte offset {offset}: expected {length} data bytes and a "
            f"{FOOTER_SIZE}-byte CRC, found {len(body)} bytes"
        )
    _check_crc(body[:length], body[length:], f"{name}: corrupt record at byte offset {offset}: data")
    return body[:length]


def record_size(length: int) -> int:
    """Bytes a record with ``length`` data bytes occupies in a file."""
    return HEADER_SIZE + length + FOOTER_SIZE


def iter_records(f: BinaryIO, name: str) -> Iterator[tuple[int, bytes]]:
    """(byte offset, data) of every record from the start of ``f``, CRCs verified.

    ``name`` (the file's path or URL) is only used in error messages.
    """
    offset = 0
    f.seek(0)
    while (length := _read_length(f, name, offset)) is not None:
        yield offset, _read_data(f, name, offset, length)
        offset += record_size(length)


def scan_record_offsets(
    f: BinaryIO, name: str, on_damage: Callable[[CorruptRecordError], None] | None = None
) -> np.ndarray:
    """Byte offsets of all records, reading only their headers (data is skipped, not verified).

    A damaged header or a truncated record raises ``CorruptRecordError``; given ``on_damage``, the
    error goes to it instead and the scan goes on at the next valid header, so that only the damaged
    record is lost (the search is deterministic: the same file always gives the same offsets).
    """
    file_size = f.seek(0, 2)
    offsets = []
    offset = 0
    while offset < file_size:
        try:
            end = _checked_record_end(f, name, offset, file_size)
        except CorruptRecordError as error:
            if on_damage is None:
                raise
            on_damage(error)
            offset = _next_valid_header(f, offset + 1, file_size)
            continue
        offsets.append(offset)
        offset = end
    return np.asarray(offsets, dtype=np.int64)


def _checked_record_end(f: BinaryIO, name: str, offset: int, file_size: int) -> int:
    """Where the record at ``offset`` ends, after checking its header and that the file holds all of it."""
    f.seek(offset)
    length = _read_length(f, name, offset)
    end = offset + record_size(length)
    if end > file_size:
        raise CorruptRecordError(
            f"{name}: truncated record at byte offset {offset}: it needs {record_size(length)} "
            f"bytes but the file ends after {file_size - offset}"
        )
    return end


def _is_valid_header(header: bytes, offset: int, file_size: int) -> bool:
    length_bytes, crc_bytes = header[: _LENGTH.size], header[_LENGTH.size :]
    if masked_crc32c(length_bytes) != _CRC.unpack(crc_bytes)[0]:
        return False
    return offset + record_size(_LENGTH.unpack(length_bytes)[0]) <= file_size


def _next_valid_header(f: BinaryIO, start: int, file_size: int) -> int:
    """The first offset from ``start`` on that holds a valid header of a record the file holds whole,
    or ``file_size`` when there is none. A random 8 bytes match their CRC with odds 2**-32, and a false
    match is then caught by its data CRC."""
    window_start = start
    while window_start + HEADER_SIZE <= file_size:
        f.seek(window_start)
        window = f.read(_RESYNC_WINDOW_BYTES + HEADER_SIZE - 1)
        for i in range(len(window) - HEADER_SIZE + 1):
            if _is_valid_header(window[i : i + HEADER_SIZE], window_start + i, file_size):
                return window_start + i
        window_start += _RESYNC_WINDOW_BYTES
    return file_size


def record_data(framed: bytes, offset: int, name: str) -> bytes:
    """The data of the record that ``framed`` starts with (bytes read from ``offset`` of ``name`` on;
    more may follow the record), CRCs verified."""
    f = io.BytesIO(framed)
    length = _read_length(f, name, offset)
    if length is None:
        raise TFRecordError(f"{name}: no record at byte offset {offset}: end of file")
    return _read_data(f, name, offset, length)


def read_record_at(f: BinaryIO, offset: int, name: str) -> bytes:
    """The data of the record that starts at byte ``offset``, CRCs verified."""
    f.seek(offset)
    length = _read_length(f, name, offset)
    if length is None:
        raise TFRecordError(f"{name}: no record at byte offset {offset}: end of file")
    return _read_data(f, name, offset, length)
