"""Tokenizers behind one small interface: a byte-level vocabulary, a tokenizer.json, or transformers.

``load_tokenizer`` accepts:

* ``"bytes"``: ids 0-255 are the UTF-8 bytes, 256 is end-of-text (works offline, needs no files);
* a path or URL of a ``tokenizer.json`` file (the ``tokenizers`` library's format);
* a local directory or a Hugging Face hub name, loaded with ``transformers.AutoTokenizer``.

Special tokens are never added by ``encode``: documents are delimited by explicit EOS ids, as in the
original GPT-2 data pipeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mesh_transformer import storage

EOT_TEXT = "<|endoftext|>"
BYTES_SPEC = "bytes"
_TOKENIZER_CONFIG = "tokenizer_config.json"


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded or lacks what we need (an EOS token)."""


class Tokenizer(Protocol):
    name: str
    eos_token_id: int
    vocab_size: int  # number of real token ids, added tokens included

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as token ids, plus one end-of-text id."""

    name: str = BYTES_SPEC
    eos_token_id: int = 256
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        pieces, pending = [], bytearray()
        for token in ids:
            if token == self.eos_token_id:
                pieces.append(pending.decode("utf-8", errors="replace") + EOT_TEXT)
                pending = bytearray()
            elif 0 <= token < 256:
                pending.append(token)
            else:
                raise ValueError(f"token id {token} is outside the byte vocabulary [0, {self.vocab_size})")
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)


@dataclass(frozen=True)
class TokenizersTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a tokenizer.json file."""

    name: str
    eos_token_id: int
    vocab_size: int
    backend: Any  # tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


@dataclass(frozen=True)
class TransformersTokenizer:
    """A tokenizer loaded with ``transformers.AutoTokenizer``."""

    name: str
    eos_token_id: int
    vocab_size: int
    backend: Any  # transformers.PreTrainedTokenizerBase

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.backend(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))


def _configured_eos(tokenizer_json_url: str) -> str | None:
    """The eos_token of a tokenizer_config.json next to a tokenizer.json, if there is one."""
    config_url = storage.join(storage.dirname(tokenizer_json_url), _TOKENIZER_CONFIG)
    if not storage.exists(config_url):
        return None
    eos = json.loads(storage.read_text(config_url)).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _load_tokenizer_json(url: str) -> TokenizersTokenizer:
    from tokenizers import Tokenizer as BackendTokenizer

    try:
        backend = BackendTokenizer.from_str(storage.read_text(url))
    except Exception as e:  # the Rust parser raises plain Exceptions
        raise TokenizerError(f"{url}: not a valid tokenizer.json file: {e}") from None
    candidates = [token for token in (_configured_eos(url), EOT_TEXT) if token]
    for token in candidates:
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return TokenizersTokenizer(url, token_id, backend.get_vocab_size(with_added_tokens=True), backend)
    raise TokenizerError(
        f"{url}: no end-of-text token; looked for {', '.join(map(repr, candidates))} (set eos_token "
        f"in a {_TOKENIZER_CONFIG} next to it, or add {EOT_TEXT!r} to the vocabulary)"
    )


def _transformers_eos(backend: Any, spec: str) -> int:
    if backend.eos_token_id is not None:
        return int(backend.eos_token_id)
    if EOT_TEXT in backend.get_vocab():
        return int(backend.convert_tokens_to_ids(EOT_TEXT))
    raise TokenizerError(f"tokenizer {spec!r} has no eos_token and no {EOT_TEXT!r} token")


def _load_transformers(spec: str) -> TransformersTokenizer:
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"cannot load tokenizer {spec!r}: it is not 'bytes', not an existing tokenizer.json or "
            f"directory, and transformers could not load it as a hub name ({e})"
        ) from None
    # Whole documents are tokenized and then chunked, so "longer than the model's maximum" warnings
    # would be misleading.
    backend.model_max_length = int(1e30)
    return TransformersTokenizer(spec, _transformers_eos(backend, spec), len(backend), backend)


def _looks_like_path(spec: str) -> bool:
    return "://" in spec or spec.startswith((".", "/", "~")) or spec.endswith(".json")


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by ``spec``: "bytes", a tokenizer.json, a directory or a hub name."""
    if spec == BYTES_SPEC:
        return ByteTokenizer()
    if os.path.isdir(spec):
        return _load_transformers(spec)
    if storage.exists(spec):
        return _load_tokenizer_json(spec)
    if _looks_like_path(spec):
        raise TokenizerError(f"tokenizer file or directory {spec!r} not found")
    return _load_transformers(spec)
