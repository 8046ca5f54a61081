"""Text handling on the host: streamed text and stop strings, characters split over tokens, token
text offsets (in linear time), and the validation of sampling settings."""

from dataclasses import dataclass

import numpy as np
import pytest

from mesh_transformer.inference.text import (IncrementalDecoder, SamplingParams, SequenceFailed, SequenceState,
                                             TokenLogprob, text_offsets)
from mesh_transformer.tokenizer import ByteTokenizer, TokenizersTokenizer
from tests.inference.tiny_model import TOKENIZER, byte_level_bpe


def feed(sequence: SequenceState, tokens: list[int]) -> list[str]:
    return [sequence.append(t, TokenLogprob(t, -1.0)) for t in tokens]


def test_streamed_text_holds_back_a_possible_stop_string_and_cuts_it_when_complete():
    hello, world, space = 30, 31, 26
    sequence = SequenceState([0], SamplingParams(max_new_tokens=20, stop=("lo wo",)), TOKENIZER, context=32)
    pieces = feed(sequence, [0, hello])  # "a" "hello": "lo" may start the stop string
    assert pieces == ["a", "hel"]
    pieces += feed(sequence, [world])  # " world": the stop string is complete
    assert sequence.finish_reason == "stop" and sequence.text == "ahel"
    assert "".join(pieces) == "ahel"
    assert sequence.tokens == [0, hello]  # " world" starts inside the stop string and is dropped
    assert sequence.settled_tokens == 2
    other = SequenceState([0], SamplingParams(max_new_tokens=3, stop=("lo wo",)), TOKENIZER, context=32)
    assert "".join(feed(other, [hello, space, 1])) == "hello b" and other.finish_reason == "length"


def test_bytes_of_one_character_are_released_together():
    tokenizer = ByteTokenizer()
    sequence = SequenceState([65], SamplingParams(max_new_tokens=8), tokenizer, context=32)
    euro = list("€".encode())
    assert feed(sequence, euro + [33]) == ["", "", "€", "!"]
    assert sequence.token_offsets == [0, 0, 0, 1]


def test_text_offsets_of_a_prompt_are_those_of_the_same_tokens_generated():
    tokenizer = ByteTokenizer()
    ids = list("a€ b".encode())
    sequence = SequenceState([65], SamplingParams(max_new_tokens=len(ids), stop_at_eos=False), tokenizer, context=32)
    feed(sequence, ids)
    assert text_offsets(tokenizer, ids) == sequence.token_offsets == [0, 1, 1, 1, 2, 3]
    hello, world = 30, 31
    assert text_offsets(TOKENIZER, [hello, world, 0]) == [0, 5, 11]


def test_invalid_sampling_settings_name_the_setting():
    for bad, name in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
                      (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(logprobs=99), "logprobs"),
                      (dict(stop=("",)), "stop")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**bad)


def test_top_k_beyond_int32_is_refused_by_name():
    with pytest.raises(ValueError, match="top_k must be between 0 and 2147483647"):
        SamplingParams(top_k=2**31)


def test_new_tokens_finish_the_unfinished_last_character_of_the_prompt():
    tokenizer = ByteTokenizer()
    prompt = list("hé".encode())[:-1]  # "h" and the first byte of "é"
    sequence = SequenceState(prompt, SamplingParams(max_new_tokens=4), tokenizer, context=32)
    assert sequence.complete_prompt_tokens == 1
    assert "".join(feed(sequence, list("\xa9llo".encode("latin-1")))) == "éllo"
    assert tokenizer.decode(prompt[:sequence.complete_prompt_tokens]) + sequence.text == "héllo"
    scoring_only = SequenceState(prompt, SamplingParams(max_new_tokens=0), tokenizer, context=32)
    assert scoring_only.complete_prompt_tokens == 2  # nothing will finish the character: echo shows all of it


def test_a_failed_sequence_reports_its_error_instead_of_a_completion():
    sequence = SequenceState([0], SamplingParams(max_new_tokens=4), TOKENIZER, context=32)
    sequence.fail("boom")
    assert sequence.finished and sequence.finish_reason == "error"
    with pytest.raises(SequenceFailed, match="boom"):
        sequence.completion()


@dataclass
class CountingDecodes:
    """A tokenizer that counts the ids it is asked to decode: the work, whatever the machine's speed."""

    tokenizer: TokenizersTokenizer
    decoded_ids: int = 0

    def decode(self, ids) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids)


BPE_TEXTS = ["def main(argv):\n    return sorted(set(argv))", "héllo wörld, €uro 日本語 ünïcödé", "naïve café"] * 20


def prompt_ids(tokenizer: TokenizersTokenizer, kind: str, length: int) -> list[int]:
    if kind == "text":
        return tokenizer.encode(" ".join(BPE_TEXTS * 40))[:length]
    if kind == "random ids":
        return [int(i) for i in np.random.RandomState(length).randint(0, tokenizer.vocab_size, length)]
    lone = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd"]  # e.g. byte 0x80 alone
    return [lone[0]] * length


@pytest.mark.parametrize("kind", ["text", "random ids", "lone continuation bytes"])
def test_echo_offsets_of_a_2048_token_prompt_cost_4x_those_of_512_tokens_not_16x(kind):
    """A run of bytes that never form a character used to keep the decoding window growing."""
    bpe = byte_level_bpe(BPE_TEXTS, vocab_size=400)
    work = {}
    for length in (512, 2048):
        counting, ids = CountingDecodes(bpe), prompt_ids(bpe, kind, length)
        offsets = text_offsets(counting, ids)
        work[length] = counting.decoded_ids
        decoder = IncrementalDecoder(bpe)
        assert "".join(decoder.push(t) for t in ids) + decoder.flush() == bpe.decode(ids)
        assert len(offsets) == length and offsets == sorted(offsets)
    assert work[2048] <= 4.5 * work[512], work
