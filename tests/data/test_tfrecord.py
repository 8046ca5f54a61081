"""TFRecord framing and tf.train.Example codec, cross-checked against files TensorFlow wrote."""

import io
import json
import os
import struct
import uuid

import numpy as np
import pytest

from mesh_transformer import storage
from mesh_transformer.data.tfrecord import (
    HEADER_SIZE,
    CorruptRecordError,
    ExampleError,
    TFRecordError,
    TFRecordWriter,
    decode_example,
    decode_int64_features,
    encode_example,
    iter_records,
    masked_crc32c,
    open_writer,
    read_record_at,
    scan_record_offsets,
)

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def write_examples(path, records):
    with open_writer(str(path)) as writer:
        for record in records:
            writer.write_example(record)


def read_examples(path):
    with open(path, "rb") as f:
        return [decode_example(data) for _, data in iter_records(f, str(path))]


def test_masked_crc_matches_the_header_tensorflow_wrote():
    with open(os.path.join(FIXTURES, "tf_text.tfrecords"), "rb") as f:
        header = f.read(12)
    assert masked_crc32c(header[:8]) == struct.unpack("<I", header[8:])[0]


def test_round_trip_through_a_file(tmp_path):
    records = [{"text": list(range(n, n + 9))} for n in (0, 100, 50_000)]
    records.append({"text": [7] * 9, "length": [3]})
    path = tmp_path / "data.tfrecords"
    write_examples(path, records)
    assert read_examples(path) == records


def test_round_trip_through_an_fsspec_url():
    url = f"memory://tfrecord-test-{uuid.uuid4().hex}/data.tfrecords"
    with open_writer(url) as writer:
        writer.write_example({"text": [1, 2, 3]})
    with storage.open_file(url) as f:
        assert [decode_example(data) for _, data in iter_records(f, url)] == [{"text": [1, 2, 3]}]


@pytest.mark.parametrize(
    "values",
    [[], [0], [1, 127, 128, 16383, 16384], [-1, -2, -(2**63)], [2**63 - 1, 2**32, 2**56]],
)
def test_example_int64_values_round_trip(values):
    assert decode_example(encode_example({"values": values})) == {"values": values}


def test_example_rejects_values_outside_int64():
    with pytest.raises(ExampleError, match="out of range"):
        encode_example({"text": [2**63]})


def test_negative_ints_take_ten_bytes():
    one = len(encode_example({"v": [1]}))
    assert len(encode_example({"v": [-1]})) == one + 9


def test_map_entries_are_written_in_sorted_key_order():
    assert encode_example({"text": [1], "length": [1]}) == encode_example({"length": [1], "text": [1]})


def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_decoder_reads_unpacked_values_and_skips_unknown_fields():
    unpacked = b"".join(_varint(1 << 3 | 0) + _varint(v) for v in (5, 300))
    packed = _field(1, _varint(7))
    int64_feature = _field(3, unpacked + packed)
    bytes_feature = _field(1, _field(1, b"hello"))
    entries = _field(1, _field(1, b"ids") + _field(2, int64_feature))
    entries += _field(1, _field(1, b"raw") + _field(2, bytes_feature))
    unknown = _varint(9 << 3 | 0) + _varint(42) + _varint(10 << 3 | 5) + b"abcd" + _varint(11 << 3 | 1) + b"12345678"
    example = unknown + _field(1, entries)
    assert decode_example(example) == {"ids": [5, 300, 7]}


def test_decoder_reports_malformed_bytes():
    with pytest.raises(ExampleError, match="claims"):
        decode_int64_features(b"\x0a\x05\x01")
    with pytest.raises(ExampleError, match="middle of a varint"):
        decode_int64_features(_field(1, _field(1, _field(1, b"k") + _field(2, _field(3, _field(1, b"\x80"))))))


def test_decoded_arrays_are_int64():
    values = decode_int64_features(encode_example({"text": [1, 2]}))["text"]
    assert values.dtype == np.int64


def _three_record_file(tmp_path):
    path = tmp_path / "three.tfrecords"
    write_examples(path, [{"text": [i] * 4} for i in range(3)])
    with open(path, "rb") as f:
        offsets = scan_record_offsets(f, str(path))
    return path, offsets


