"""MixtureLoader: proportions, determinism, exact resume, streams split over processes, state changes,
the train_set mapping's validation, and a plain train_set left as it was."""

import logging
import math
import os

import numpy as np
import pytest

from mesh_transformer.data.loader import LoaderState, StreamPosition, TFRecordLoader
from mesh_transformer.models.registry import parse_config
from mesh_transformer.data.mixture import (
    MixtureLoader,
    MixtureSchedule,
    MixtureState,
    SourceState,
    loader_state_from_dict,
    source_names,
    train_loader,
)
from mesh_transformer.data.tfrecord import TFRecordError, open_writer
from mesh_transformer.errors import ConfigError

L = 6  # seq_len_plus_one used throughout


def make_source(directory, source_id, records_per_file, length=L):
    """An index of files whose records say where they come from: (source, file, record, 7, ...)."""
    lines = []
    for file_id, count in enumerate(records_per_file):
        name = f"s{source_id}_{file_id}.tfrecords"
        with open_writer(os.path.join(str(directory), name)) as writer:
            for record_id in range(count):
                writer.write_example({"text": [source_id, file_id, record_id] + [7] * (length - 3)})
        lines.append(name)
    index = os.path.join(str(directory), f"source{source_id}.index")
    with open(index, "w") as f:
        f.write("\n".join(lines) + "\n")
    return index


@pytest.fixture
def sources(tmp_path):
    """Three sources of different sizes; the smallest (5 records) loops many times in the tests."""
    return [make_source(tmp_path, 0, [20, 13, 9]), make_source(tmp_path, 1, [7, 6]), make_source(tmp_path, 2, [5])]


def rows_of(batch):
    return [tuple(row[:3]) for row in batch.tokens.reshape(-1, L).tolist()]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def mixture(indexes, weights, batch_shape=(2, 4), **options):
    return MixtureLoader(dict(zip(indexes, weights)), L, batch_shape, **options)


def test_observed_proportions_match_the_weights(sources):
    weights = [3.0, 1.0, 0.5]
    with mixture(sources, weights, (2, 8), seed=1, streams=4) as loader:
        batches = take(loader, 150)
        tokens_seen = loader.tokens_seen()
    counts = np.bincount([row[0] for batch in batches for row in rows_of(batch)], minlength=3)
    n = counts.sum()
    for count, p in zip(counts, np.asarray(weights) / sum(weights)):
        # Independent draws would land within 4 standard deviations of n * p with probability > 99.99%;
        # the low-discrepancy schedule does much better, to within a few rows.
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 3
    assert tokens_seen == {name: int(c) * (L - 1) for name, c in zip(["source0", "source1", "source2"], counts)}


def test_every_batch_holds_close_to_its_share_of_each_source(sources):
    weights = np.array([0.6, 0.3, 0.1])
    with mixture(sources, weights, (1, 20), seed=4, streams=2) as loader:
        for batch in take(loader, 30):
            counts = np.bincount([row[0] for row in rows_of(batch)], minlength=3)
            assert np.all(np.abs(counts - 20 * weights) <= 2), counts


def test_the_schedule_is_a_function_of_the_seed_and_the_slot():
    schedule = MixtureSchedule([2.0, 1.0], seed=7)
    whole = schedule.sources(0, 1000)
    assert np.array_equal(np.concatenate([schedule.sources(0, 400), schedule.sources(400, 600)]), whole)
    assert np.array_equal(MixtureSchedule([2.0, 1.0], seed=7).sources(0, 1000), whole)
    assert not np.array_equal(MixtureSchedule([2.0, 1.0], seed=8).sources(0, 1000), whole)
    # Weights are proportions: scaling them changes nothing. Far slots keep the proportions.
    assert np.array_equal(MixtureSchedule([20.0, 10.0], seed=7).sources(0, 1000), whole)
    far = schedule.sources(10**15, 3000)
    assert abs(np.count_nonzero(far == 0) - 2000) <= 3


def test_batches_are_deterministic_per_seed(sources):
    def read(seed):
        with mixture(sources, [1, 1, 1], seed=seed, streams=2) as loader:
            return [rows_of(b) for b in take(loader, 6)]

    assert read(3) == read(3)
    assert read(3) != read(4)


