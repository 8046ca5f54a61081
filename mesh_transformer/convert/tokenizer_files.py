"""The tokenizer files that travel with converted weights: written next to an export, copied out of an import.

Files are copied byte for byte where they exist, so nothing is re-serialised; a tokenizer that exists
only as a ``tokenizer.json`` or a hub name is saved the way ``AutoTokenizer`` loads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from mesh_transformer import storage

log = logging.getLogger(__name__)

# Files a transformers tokenizer may consist of; copied byte for byte so nothing is re-serialised.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "chat_template.jinja")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")


def has_tokenizer_files(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_VOCAB_FILES)


def present_tokenizer_files(directory: str) -> list[str]:
    """The names of ``TOKENIZER_FILES`` that ``directory`` has (links included, dangling or not)."""
    return [f for f in TOKENIZER_FILES if os.path.lexists(os.path.join(directory, f))]


def copy_tokenizer_files(source_dir: str, destination: str) -> str | None:
    """Copy the source's tokenizer files byte for byte; the destination, or None if there are none."""
    if not has_tokenizer_files(source_dir):
        return None
    os.makedirs(destination, exist_ok=True)
    for name in present_tokenizer_files(source_dir):
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(destination, name))
    return destination


def load_tokenizer_or_none(spec: str):
    """The run's tokenizer, or None (with a warning saying what is skipped) when it cannot be loaded."""
    from mesh_transformer.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec)
    except Exception as e:  # the export itself does not need the tokenizer; say what is skipped
        log.warning("could not load tokenizer %r (%s): bos/eos ids fall back to defaults and no tokenizer "
                    "files are written", spec, e)
        return None


def save_tokenizer_files(spec: str, tokenizer, output_dir: str) -> bool:
    """Write the tokenizer next to the weights when it can be saved; True if written.

    A local directory is copied byte for byte; a bare tokenizer.json is wrapped so AutoTokenizer can
    load it; a hub name is loaded afresh and saved. Files go through a local staging directory so the
    output may also be a URL.
    """
    if spec == "bytes":
        log.info("tokenizer is 'bytes' (our byte-level vocabulary): it has no Hugging Face form, so no "
                 "tokenizer files are written; encode text as UTF-8 bytes with id 256 as end-of-text")
        return False
    if tokenizer is None:
        return False
    with tempfile.TemporaryDirectory() as staging:
        if os.path.isdir(spec):
            if copy_tokenizer_files(spec, staging) is None:
                log.warning("tokenizer directory %s has no tokenizer files to copy", spec)
                return False
        elif getattr(tokenizer, "backend", None) is not None and not hasattr(tokenizer.backend, "save_pretrained"):
            _wrap_tokenizer_json(tokenizer).save_pretrained(staging)
        else:
            from transformers import AutoTokenizer

            # A fresh load: the training-side tokenizer has its length limit lifted, which should not be saved.
            AutoTokenizer.from_pretrained(spec).save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            with open(os.path.join(staging, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(output_dir, name), f.read())
    return True


def _wrap_tokenizer_json(tokenizer):
    from transformers import PreTrainedTokenizerFast

    eos = tokenizer.backend.id_to_token(tokenizer.eos_token_id)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=eos, bos_token=eos)
