"""TFRecordLoader: order, shuffling, exact resume, streams split over processes, validation and prefetch."""

import logging
import os
import uuid

import numpy as np
import pytest

from mesh_transformer import storage
from mesh_transformer.data.loader import (
    LoaderState,
    StreamPosition,
    TFRecordLoader,
    read_index,
    resolve_index,
)
from mesh_transformer.data.tfrecord import (
    HEADER_SIZE,
    CorruptRecordError,
    TFRecordError,
    TFRecordWriter,
    open_writer,
    scan_record_offsets,
)

L = 6  # seq_len_plus_one used throughout


def record_tokens(file_id, record_id):
    # Tokens 0 and 1 identify the record, so batches can be traced back to their source.
    return [file_id, record_id] + [7] * (L - 2)


def make_dataset(directory, records_per_file, name="train"):
    """Files of identifiable records and an index (relative paths) listing them; returns the index."""
    lines = []
    for file_id, count in enumerate(records_per_file):
        file_name = f"{name}_{file_id}.tfrecords"
        with open_writer(os.path.join(str(directory), file_name)) as writer:
            for record_id in range(count):
                writer.write_example({"text": record_tokens(file_id, record_id)})
        lines.append(file_name)
    index = os.path.join(str(directory), f"{name}.index")
    with open(index, "w") as f:
        f.write("\n".join(lines) + "\n")
    return index


def ids(batch):
    return [tuple(row[:2]) for row in batch.tokens.reshape(-1, L).tolist()]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def read_epoch(index, batch_size=1, **kwargs):
    with TFRecordLoader(index, L, (batch_size,), loop=False, **kwargs) as loader:
        return [record for batch in loader for record in ids(batch)]


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path, [5, 3, 7, 1, 4])


ALL_RECORDS = sorted((f, r) for f, n in enumerate([5, 3, 7, 1, 4]) for r in range(n))


def test_batches_have_the_requested_shape_and_dtypes(dataset):
    with TFRecordLoader(dataset, L, (2, 3)) as loader:
        batch = next(loader)
    assert batch.tokens.shape == (2, 3, L) and batch.tokens.dtype == np.int32
    assert batch.mask.shape == (2, 3, L) and batch.mask.dtype == np.float32
    assert (batch.mask == 1.0).all()


def test_without_shuffle_files_and_records_come_in_index_order(dataset):
    assert read_epoch(dataset, shuffle=False) == ALL_RECORDS


def test_shuffle_is_a_deterministic_permutation_per_seed_and_epoch(dataset):
    first = read_epoch(dataset, seed=1)
    assert sorted(first) == ALL_RECORDS
    assert read_epoch(dataset, seed=1) == first
    assert read_epoch(dataset, seed=2) != first
    next_epoch = read_epoch(dataset, seed=1, state=LoaderState((StreamPosition(epoch=1),)))
    assert sorted(next_epoch) == ALL_RECORDS and next_epoch != first


def test_looping_reads_every_record_once_per_epoch(dataset):
    with TFRecordLoader(dataset, L, (4,), seed=3) as loader:
        records = [r for batch in take(loader, 10) for r in ids(batch)]  # two epochs of 20
    assert sorted(records[:20]) == ALL_RECORDS
    assert sorted(records[20:]) == ALL_RECORDS
    assert records[:20] != records[20:]


def test_batches_span_file_boundaries_without_dropping(dataset):
    assert len(read_epoch(dataset, batch_size=4, shuffle=False)) == 20


