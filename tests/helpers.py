"""Small shared builders for tests: tiny configs, learnable token streams, checkpoints made old."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mesh_transformer.checkpoints.store import INTEGRITY_KEY, VERSION_KEY
from mesh_transformer.config import Config
from mesh_transformer.models.registry import parse_config

REPO = Path(__file__).resolve().parents[1]  # the checkout, for commands run as subprocesses
TINY_MODEL = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16, pe_rotary_dims=4)


def tiny_config(**overrides: Any) -> Config:
    raw = dict(TINY_MODEL, lr=1e-3, warmup_steps=2, anneal_steps=20, end_lr=1e-4, weight_decay=0.1,
               per_replica_batch=2, total_steps=20, tokenizer="bytes")
    raw.update(overrides)
    return parse_config(raw, source="tiny-test-config")


def random_batch(seed: int, microbatches: int, batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.RandomState(seed).randint(0, vocab, (microbatches, batch, seq + 1)).astype(np.int32)
    return tokens, np.ones(tokens.shape, np.float32)


def counting_batch(seed: int, batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences that count upward mod vocab from a random start: trivially learnable."""
    starts = np.random.RandomState(seed).randint(0, vocab, (1, batch, 1))
    tokens = ((starts + np.arange(seq + 1)) % vocab).astype(np.int32)
    return tokens, np.ones(tokens.shape, np.float32)


def strip_checksums(step_dir: Path) -> None:
    """Make a checkpoint look like one written before checksums were recorded: no checksums, and no
    format version either (versions before checksums wrote none)."""
    path = step_dir / "metadata" / "metadata"
    metadata = json.loads(path.read_text())
    del metadata[INTEGRITY_KEY], metadata[VERSION_KEY]
    path.write_text(json.dumps(metadata))


def strict_json(line: str) -> dict:
    """``json.loads`` refusing the bare NaN and Infinity that JSON does not have."""
    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=reject)
