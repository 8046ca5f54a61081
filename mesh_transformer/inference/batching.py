"""Continuous batching: sequences join and leave one running batch between decode calls, and its KV
cache grows and shrinks with the load."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mesh_transformer.inference.sampler import (Choice, Controls, advance_counters, host_controls, set_controls,
                                                upload_controls)
from mesh_transformer.inference.shapes import MIN_CACHE_LENGTH, MIN_PROMPT_BUCKET, bucket_size, bucket_sizes
from mesh_transformer.inference.text import PromptTooLong, SamplingParams, SequenceState, TokenLogprob
from mesh_transformer.models.layers import LayerCache
from mesh_transformer.sharding import fetch_to_host

log = logging.getLogger(__name__)

Cache = tuple[LayerCache, ...]
SEQUENCE_FAILED = "internal error while generating this completion; see the server log"


class DecodeModel(Protocol):
    """What a batch runs on: ``engine.Generator``'s steps (a protocol, as the engine builds batches)."""

    def prefill(self, tokens, lengths, controls: Controls) -> tuple[Cache, Choice]: ...

    def decode(self, cache: Cache, tokens, positions, controls: Controls, steps: int) -> tuple[Cache, Choice]: ...

    def new_cache(self, batch: int, length: int) -> Cache: ...

    def cache_sharding(self, batch: int) -> NamedSharding: ...

    def sequence(self, prompt: Sequence[int], params: SamplingParams) -> SequenceState: ...

    def compile_new_cache(self, batch: int, length: int) -> Cache: ...

    def compile_prefill(self, group: int, width: int) -> Cache: ...

    def compile_decode(self, cache: Cache, steps: int) -> None: ...


@functools.partial(jax.jit, donate_argnums=(0,))
def insert_rows(cache: Cache, fresh: Cache, rows: jax.Array):
    """Copy a prefill's keys/values into cache ``rows`` (a row past the end is dropped: padding).

    Separate from the prefill so that the expensive prefill compiles per prompt shape only, and this
    cheap copy per cache shape."""
    width = fresh[0].keys.shape[2]
    return tuple(LayerCache(c.keys.at[rows, :, :width].set(f.keys, mode="drop"),
                            c.values.at[rows, :, :width].set(f.values, mode="drop"))
                 for c, f in zip(cache, fresh))


@functools.partial(jax.jit, static_argnums=(2, 3))
def resize_cache(cache: Cache, order: jax.Array, length: int, sharding: NamedSharding):
    """The cache rows ``order`` (an index past the end gives zeros), cut or zero-padded to ``length``."""

    def resized(array: jax.Array) -> jax.Array:
        picked = jnp.take(array, order, axis=0, mode="fill", fill_value=0)[:, :, :length]
        padding = [(0, 0), (0, 0), (0, length - picked.shape[2]), (0, 0)]
        return jax.lax.with_sharding_constraint(jnp.pad(picked, padding), sharding)

    return tuple(LayerCache(resized(c.keys), resized(c.values)) for c in cache)