def test_final_partial_batch_is_dropped_with_a_warning(dataset, caplog):
    with caplog.at_level(logging.WARNING):
        records = read_epoch(dataset, batch_size=3)
    assert len(records) == 18
    assert "final partial batch of 2 records" in caplog.text


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("consumed", [1, 2, 4, 6])  # 6 batches of 3 cross into epoch 2 (20 records)
def test_restored_state_continues_exactly(dataset, shuffle, consumed):
    with TFRecordLoader(dataset, L, (3,), seed=5, shuffle=shuffle, prefetch=3) as loader:
        take(loader, consumed)
        state = loader.state()
        expected = take(loader, 5)
    saved = LoaderState.from_dict(state.to_dict())
    with TFRecordLoader(dataset, L, (3,), seed=5, shuffle=shuffle, state=saved) as restored:
        actual = take(restored, 5)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a.tokens, e.tokens)
        np.testing.assert_array_equal(a.mask, e.mask)


def test_state_at_an_epoch_boundary(dataset):
    with TFRecordLoader(dataset, L, (5,), seed=0) as loader:
        take(loader, 4)
        assert loader.state() == LoaderState((StreamPosition(epoch=1, part=0, record=0),))


def test_state_counts_returned_batches_not_prefetched_ones(dataset):
    with TFRecordLoader(dataset, L, (1,), shuffle=False, prefetch=8) as loader:
        assert loader.state() == LoaderState((StreamPosition(),))
        take(loader, 2)
        assert loader.state() == LoaderState((StreamPosition(epoch=0, part=0, record=2),))


def test_loader_state_from_dict_rejects_garbage():
    with pytest.raises(ValueError, match="invalid loader state"):
        LoaderState.from_dict({"epoch": 1})
    with pytest.raises(ValueError, match="invalid stream position"):
        LoaderState.from_dict({"streams": [{"epoch": 1}]})


def test_loader_state_round_trips_and_reads_the_single_stream_format():
    state = LoaderState((StreamPosition(1, 2, 3), StreamPosition(0, 1, 0)))
    assert LoaderState.from_dict(state.to_dict()) == state
    legacy = {"epoch": 2, "file_index": 1, "record_index": 4}
    assert LoaderState.from_dict(legacy) == LoaderState((StreamPosition(2, 1, 4),))


def test_state_pointing_past_a_file_is_rejected(dataset):
    with TFRecordLoader(dataset, L, (1,), shuffle=False, state=LoaderState((StreamPosition(0, 1, 9),))) as loader:
        with pytest.raises(ValueError, match="past the 3 records"):
            next(loader)


@pytest.mark.parametrize("streams", [2, 3, 5, 7, 12])  # 7 and 12 streams split the 5 files into parts
def test_streams_share_an_epoch_without_overlap(dataset, streams):
    per_stream = [read_epoch(dataset, seed=9, streams=streams, stream_range=(s, s + 1)) for s in range(streams)]
    # Equality with the sorted list of all records also rules out a record read twice.
    assert sorted(r for records in per_stream for r in records) == ALL_RECORDS


def test_with_at_least_as_many_files_as_streams_each_stream_reads_whole_files(dataset):
    files = [{f for f, _ in read_epoch(dataset, seed=9, streams=2, stream_range=(s, s + 1))} for s in range(2)]
    assert not files[0] & files[1]


def read_rows(index, streams, stream_range, rows, n_batches, state=None):
    with TFRecordLoader(index, L, (2, rows), seed=6, streams=streams, stream_range=stream_range,
                        state=state) as loader:
        return [b.tokens for b in take(loader, n_batches)], loader.state()