def test_a_small_source_loops_over_whole_epochs(sources):
    with mixture(sources[1:], [1, 4], (1, 5), seed=2) as loader:
        small = [row for batch in take(loader, 20) for row in rows_of(batch) if row[0] == 2]
    assert len(small) >= 15
    for epoch in range(len(small) // 5):
        assert sorted(small[5 * epoch : 5 * epoch + 5]) == [(2, 0, r) for r in range(5)]


@pytest.mark.parametrize("consumed", [1, 3, 7, 12])  # the 5-record source has looped by batch 3
def test_a_restored_state_continues_exactly(sources, consumed):
    options = dict(seed=5, streams=2, prefetch=3)
    with mixture(sources, [2, 1, 1], **options) as loader:
        take(loader, consumed)
        state = loader.state()
        expected = take(loader, 6)
        counts_after = loader.tokens_seen()
    saved = loader_state_from_dict(state.to_dict())
    assert saved == state
    with mixture(sources, [2, 1, 1], state=saved, **options) as restored:
        assert [rows_of(b) for b in take(restored, 6)] == [rows_of(b) for b in expected]
        assert restored.tokens_seen() == counts_after


def test_state_counts_returned_batches_not_prefetched_ones(sources):
    with mixture(sources, [1, 1, 1], (1, 3), prefetch=8) as loader:
        assert loader.state().rows == 0
        take(loader, 2)
        state = loader.state()
    assert state.rows == 6
    assert sum(s.rows for s in state.sources.values()) == 6


def read_rows(indexes, streams, stream_range, rows, n_batches, state=None):
    with mixture(indexes, [3, 2, 1], (2, rows), seed=6, streams=streams, stream_range=stream_range,
                 state=state) as loader:
        return [b.tokens for b in take(loader, n_batches)], loader.state()


@pytest.mark.parametrize("streams", [2, 4])
def test_the_global_batch_does_not_depend_on_how_streams_are_split(sources, streams):
    whole, _ = read_rows(sources, streams, None, 8, 8)
    per_process = [read_rows(sources, streams, (p * streams // 2, (p + 1) * streams // 2), 4, 8)[0]
                   for p in range(2)]
    for step, batch in enumerate(whole):
        # Process p holds rows [p * 4, (p + 1) * 4) of every micro-batch.
        np.testing.assert_array_equal(batch, np.concatenate([per_process[0][step], per_process[1][step]], axis=1))


def merged(states, streams_of_process):
    """What the training run gathers before saving: every source's positions of each process's own streams."""
    keys = states[0].sources.keys()
    assert all(s.rows == states[0].rows and s.sources.keys() == keys for s in states)
    sources = {}
    for key in keys:
        positions = [None] * sum(len(r) for r in streams_of_process)
        for state, own in zip(states, streams_of_process):
            for stream in own:
                positions[stream] = state.sources[key].position.streams[stream]
        sources[key] = SourceState(states[0].sources[key].rows, LoaderState(tuple(positions)))
    return MixtureState(states[0].rows, sources)


def test_a_state_saved_by_two_processes_restores_in_one(sources):
    states = [read_rows(sources, 2, (p, p + 1), 4, 5)[1] for p in range(2)]
    state = merged(states, [range(0, 1), range(1, 2)])
    expected, _ = read_rows(sources, 2, None, 8, 9)
    resumed, _ = read_rows(sources, 2, None, 8, 4, state=state)
    for a, e in zip(resumed, expected[5:], strict=True):
        np.testing.assert_array_equal(a, e)


def test_sources_of_another_sequence_length_fail_when_the_loader_is_made(sources, tmp_path):
    longer = make_source(tmp_path / ".", 3, [4], length=L + 2)
    with pytest.raises(TFRecordError) as error:
        mixture([sources[0], longer], [1, 1])
    message = str(error.value)
    assert "s3_0.tfrecords" in message and f"has {L + 2} tokens, expected {L}" in message and "\n" not in message


def test_a_single_index_state_starts_the_mixture_afresh_with_a_warning(sources, caplog):
    with caplog.at_level(logging.WARNING):
        with mixture(sources, [1, 1, 1], state=LoaderState((StreamPosition(epoch=3),))) as loader:
            assert loader.state() == MixtureState(0, {key: SourceState(0, LoaderState((StreamPosition(),)))
                                                      for key in sources})
    assert "single train_set index file" in caplog.text


def test_changed_sources_keep_the_rest_and_start_new_ones(sources, caplog):
    with mixture(sources[:2], [1, 1], seed=1) as loader:
        take(loader, 3)
        state = loader.state()
    with caplog.at_level(logging.WARNING):
        with mixture(sources[1:], [1, 1], seed=1, state=state) as loader:
            resumed = loader.state()
    assert resumed.rows == state.rows
    assert resumed.sources[sources[1]] == state.sources[sources[1]]
    assert resumed.sources[sources[2]] == SourceState(0, LoaderState((StreamPosition(),)))
    assert "no longer lists" in caplog.text and "new to the saved mixture" in caplog.text


def test_mixture_state_from_dict_rejects_garbage():
    with pytest.raises(ValueError, match="invalid mixture loader state"):
        loader_state_from_dict({"sources": {"a.index": {"streams": []}}})
    with pytest.raises(ValueError, match="invalid loader state"):
        loader_state_from_dict({"rows": 3})


def test_source_names_come_from_the_index_file_names():
    assert source_names(["data/pile.index", "gs://bucket/sets/code.index", "a b.idx"]) == ["pile", "code", "a_b.idx"]
    assert source_names(["x/train.index", "y/train.index"]) == ["x_train", "y_train"]


def test_a_plain_train_set_reads_exactly_as_the_single_index_loader(sources):
    options = dict(seed=2, streams=2, stream_range=(1, 2))
    with TFRecordLoader(sources[0], L, (2, 2), **options) as plain:
        expected = [rows_of(b) for b in take(plain, 5)]
        expected_state = plain.state()
    with train_loader(sources[0], L, (2, 2), **options) as loader:
        assert isinstance(loader, TFRecordLoader)
        assert [rows_of(b) for b in take(loader, 5)] == expected
        assert loader.state() == expected_state
        assert loader_state_from_dict(loader.state().to_dict()) == expected_state


def test_a_plain_train_set_that_was_a_mixture_source_continues_from_its_position(sources):
    with train_loader(dict.fromkeys(sources, 1.0), L, (1, 2), seed=3) as loader:
        take(loader, 4)
        state = loader.state()
    with train_loader(sources[1], L, (1, 2), seed=3, state=state) as loader:
        assert loader.state() == state.sources[sources[1]].position


BASE = dict(layers=1, d_model=8, n_heads=2, n_vocab=16, seq=8, lr=1e-3)


def test_train_set_may_map_index_files_to_weights():
    config = parse_config({**BASE, "train_set": {"pile.index": 9, "gs://b/code.index": 1.0}})
    assert config.run.train_set == {"pile.index": 9.0, "gs://b/code.index": 1.0}
    assert parse_config({**BASE, "train_set": "pile.index"}).run.train_set == "pile.index"


@pytest.mark.parametrize("train_set, message", [
    ({}, "'train_set' is an empty object"),
    ({"a.index": 0}, "gives 'a.index' the weight 0.0; weights must be positive finite"),
    ({"a.index": -1}, "gives 'a.index' the weight -1.0"),
    ({"a.index": float("inf")}, "the weight inf"),
    ({"a.index": float("nan")}, "the weight nan"),
    ({" ": 1}, "empty index file name"),
    ({"a.index": "0.5"}, "'train_set' must be a string or an object mapping names to numbers"),
    ({"a.index": True}, "'train_set' must be a string or an object mapping names to numbers"),
    (["a.index"], "'train_set' must be a string or an object mapping names to numbers"),
])
def test_train_set_mapping_errors_name_the_key(train_set, message):
    with pytest.raises(ConfigError, match="^x.json: config key") as error:
        parse_config({**BASE, "train_set": train_set}, source="x.json")
    assert message in str(error.value) and "\n" not in str(error.value)
