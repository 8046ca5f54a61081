"""Continuous batching: the KV cache follows the load without changing results, a warmed-up batch
compiles nothing more, whatever joins and leaves, and sampling settings stay on the devices."""

import contextlib
import dataclasses

import jax
import numpy as np

from mesh_transformer.inference import batching
from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.sampler import upload_controls
from mesh_transformer.inference.text import SamplingParams, SequenceState
from tests.inference.tiny_model import CFG, TOKENIZER, full_logits, init_params


def test_the_cache_follows_the_load_without_changing_results():
    """Rows and length of the KV cache grow and shrink as sequences join and finish."""
    cfg = dataclasses.replace(CFG, seq=160)
    params = init_params(cfg, seed=4)
    gen = Generator(cfg, params, TOKENIZER)
    batch = gen.batch(capacity=16, steps_per_call=4)
    rng = np.random.RandomState(5)
    sequences = [gen.sequence(list(rng.randint(0, 33, 3 + i)), SamplingParams(max_new_tokens=4 + 12 * i,
                                                                               temperature=0.0, stop_at_eos=False))
                 for i in range(9)]
    batch.add(sequences[:6])
    shapes, waiting = [(batch.rows, batch.length)], sequences[6:]
    while batch.active:
        batch.step()
        if waiting and len(batch.active) <= 4:
            batch.add(waiting)  # these join while the others are finishing
            waiting = []
        shapes.append((batch.rows, batch.length))
    assert {16, 4, 1} <= {rows for rows, _ in shapes}
    assert {64, 128} <= {length for _, length in shapes}
    for sequence in sequences:
        tokens = list(sequence.prompt)
        for _ in range(sequence.limit):
            tokens.append(int(np.argmax(full_logits(cfg, params, tokens)[:TOKENIZER.vocab_size])))
        assert sequence.tokens == tokens[len(sequence.prompt):]


@contextlib.contextmanager
def counting_compilations():
    """Yields a list that counts the XLA compilations made until the block ends."""
    compilations = []

    def on_event(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compilations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield compilations
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


def test_after_warmup_of_every_shape_no_request_waits_for_a_compilation():
    cfg = dataclasses.replace(CFG, seq=128, layers=1)  # a model of its own: nothing compiled by other tests
    gen = Generator(cfg, init_params(cfg, seed=9), TOKENIZER)
    batch = gen.batch(capacity=4, steps_per_call=2)
    batch.warmup(every_shape=True)
    rng = np.random.RandomState(6)
    sequences = [gen.sequence(list(rng.randint(0, 33, length)), SamplingParams(max_new_tokens=new, temperature=0.0,
                                                                               stop_at_eos=False))
                 for length, new in [(3, 4), (20, 90), (40, 3), (1, 2), (70, 20), (2, 60), (17, 5)]]
    joining = [sequences[:1], sequences[1:4], sequences[4:5], sequences[5:]]  # groups of 1 and 4, growing and shrinking
    shapes = set()
    with counting_compilations() as compilations:
        while joining or batch.active:
            if joining and batch.free_slots >= len(joining[0]):
                batch.add(joining.pop(0))
            batch.step()
            shapes.add((batch.rows, batch.length))
    assert compilations == []
    assert {(1, 64), (4, 64), (4, 128), (1, 128)} <= shapes


def fail_appends(monkeypatch, prompt: list[int], after_tokens: int) -> None:
    """An error injected into the host-side work of the sequences continuing ``prompt``."""
    original_append = SequenceState.append

    def append_failing_for_that_prompt(self, token, logprob):
        if self.prompt == prompt and len(self.tokens) == after_tokens:
            raise RuntimeError("injected failure")
        return original_append(self, token, logprob)

    monkeypatch.setattr(SequenceState, "append", append_failing_for_that_prompt)


def test_an_error_in_one_sequence_ends_that_sequence_only(monkeypatch):
    gen = Generator(CFG, init_params(CFG, seed=2), TOKENIZER)
    settings = SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    expected = [c.tokens for c in gen.generate(prompts, settings)]
    doomed = [9, 9, 9]
    fail_appends(monkeypatch, doomed, after_tokens=2)
    sequences = [gen.sequence(p, settings) for p in prompts[:2] + [doomed] + prompts[2:]]
    gen.run(sequences)
    failed = sequences.pop(2)
    assert failed.finish_reason == "error" and failed.error and len(failed.tokens) == 2
    assert [s.completion().tokens for s in sequences] == expected


def test_sampling_settings_are_uploaded_only_when_sequences_join(monkeypatch):
    """Decode calls between joins transfer no settings to the devices: every ``upload_controls`` is
    counted, and each decode call runs under a transfer guard once its tokens and positions are placed."""
    gen = Generator(CFG, init_params(CFG, seed=3), TOKENIZER)
    batch = gen.batch(capacity=4, steps_per_call=2)
    uploads = []
    monkeypatch.setattr(batching, "upload_controls", lambda *a: uploads.append(a) or upload_controls(*a))
    original_decode = gen.decode

    def guarded_decode(cache, tokens, positions, controls, steps):
        tokens, positions = jax.device_put((tokens, positions))
        with jax.transfer_guard_host_to_device("disallow"):
            return original_decode(cache, tokens, positions, controls, steps)

    monkeypatch.setattr(gen, "decode", guarded_decode)
    settings = SamplingParams(max_new_tokens=9, temperature=0.9, top_k=5, seed=1, stop_at_eos=False)
    short = dataclasses.replace(settings, max_new_tokens=3)
    batch.add([gen.sequence([1, 2], settings), gen.sequence([3], short), gen.sequence([6, 7], settings)])
    counts = []
    for _ in range(4):  # the short sequence leaves in the first call, the cache keeps its 4 rows: no upload
        batch.step()
        counts.append(len(uploads))
    batch.add([gen.sequence([4, 5], settings)])
    batch.step()
    batch.step()
    assert counts == [1, 1, 1, 1] and len(uploads) == 2


def test_seeded_samples_do_not_depend_on_the_decode_steps_per_call():
    """Each row's key counter advances on the devices between uploads: one step or three per call,
    and a neighbour joining midway, give the same tokens."""
    params = init_params(CFG, seed=5)
    settings = SamplingParams(max_new_tokens=10, temperature=1.0, seed=8, stop_at_eos=False)
    results = []
    for steps in (1, 3):
        gen = Generator(CFG, params, TOKENIZER, steps_per_call=steps)
        batch = gen.batch()
        first, second = gen.sequence([1, 2, 3], settings), gen.sequence([4], settings)
        batch.add([first])
        batch.step()
        batch.add([second])
        while batch.active:
            batch.step()
        results.append((first.tokens, second.tokens))
    assert results[0] == results[1]
    assert results[0][0] == gen.generate([[1, 2, 3]], settings)[0].tokens
