"""TFRecordLoader: order, shuffling, exact resume, multi-host sharding, validation and prefetch."""

import logging
import os
import uuid

import numpy as np
import pytest

from mesh_transformer import storage
from mesh_transformer.data.loader import (
    LoaderState,
    TFRecordLoader,
    read_index,
    resolve_index,
)
from mesh_transformer.data.tfrecord import TFRecordError, open_writer

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
    next_epoch = read_epoch(dataset, seed=1, state=LoaderState(epoch=1))
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
        assert loader.state() == LoaderState(epoch=1, file_index=0, record_index=0)


def test_state_counts_returned_batches_not_prefetched_ones(dataset):
    with TFRecordLoader(dataset, L, (1,), shuffle=False, prefetch=8) as loader:
        assert loader.state() == LoaderState()
        take(loader, 2)
        assert loader.state() == LoaderState(epoch=0, file_index=0, record_index=2)


def test_loader_state_from_dict_rejects_garbage():
    with pytest.raises(ValueError, match="invalid loader state"):
        LoaderState.from_dict({"epoch": 1})


def test_state_pointing_past_a_file_is_rejected(dataset):
    with TFRecordLoader(dataset, L, (1,), shuffle=False, state=LoaderState(0, 1, 9)) as loader:
        with pytest.raises(ValueError, match="past the 3 records"):
            next(loader)


@pytest.mark.parametrize("process_count", [2, 3, 5])
def test_processes_share_an_epoch_without_overlap(dataset, process_count):
    per_process = [
        read_epoch(dataset, seed=9, process_index=p, process_count=process_count) for p in range(process_count)
    ]
    # Equality with the sorted list of all records also rules out a record read twice.
    assert sorted(r for records in per_process for r in records) == ALL_RECORDS
    assert all(per_process)


def test_more_processes_than_files_is_an_error(dataset):
    with pytest.raises(ValueError, match="5 tfrecord files but there are 6 processes"):
        TFRecordLoader(dataset, L, (1,), process_index=0, process_count=6)


def test_restore_per_process_state(dataset):
    with TFRecordLoader(dataset, L, (2,), seed=4, process_index=1, process_count=2) as loader:
        take(loader, 3)
        state = loader.state()
        expected = take(loader, 4)
    with TFRecordLoader(dataset, L, (2,), seed=4, process_index=1, process_count=2, state=state) as loader:
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
