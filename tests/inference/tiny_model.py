"""A tiny model, a tokenizer with vocabulary padding, full-forward references and a tiny checkpoint,
shared by the inference and serving tests."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.config import ModelConfig
from mesh_transformer.inference.engine import Generator
from mesh_transformer.models.transformer import Transformer
from mesh_transformer.tokenizer import ByteTokenizer, TokenizersTokenizer

CFG = ModelConfig(layers=2, d_model=32, n_heads=4, n_vocab=40, seq=32, pe_rotary_dims=4)


@dataclass(frozen=True)
class PieceTokenizer:
    """Id i decodes to PIECES[i]; id 32 is end-of-text; ids 33-39 of the model are vocabulary padding."""

    PIECES = tuple("abcdefghijklmnopqrstuvwxyz") + (" ", "ab", "cd", "xyz", "hello", " world")
    name: str = "pieces"
    eos_token_id: int = 32
    vocab_size: int = 33

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            best = max((p for p in self.PIECES if text.startswith(p, i)), key=len)
            ids.append(self.PIECES.index(best))
            i += len(best)
        return ids

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join("<eos>" if i == self.eos_token_id else self.PIECES[i] for i in ids)


TOKENIZER = PieceTokenizer()
EOT = "<|endoftext|>"


def byte_level_bpe(texts: list[str], vocab_size: int) -> TokenizersTokenizer:
    """GPT-2's scheme trained on ``texts``: 256 byte tokens, then merges (some inside multi-byte characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return TokenizersTokenizer("bpe", backend.token_to_id(EOT), backend.get_vocab_size(), backend)


def init_params(cfg: ModelConfig = CFG, seed: int = 0):
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])


@functools.partial(jax.jit, static_argnums=0)
def _forward_without_cache(cfg: ModelConfig, params, tokens):
    return Transformer(cfg).apply({"params": params}, tokens)


def full_logits(cfg: ModelConfig, params, tokens: list[int]) -> np.ndarray:
    """Next-token logits after ``tokens`` from one full forward pass (padded to seq: causal, so harmless)."""
    padded = np.zeros((1, cfg.seq), np.int32)
    padded[0, :len(tokens)] = tokens
    return np.asarray(_forward_without_cache(cfg, params, padded)[0, len(tokens) - 1])


def log_softmax_real(logits: np.ndarray, real_vocab: int) -> np.ndarray:
    real = logits[:real_vocab].astype(np.float64)
    return real - np.log(np.exp(real - real.max()).sum()) - real.max()


def greedy_reference(params, prompt: list[int], steps: int, real_vocab: int = TOKENIZER.vocab_size) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(full_logits(CFG, params, tokens)[:real_vocab])))
    return tokens[len(prompt):]


def generator(params=None, **kwargs) -> Generator:
    return Generator(CFG, init_params() if params is None else params, TOKENIZER, **kwargs)


def write_checkpoint(root: Path, suppress_eos: bool = False, **overrides) -> Path:
    """A tiny random GPT-J checkpoint with the byte tokenizer and its config; returns the config path.

    Its output layer is scaled up so that greedy choices are clear-cut rather than float-rounding
    ties (random init gives nearly uniform next-token distributions). ``suppress_eos`` gives the
    end-of-text token a large negative output bias, so generation runs to its length limit."""
    from mesh_transformer.models.registry import load_config
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.checkpoints.store import Checkpointer
    from mesh_transformer.training.steps import Trainer

    raw = dict(layers=2, d_model=32, n_heads=4, n_vocab=264, seq=64, pe_rotary_dims=4, tokenizer="bytes", lr=1e-3,
               model_dir=str(root / "run"), mesh={"dp": 1, "fsdp": 1, "mp": 1}, name="tiny-test")
    raw.update(overrides)
    path = root / "config.json"
    path.write_text(json.dumps(raw))
    config = load_config(str(path))
    state = Trainer(config, make_mesh(config, jax.devices()[:1])).init_state(0)
    head = dict(state.params["lm_head"])
    head["kernel"] = head["kernel"] * 20
    if suppress_eos:
        head["bias"] = head["bias"].at[ByteTokenizer().eos_token_id].set(-1e4)
    state = state.replace(params=dict(state.params, lm_head=head))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        checkpoints.save(0, state, {})
    return path
