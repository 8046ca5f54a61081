"""Which token ends a packed document when a run keeps documents apart (reset_attention_at_eos)."""

import pytest

from mesh_transformer.config import ConfigError
from mesh_transformer.training.run import document_eos, load_run_tokenizer
from tests.helpers import tiny_config


def eos_of(config):
    return document_eos(config, load_run_tokenizer(config))


def test_documents_are_packed_together_unless_asked():
    assert eos_of(tiny_config()) is None


def test_the_eos_comes_from_the_key_or_else_from_the_tokenizer():
    assert eos_of(tiny_config(reset_attention_at_eos=True, eos_token_id=3)) == 3
    assert eos_of(tiny_config(reset_attention_at_eos=True, n_vocab=512)) == 256  # the byte tokenizer's EOS


def test_a_tokenizer_eos_outside_the_vocabulary_is_a_one_line_error():
    with pytest.raises(ConfigError, match="n_vocab"):
        eos_of(tiny_config(reset_attention_at_eos=True))  # bytes: EOS 256, n_vocab 64


@pytest.mark.parametrize("spec", ["/no/such/tokenizer.json", "./no-such-folder", "no-such-org/no-such-model"])
def test_a_tokenizer_that_cannot_load_is_one_line_naming_the_key(spec):
    """Also with eos_token_id set, and for a hub name (the tests run offline: HF_HUB_OFFLINE)."""
    with pytest.raises(ConfigError) as error:
        load_run_tokenizer(tiny_config(tokenizer=spec, reset_attention_at_eos=True, eos_token_id=3))
    message = str(error.value)
    assert message.startswith(f"tiny-test-config: config key 'tokenizer' is {spec!r}, which cannot be loaded: ")
    assert "\n" not in message