def test_scan_offsets_and_random_access(tmp_path):
    path, offsets = _three_record_file(tmp_path)
    with open(path, "rb") as f:
        assert offsets.tolist() == [offset for offset, _ in iter_records(f, str(path))]
        for i in (2, 0, 1):
            assert decode_example(read_record_at(f, int(offsets[i]), str(path))) == {"text": [i] * 4}
        with pytest.raises(TFRecordError, match="end of file"):
            read_record_at(f, os.path.getsize(path), str(path))


def _corrupt(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_data_crc_mismatch_names_file_and_offset(tmp_path):
    path, offsets = _three_record_file(tmp_path)
    _corrupt(path, int(offsets[1]) + 14)
    with open(path, "rb") as f, pytest.raises(TFRecordError) as error:
        list(iter_records(f, str(path)))
    assert str(path) in str(error.value)
    assert f"byte offset {offsets[1]}" in str(error.value)
    assert "data CRC" in str(error.value)


def test_length_crc_mismatch_is_detected_by_scan(tmp_path):
    path, offsets = _three_record_file(tmp_path)
    _corrupt(path, int(offsets[2]) + 1)
    with open(path, "rb") as f, pytest.raises(TFRecordError, match=f"byte offset {offsets[2]}: length CRC"):
        scan_record_offsets(f, str(path))


@pytest.mark.parametrize("cut", [1, 5, 14])
def test_truncated_file(tmp_path, cut):
    path, offsets = _three_record_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-cut])
    expected = f"truncated record at byte offset {offsets[2]}"
    for read in (lambda f: list(iter_records(f, str(path))), lambda f: scan_record_offsets(f, str(path))):
        with open(path, "rb") as f, pytest.raises(TFRecordError, match=expected):
            read(f)


def test_crc_errors_are_one_line_and_say_what_was_expected(tmp_path):
    path, offsets = _three_record_file(tmp_path)
    _corrupt(path, int(offsets[0]) + 1)
    with open(path, "rb") as f, pytest.raises(CorruptRecordError) as error:
        scan_record_offsets(f, str(path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: corrupt record at byte offset 0: length CRC mismatch: expected")


def _skipping_scan(path):
    damage = []
    with open(path, "rb") as f:
        return scan_record_offsets(f, str(path), on_damage=damage.append).tolist(), damage


def test_scan_with_on_damage_resumes_at_the_next_valid_header(tmp_path):
    path, offsets = _three_record_file(tmp_path)
    _corrupt(path, int(offsets[1]) + 1)  # the length of the middle record
    found, damage = _skipping_scan(path)
    assert found == [offsets[0], offsets[2]]
    assert len(damage) == 1 and f"byte offset {offsets[1]}: length CRC" in str(damage[0])


def test_scan_with_on_damage_drops_a_truncated_last_record(tmp_path):
    path, offsets = _three_record_file(tmp_path)
    path.write_bytes(path.read_bytes()[: int(offsets[2]) + HEADER_SIZE + 1])
    found, damage = _skipping_scan(path)
    assert found == offsets[:2].tolist()
    assert len(damage) == 1 and f"truncated record at byte offset {offsets[2]}" in str(damage[0])


# -- TensorFlow cross-check: fixtures written by tests/fixtures/make_tf_fixtures.py -----------------


def _tf_fixtures():
    with open(os.path.join(FIXTURES, "tf_fixtures.json")) as f:
        return json.load(f)["files"]


@pytest.mark.parametrize("name", sorted(_tf_fixtures()))
def test_writer_matches_tensorflow_byte_for_byte(name):
    buffer = io.BytesIO()
    writer = TFRecordWriter(buffer)
    for record in _tf_fixtures()[name]:
        writer.write_example(record)
    with open(os.path.join(FIXTURES, name), "rb") as f:
        assert buffer.getvalue() == f.read()


@pytest.mark.parametrize("name", sorted(_tf_fixtures()))
def test_reader_decodes_tensorflow_files(name):
    assert read_examples(os.path.join(FIXTURES, name)) == _tf_fixtures()[name]