@pytest.mark.parametrize("streams", [2, 4])
def test_the_global_batch_does_not_depend_on_how_streams_are_split(dataset, streams):
    whole, _ = read_rows(dataset, streams, None, 8, 6)
    per_process = [read_rows(dataset, streams, (p * streams // 2, (p + 1) * streams // 2), 4, 6)[0]
                   for p in range(2)]
    for step, batch in enumerate(whole):
        # Process p holds rows [p * 4, (p + 1) * 4) of every micro-batch.
        np.testing.assert_array_equal(batch, np.concatenate([per_process[0][step], per_process[1][step]], axis=1))


def test_stream_rows_are_contiguous_blocks(dataset):
    (batch,), _ = read_rows(dataset, 2, None, 4, 1)
    for stream in range(2):
        alone, _ = read_rows(dataset, 2, (stream, stream + 1), 2, 1)
        np.testing.assert_array_equal(batch[:, 2 * stream : 2 * stream + 2], alone[0])


def test_a_state_saved_by_two_processes_restores_in_one(dataset):
    states = [read_rows(dataset, 2, (p, p + 1), 2, 3)[1] for p in range(2)]
    # What the training run gathers before saving: each process's own stream positions.
    merged = LoaderState((states[0].streams[0], states[1].streams[1]))
    expected, _ = read_rows(dataset, 2, None, 4, 7)
    resumed, _ = read_rows(dataset, 2, None, 4, 4, state=merged)
    for a, e in zip(resumed, expected[3:], strict=True):
        np.testing.assert_array_equal(a, e)


def test_a_changed_stream_count_starts_the_next_epoch_with_a_warning(dataset, caplog):
    _, state = read_rows(dataset, 2, None, 4, 1)  # still in epoch 0
    with caplog.at_level(logging.WARNING):
        with TFRecordLoader(dataset, L, (4,), streams=4, state=state) as loader:
            assert all(p.epoch == 1 for p in loader.state().streams)
    assert "has 2 streams but this run reads 4" in caplog.text


def test_a_position_outside_its_stream_is_rejected(dataset):
    state = LoaderState((StreamPosition(0, 1, 0), StreamPosition(0, 1, 0)))
    with pytest.raises(ValueError, match="not one of that stream's parts"):
        TFRecordLoader(dataset, L, (2,), streams=2, state=state)


def test_rows_must_split_evenly_between_streams(dataset):
    with pytest.raises(ValueError, match="split evenly between the 2 streams"):
        TFRecordLoader(dataset, L, (3,), streams=2)


def test_a_stream_without_records_is_an_error_when_looping(tmp_path):
    index = make_dataset(tmp_path, [1])
    with TFRecordLoader(index, L, (2,), streams=2) as loader, pytest.raises(ValueError, match="stream 1 of 2"):
        next(loader)


def test_restore_a_state_with_a_subset_of_streams(dataset):
    with TFRecordLoader(dataset, L, (2,), seed=4, streams=2, stream_range=(1, 2)) as loader:
        take(loader, 3)
        state = loader.state()
        expected = take(loader, 4)
    with TFRecordLoader(dataset, L, (2,), seed=4, streams=2, stream_range=(1, 2), state=state) as loader:
        assert [ids(b) for b in take(loader, 4)] == [ids(b) for b in expected]


def test_wrong_record_length_names_file_offset_and_counts(tmp_path):
    index = make_dataset(tmp_path, [2])
    with TFRecordLoader(index, L + 1, (1,)) as loader, pytest.raises(TFRecordError) as error:
        next(loader)
    message = str(error.value)
    assert "train_0.tfrecords" in message and "byte offset" in message
    assert f"has {L} tokens, expected {L + 1}" in message and "seq" in message


def test_negative_token_ids_are_rejected(tmp_path):
    path = tmp_path / "bad.tfrecords"
    with open_writer(str(path)) as writer:
        writer.write_example({"text": [1, -5, 1, 1, 1, 1]})
    (tmp_path / "bad.index").write_text("bad.tfrecords\n")
    with TFRecordLoader(str(tmp_path / "bad.index"), L, (1,)) as loader:
        with pytest.raises(TFRecordError, match="token id -5"):
            next(loader)


def _offsets(path):
    with open(path, "rb") as f:
        return scan_record_offsets(f, str(path))


def write_single_file_set(tmp_path, records):
    """One tfrecord file of ``records`` (token lists) and its index; returns the index."""
    with open_writer(str(tmp_path / "one.tfrecords")) as writer:
        for tokens in records:
            writer.write_example({"text": tokens})
    (tmp_path / "one.index").write_text("one.tfrecords\n")
    return str(tmp_path / "one.index")


def test_ids_at_or_above_n_vocab_name_file_offset_and_the_limit(tmp_path):
    index = write_single_file_set(tmp_path, [[1] * L, [1, 2, 300, 3, 264, 4]])
    second_offset = _offsets(tmp_path / "one.tfrecords")[1]
    with TFRecordLoader(index, L, (2,), shuffle=False, n_vocab=264) as loader, pytest.raises(TFRecordError) as error:
        next(loader)
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"{tmp_path / 'one.tfrecords'}: record at byte offset {second_offset} holds token id 300 at "
                       "position 2 (2 ids out of range), expected ids in [0, 264) (the config's n_vocab)")


def test_padding_ids_warn_once_per_file_with_a_count(tmp_path, caplog):
    index = write_single_file_set(tmp_path, [[1, 258, 260, 1, 1, 1], [259] * L, [1] * L])
    with TFRecordLoader(index, L, (3,), shuffle=False, n_vocab=264, real_vocab=257) as loader:
        batch = next(loader)
    assert batch.tokens[0, 1] == 258  # a warning, not an error: the ids reach the batch
    warnings = [r.getMessage() for r in caplog.records if "cannot produce" in r.getMessage()]
    assert len(warnings) == 1
    assert "record at byte offset 0 holds 2 token ids in [257, 264)" in warnings[0]
    assert "one.tfrecords" in warnings[0]


def damage_dataset(directory):
    """In the 5-file dataset: record 1 of file 0 gets a bad length CRC, record 2 of file 2 a bad data CRC."""
    for file_id, record, where in ((0, 1, 1), (2, 2, HEADER_SIZE + 1)):
        path = directory / f"train_{file_id}.tfrecords"
        data = bytearray(path.read_bytes())
        data[int(_offsets(path)[record]) + where] ^= 0xFF
        path.write_bytes(bytes(data))
    return {(0, 1), (2, 2)}


def test_a_damaged_record_stops_the_loader_with_a_one_line_error(dataset, tmp_path):
    damage_dataset(tmp_path)
    with TFRecordLoader(dataset, L, (1,), shuffle=False) as loader, pytest.raises(CorruptRecordError) as error:
        take(loader, 20)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{tmp_path / 'train_0.tfrecords'}: corrupt record at byte offset ")


def test_skip_passes_over_damaged_records_and_counts_them(dataset, tmp_path, caplog):
    damaged = damage_dataset(tmp_path)
    with TFRecordLoader(dataset, L, (1,), shuffle=False, loop=False, bad_records="skip") as loader:
        records = [record for batch in loader for record in ids(batch)]
        assert loader.skipped_records == 2
    assert records == [r for r in ALL_RECORDS if r not in damaged]
    assert caplog.text.count("skipping a damaged record") == 2


def test_skip_passes_over_records_that_are_not_examples(tmp_path):
    index = write_single_file_set(tmp_path, [[1] * L])
    with open(tmp_path / "one.tfrecords", "ab") as f:
        TFRecordWriter(f).write(b"\xff\xff")  # intact framing around bytes that are no protobuf
    with TFRecordLoader(index, L, (1,), shuffle=False, loop=False, bad_records="skip") as loader:
        assert [ids(b) for b in loader] == [[(1, 1)]]
        assert loader.skipped_records == 1


@pytest.mark.parametrize("consumed", [1, 2, 3, 5])  # 6 batches of 3 make the 18 intact records of an epoch
def test_skip_resumes_exactly_skipping_the_same_records(dataset, tmp_path, consumed):
    damage_dataset(tmp_path)
    options = dict(seed=5, bad_records="skip")
    with TFRecordLoader(dataset, L, (3,), **options) as loader:
        expected = [ids(b) for b in take(loader, 9)]
    with TFRecordLoader(dataset, L, (3,), **options) as loader:
        take(loader, consumed)
        state = LoaderState.from_dict(loader.state().to_dict())
    with TFRecordLoader(dataset, L, (3,), state=state, **options) as restored:
        assert [ids(b) for b in take(restored, 9 - consumed)] == expected[consumed:]
        assert restored.skipped_records >= 1


def test_bad_records_policy_is_checked(dataset):
    with pytest.raises(ValueError, match="bad_records must be one of"):
        TFRecordLoader(dataset, L, (1,), bad_records="ignore")


def test_length_feature_masks_padding(tmp_path):
    path = tmp_path / "padded.tfrecords"
    with open_writer(str(path)) as writer:
        writer.write_example({"text": [1, 2, 3, 4, 5, 6]})
        writer.write_example({"text": [8, 9, 0, 0, 0, 0], "length": [2]})
    (tmp_path / "padded.index").write_text("padded.tfrecords\n")
    with TFRecordLoader(str(tmp_path / "padded.index"), L, (2,), shuffle=False) as loader:
        batch = next(loader)
    np.testing.assert_array_equal(batch.mask, [[1] * 6, [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.tokens[1], [8, 9, 0, 0, 0, 0])


def test_corrupt_file_error_reaches_the_consumer(dataset, tmp_path):
    path = tmp_path / "train_0.tfrecords"
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    with TFRecordLoader(dataset, L, (1,), shuffle=False) as loader, pytest.raises(TFRecordError, match="CRC"):
        take(loader, 20)


def test_missing_tfrecord_file_names_the_index(dataset, tmp_path):
    os.remove(tmp_path / "train_0.tfrecords")
    with TFRecordLoader(dataset, L, (1,), shuffle=False) as loader:
        with pytest.raises(FileNotFoundError, match="train_0.tfrecords.*listed in"):
            next(loader)


def test_close_stops_the_prefetch_thread(dataset):
    loader = TFRecordLoader(dataset, L, (1,), prefetch=2)
    next(loader)
    loader.close()
    assert not loader._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_loader_reads_through_fsspec_urls():
    root = f"memory://loader-test-{uuid.uuid4().hex}"
    with open_writer(f"{root}/a.tfrecords") as writer:
        writer.write_example({"text": record_tokens(0, 0)})
    storage.write_text_atomic(f"{root}/idx/train.index", "../a.tfrecords\n")
    assert read_index(f"{root}/idx/train.index") == [f"{root}/idx/../a.tfrecords"]
    storage.write_text_atomic(f"{root}/train.index", f"{root}/a.tfrecords\n")
    with TFRecordLoader(f"{root}/train.index", L, (1,), loop=False) as loader:
        assert [ids(b) for b in loader] == [[(0, 0)]]


def test_read_index_skips_blank_lines_and_resolves_relative_paths(tmp_path):
    index = tmp_path / "sets" / "mix.index"
    index.parent.mkdir()
    index.write_text("a.tfrecords\n\n  sub/b.tfrecords  \n/abs/c.tfrecords\ngs://bucket/d.tfrecords\n")
    assert read_index(str(index)) == [
        str(tmp_path / "sets" / "a.tfrecords"),
        str(tmp_path / "sets" / "sub" / "b.tfrecords"),
        "/abs/c.tfrecords",
        "gs://bucket/d.tfrecords",
    ]


def test_empty_index_is_an_error(tmp_path):
    (tmp_path / "empty.index").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no tfrecord files"):
        read_index(str(tmp_path / "empty.index"))


def test_resolve_index_finds_bare_names_under_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pile.train.index").write_text("x.tfrecords\n")
    assert resolve_index("pile.train.index") == os.path.join("data", "pile.train.index")
    assert resolve_index(str(tmp_path / "data" / "pile.train.index")) == str(tmp_path / "data" / "pile.train.index")
    with pytest.raises(FileNotFoundError, match="looked at: 'missing.index', 'data/missing.index'"):
        resolve_index("missing.index")