class DecodeBatch:
    """Up to ``capacity`` sequences decoded together; they join and leave between decode calls.

    The KV cache holds ``rows`` sequences of ``length`` positions, and both follow the load: rows in
    powers of 4 of the sequences present (at small batches a step costs about the same whatever the
    rows: reading the weights dominates), length in powers of 2 of the furthest position the next
    call reaches, up to ``max_length``. Growing pads the cache; when the need falls to a quarter,
    the cache shrinks and the sequences move to the first rows. Host-side arrays hold each row's
    next input token, its position and its sampling settings; a free row sits at position
    ``length``, so its cache writes fall off the end and are dropped. The settings are uploaded to
    the devices only when sequences join or rows move (a resize); otherwise decode calls reuse them,
    each row's token counter advanced on the devices (a free row's settings are never read back).
    ``step`` runs
    ``steps_per_call`` decode steps per device call; a sequence that finishes within a call has its
    later tokens ignored. An error in one sequence's host-side work (its settings, its text) ends
    that sequence alone (``SequenceState.fail``); the others go on.
    """

    def __init__(self, generator: DecodeModel, capacity: int, max_length: int, steps_per_call: int = 1) -> None:
        self.gen = generator
        self.capacity, self.max_length, self.steps_per_call = capacity, max_length, steps_per_call
        self.rows = self.length = 0
        self.cache: Cache | None = None
        self.slots: list[SequenceState | None] = []
        self.next_token = np.zeros(0, np.int32)
        self.position = np.zeros(0, np.int32)
        self.controls = host_controls(0)
        self._uploaded: Controls | None = None  # ``controls`` on the devices, until the rows change

    @property
    def active(self) -> list[SequenceState]:
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.active)

    def add(self, sequences: list[SequenceState]) -> list[tuple[SequenceState, str]]:
        """Prefill ``sequences`` into free rows and choose their first tokens; returns (sequence, new text)."""
        if len(sequences) > self.free_slots:
            raise ValueError(f"{len(sequences)} sequences joining but only {self.free_slots} free slots")
        if any(len(s.prompt) + s.limit > self.max_length for s in sequences):
            raise PromptTooLong(f"a sequence does not fit the batch's context of {self.max_length} positions")
        width = bucket_size(max(len(s.prompt) for s in sequences), MIN_PROMPT_BUCKET, self.max_length)
        reach = [width] + [len(s.prompt) + self.steps_per_call for s in sequences] + self._reach()
        self._fit(len(self.active) + len(sequences), max(reach))
        free = [i for i, s in enumerate(self.slots) if s is None]
        group = bucket_size(len(sequences), 1, self.capacity, base=4)
        tokens = np.zeros((group, width), np.int32)
        lengths = np.ones(group, np.int32)
        targets = np.full(group, self.rows, np.int32)  # padding rows write nowhere
        controls = host_controls(group)
        for row, (sequence, slot) in enumerate(zip(sequences, free)):
            _isolated(sequence, set_controls, controls, row, sequence)
            if not sequence.finished:
                tokens[row, :len(sequence.prompt)] = sequence.prompt
                lengths[row], targets[row] = len(sequence.prompt), slot
        fresh, choice = self.gen.prefill(tokens, lengths, Controls(**controls))
        self.cache = insert_rows(self.cache, fresh, targets)
        choice = fetch_to_host(choice)
        updates = []
        for row, (sequence, slot) in enumerate(zip(sequences, free)):
            if not sequence.finished:
                self.slots[slot] = sequence
                set_controls(self.controls, slot, sequence)
                self._uploaded = None
                self.position[slot] = len(sequence.prompt) - 1
                updates.append((sequence, self._record(slot, choice, row)))
            else:  # failed above: its request hears of it
                updates.append((sequence, ""))
        return updates

    def step(self) -> list[tuple[SequenceState, str]]:
        """``steps_per_call`` decode steps for every active row; returns (sequence, new text) for each."""
        if not self.active:
            return []
        self._fit(len(self.active), max(self._reach()))
        occupied = [i for i, s in enumerate(self.slots) if s is not None]
        controls = self._device_controls(occupied)
        self.cache, choices = self.gen.decode(self.cache, self.next_token, self.position, controls,
                                              self.steps_per_call)
        self._uploaded = advance_counters(controls, self.steps_per_call)
        choices = fetch_to_host(choices)
        updates = []
        for slot in occupied:
            sequence, pieces = self.slots[slot], []
            for i in range(self.steps_per_call):
                if sequence.finished:
                    break
                pieces.append(self._record(slot, jax.tree.map(lambda a, i=i: a[i], choices), slot))
            updates.append((sequence, "".join(pieces)))
        return updates

    def _device_controls(self, occupied: list[int]) -> Controls:
        """The rows' sampling settings on the devices: uploaded after sequences joined or rows moved."""
        if self._uploaded is None:
            for slot in occupied:
                self.controls["counter"][slot] = len(self.slots[slot].tokens)
            self._uploaded = upload_controls(self.controls, self.gen.cache_sharding(self.rows).mesh)
        return self._uploaded

    def _reach(self) -> list[int]:
        """For each active row, the cache length its next decode call writes up to."""
        return [int(self.position[i]) + self.steps_per_call for i, s in enumerate(self.slots) if s is not None]

    def _fit(self, sequences: int, reach: int) -> None:
        """Resize the cache if ``sequences`` rows or ``reach`` positions do not fit, or need a quarter of it."""
        rows = _resized(self.rows, bucket_size(sequences, 1, self.capacity, base=4))
        length = _resized(self.length, bucket_size(reach, MIN_CACHE_LENGTH, self.max_length))
        if (rows, length) != (self.rows, self.length):
            self._rebuild(rows, length)

    def _rebuild(self, rows: int, length: int) -> None:
        """Copy the active rows, in order, into the first rows of a cache of the new shape."""
        kept = [i for i, s in enumerate(self.slots) if s is not None]
        if self.cache is None:
            self.cache = self.gen.new_cache(rows, length)
        else:
            order = np.array(kept + [self.rows] * (rows - len(kept)), np.int32)  # past the end: zeros
            self.cache = resize_cache(self.cache, order, length, self.gen.cache_sharding(rows))
        self.slots = [self.slots[i] for i in kept] + [None] * (rows - len(kept))
        self.next_token = _moved(self.next_token, kept, rows, 0)
        self.position = _moved(self.position, kept, rows, length)
        self.controls = {name: _moved(array, kept, rows, host_controls(1)[name][0])
                         for name, array in self.controls.items()}
        self._uploaded = None
        self.rows, self.length = rows, length

    def _record(self, slot: int, choice: Choice, row: int) -> str:
        """Hand row ``row`` of ``choice`` to the sequence in ``slot`` as its next token."""
        sequence = self.slots[slot]
        token = int(choice.token[row])
        top_n = sequence.params.logprobs or 0
        top = tuple(zip(choice.top_ids[row, :top_n].tolist(), choice.top_logprobs[row, :top_n].tolist()))
        piece = _isolated(sequence, sequence.append, token, TokenLogprob(token, float(choice.logprob[row]), top))
        self.next_token[slot] = token
        self.position[slot] += 1
        if sequence.finished:
            self.release(sequence)
        return piece or ""

    def release(self, sequence: SequenceState) -> None:
        """Free the row of a finished or cancelled sequence."""
        for slot, held in enumerate(self.slots):
            if held is sequence:
                self.slots[slot] = None
                self.position[slot] = self.length

    # ----- compiling before the first request -----
    def warmup(self, every_shape: bool = False) -> None:
        """Compile the smallest prefill and the decode call of one short sequence by running it; with
        ``every_shape``, also, from shapes alone, every program this batch can run (cache allocation,
        decode call, prefill, row insertion and resize), so that no request waits for a compilation."""
        self.add([self.gen.sequence([0], SamplingParams(max_new_tokens=2, temperature=0.0))])
        self.step()
        if every_shape:
            self._compile_every_shape()
        jax.block_until_ready(self.cache)

    def _compile_every_shape(self) -> None:
        """In parallel threads (XLA compiles without holding the GIL): the cache allocations and the
        prefills, then what takes their outputs: decode calls, row insertions and resizes; and the
        advance of the sampling settings' counters."""
        with concurrent.futures.ThreadPoolExecutor() as pool:
            caches = dict(zip(self._cache_shapes(), pool.map(lambda shape: self.gen.compile_new_cache(*shape),
                                                             self._cache_shapes())))
            prefilled = dict(zip(self._prefill_shapes(), pool.map(lambda shape: self.gen.compile_prefill(*shape),
                                                                   self._prefill_shapes())))
            jobs = [functools.partial(self.gen.compile_decode, cache, self.steps_per_call) for cache in caches.values()]
            jobs += [functools.partial(_compile_insert_rows, caches[rows, length], fresh)
                     for rows, length in caches for (group, width), fresh in prefilled.items()
                     if group <= rows and width <= length]  # ``add`` fits the cache to the joining group
            jobs += [functools.partial(_compile_resize, caches[old], new, self.gen.cache_sharding(new[0]))
                     for old, new in self._resizes()]
            jobs += [functools.partial(_compile_advance_counters, rows, self.gen.cache_sharding(rows).mesh,
                                       self.steps_per_call) for rows in bucket_sizes(1, self.capacity, 4)]
            for done in concurrent.futures.as_completed([pool.submit(job) for job in jobs]):
                done.result()

    def _cache_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) the cache can take."""
        return [(rows, length) for rows in bucket_sizes(1, self.capacity, 4)
                for length in bucket_sizes(MIN_CACHE_LENGTH, self.max_length)]

    def _prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (group, width) of a prefill: joining sequences and prompt length."""
        return [(group, width) for group in bucket_sizes(1, self.capacity, 4)
                for width in bucket_sizes(MIN_PROMPT_BUCKET, self.max_length)]

    def _resizes(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Every change of cache shape ``_fit`` can make."""
        shapes = self._cache_shapes()
        return [(old, new) for old in shapes for new in shapes
                if new != old and all(_resized(o, n) == n for o, n in zip(old, new))]


def _compile_insert_rows(cache: Cache, fresh: Cache) -> None:
    insert_rows.lower(cache, fresh, np.zeros(fresh[0].keys.shape[0], np.int32)).compile()


def _compile_resize(cache: Cache, shape: tuple[int, int], sharding: NamedSharding) -> None:
    rows, length = shape
    resize_cache.lower(cache, np.zeros(rows, np.int32), length, sharding).compile()


def _compile_advance_counters(rows: int, mesh: Mesh, steps: int) -> None:
    advance_counters.lower(upload_controls(host_controls(rows), mesh), steps).compile()


def _isolated(sequence: SequenceState, work, *args):
    """``work(*args)``, host-side work for one sequence; an error fails that sequence only (and is
    logged) and gives None."""
    try:
        return work(*args)
    except Exception:  # the isolation boundary: whatever went wrong, the batch's other sequences go on
        log.exception("a sequence failed (prompt of %d tokens, %d generated); ending it alone",
                      len(sequence.prompt), len(sequence.tokens))
        sequence.fail(SEQUENCE_FAILED)
        return None


def _resized(current: int, target: int) -> int:
    """Grow to the target at once; shrink only when the target is a quarter of the size or less."""
    return target if target > current or target * 4 <= current else current


def _moved(array: np.ndarray, kept: list[int], rows: int, fill) -> np.ndarray:
    """``array``'s entries for rows ``kept`` moved to the front of ``rows`` rows, the rest ``fill``."""
    moved = np.full((rows, *array.shape[1:]), fill, array.dtype)
    moved[:len(kept)] = array[kept]
    return moved
