"""load_tokenizer: the byte vocabulary, tokenizer.json files and transformers folders (no downloads)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mesh_transformer.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer"] * 20
SAMPLE = "hello quick world"


def train_bpe(special_tokens):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(["<|endoftext|>"])


def test_byte_tokenizer():
    tokenizer = load_tokenizer("bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.eos_token_id, tokenizer.vocab_size, tokenizer.name) == (256, 257, "bytes")
    assert tokenizer.encode("hé") == [104, 0xC3, 0xA9]
    assert tokenizer.decode([*tokenizer.encode("hé"), 256, 105]) == "hé<|endoftext|>i"
    assert tokenizer.decode([0xC3]) == "\ufffd"
    assert tokenizer.encode_batch(["a", "b"]) == [[97], [98]]
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tokenizer.decode([300])


def test_tokenizer_json_file(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.eos_token_id == bpe.token_to_id("<|endoftext|>")
    assert tokenizer.vocab_size == bpe.get_vocab_size(with_added_tokens=True)
    ids = tokenizer.encode(SAMPLE)
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.encode_batch([SAMPLE, "dog"]) == [ids, tokenizer.encode("dog")]


def test_transformers_folder_matches_tokenizer_json(tmp_path, bpe):
    from transformers import PreTrainedTokenizerFast

    bpe.save(str(tmp_path / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(str(tmp_path / "hf"))
    from_folder = load_tokenizer(str(tmp_path / "hf"))
    from_json = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert from_folder.encode(SAMPLE) == from_json.encode(SAMPLE)
    assert from_folder.encode_batch([SAMPLE]) == [from_json.encode(SAMPLE)]
    assert from_folder.decode(from_folder.encode(SAMPLE)) == SAMPLE
    assert (from_folder.eos_token_id, from_folder.vocab_size) == (from_json.eos_token_id, from_json.vocab_size)


def test_transformers_folder_without_eos_falls_back_to_endoftext(tmp_path, bpe):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(tmp_path / "hf"))
    assert load_tokenizer(str(tmp_path / "hf")).eos_token_id == bpe.token_to_id("<|endoftext|>")


def test_eos_from_tokenizer_config_next_to_tokenizer_json(tmp_path):
    train_bpe(["</s>"]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).eos_token_id == 0


def test_tokenizer_without_eos_is_an_error(tmp_path):
    train_bpe([]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_missing_paths_and_invalid_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path / "broken.json"))
