"""The server in-process (httpx's ASGI transport, no port): one sequence's failure ends its own request
only, streamed text equals non-streamed text token by token whatever the bytes (a byte-level BPE
tokenizer), non-ASCII API keys, and echo of a token-id prompt that ends inside a character."""

import asyncio
import dataclasses
import json
import random
import time

import httpx
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.serving import routes as server_module
from mesh_transformer.serving.app import create_app
from mesh_transformer.serving.service import ServerSettings
from mesh_transformer.tokenizer import ByteTokenizer, TokenizersTokenizer
from tests.inference.test_batching import fail_appends
from tests.inference.tiny_model import CFG, init_params

CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld, €uro 日本語 ünïcödé"] * 20


def bpe_tokenizer() -> TokenizersTokenizer:
    """Byte-level BPE: 256 byte tokens plus merges, some of them parts of multi-byte characters."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return TokenizersTokenizer("bpe", backend.token_to_id("<|endoftext|>"), backend.get_vocab_size(), backend)


def tiny_generator(tokenizer, favoured_token: int | None = None) -> Generator:
    """A random one-layer model; ``favoured_token`` gets a large output bias, so greedy picks it."""
    cfg = dataclasses.replace(CFG, layers=1, n_vocab=tokenizer.vocab_size + 7, seq=64)
    params = init_params(cfg, seed=3)
    if favoured_token is not None:
        head = dict(params["lm_head"], bias=params["lm_head"]["bias"].at[favoured_token].set(1e4))
        params = dict(params, lm_head=head)
    return Generator(cfg, params, tokenizer, max_batch=4)


class InProcessServer:
    """The app with its model loaded, and an httpx client on it; ``call`` runs a coroutine."""

    def __init__(self, generator: Generator, **settings) -> None:
        self.app = create_app(ServerSettings(model_name="tiny", max_batch=4, steps_per_call=2, **settings),
                              lambda: generator)
        self.service = self.app.state.service
        self.service.load(lambda: generator, None)
        assert self.service.load_error is None, self.service.load_error

    def client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test", timeout=120,
                                 **kwargs)

    def post_all(self, bodies: list[dict], path: str = "/v1/completions") -> list[httpx.Response]:
        async def run():
            async with self.client() as http:
                return await asyncio.gather(*(http.post(path, json=body) for body in bodies))
        return asyncio.run(run())

    def close(self) -> None:
        self.service.close()


@pytest.fixture(scope="module")
def bpe_server():
    server = InProcessServer(tiny_generator(bpe_tokenizer()))
    yield server
    server.close()


def stream_events(response: httpx.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text
    return [json.loads(line) for line in lines[:-1]]


def streamed_choice(events: list[dict]) -> dict:
    """The stream's one choice put together: text, finish reason, token strings and their offsets."""
    text, finish, tokens, offsets = "", None, [], []
    for event in events:
        for choice in event["choices"]:
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                offsets += choice["logprobs"]["text_offset"]
    return dict(text=text, finish_reason=finish, tokens=tokens, text_offset=offsets)


def whole_choice(response: httpx.Response) -> dict:
    choice = response.json()["choices"][0]
    return dict(text=choice["text"], finish_reason=choice["finish_reason"], tokens=choice["logprobs"]["tokens"],
                text_offset=choice["logprobs"]["text_offset"])


def random_requests(tokenizer, count: int) -> list[dict]:
    rng = random.Random(0)
    prompts = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 6))).decode("utf-8", "replace")
               for _ in range(count)]
    # Every third echoes its prompt, so prompt scoring (a job on the decode thread) is compared too.
    return [dict(prompt=p, max_tokens=rng.randint(1, 12), temperature=1.0, seed=rng.randrange(2**32), logprobs=0,
                 echo=i % 3 == 0) for i, p in enumerate(prompts)]


def assert_streams_equal_whole_answers(server: InProcessServer, bodies: list[dict]) -> None:
    whole = server.post_all(bodies)
    streamed = server.post_all([dict(body, stream=True) for body in bodies])
    assert any("\ufffd" in w.json()["choices"][0]["text"] for w in whole)  # the bytes were not all valid UTF-8
    for body, w, s in zip(bodies, whole, streamed):
        assert w.status_code == s.status_code == 200
        assert streamed_choice(stream_events(s)) == whole_choice(w), body


def test_streamed_text_equals_the_whole_answer_token_by_token(bpe_server):
    assert_streams_equal_whole_answers(bpe_server, random_requests(bpe_server.service.generator.tokenizer, 24))


def test_a_stream_that_starts_after_generation_ended_still_carries_the_text(bpe_server, monkeypatch):
    """A busy event loop: the decode thread finishes a short completion before its stream begins."""
    submit = server_module._submit

    def submit_then_wait_for_the_end(scheduler, sequences):
        ticket = submit(scheduler, sequences)
        deadline = time.monotonic() + 60
        while not all(s.finished for s in sequences) and time.monotonic() < deadline:
            time.sleep(0.01)
        return ticket

    monkeypatch.setattr(server_module, "_submit", submit_then_wait_for_the_end)
    assert_streams_equal_whole_answers(bpe_server, random_requests(bpe_server.service.generator.tokenizer, 6))


def test_an_error_inside_one_sequence_fails_its_request_only(bpe_server, monkeypatch):
    doomed = "DOOMED"
    fail_appends(monkeypatch, bpe_server.service.generator.encode(doomed), after_tokens=1)
    innocent = [dict(prompt=f"request {i}", max_tokens=8, temperature=0) for i in range(7)]
    doomed_body = dict(prompt=doomed, max_tokens=8, temperature=0)
    answers = bpe_server.post_all(innocent[:3] + [doomed_body, dict(doomed_body, stream=True)] + innocent[3:])
    failed, failed_stream = answers.pop(3), answers.pop(3)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    events = stream_events(failed_stream)
    assert "error" in events[-1] and not any(c["finish_reason"] for e in events[:-1] for c in e["choices"])
    expected = bpe_server.service.generator.generate([b["prompt"] for b in innocent],
                                                     SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [a.status_code for a in answers] == [200] * 7
    assert [a.json()["choices"][0]["text"] for a in answers] == [c.text for c in expected]


def test_a_non_ascii_api_key_matches():
    key = "clé-ключ-🔑"
    server = InProcessServer(tiny_generator(ByteTokenizer()), api_key=key)
    try:
        async def ask(authorization: bytes) -> int:
            async with server.client() as http:
                return (await http.get("/v1/models", headers={"Authorization": authorization})).status_code

        assert asyncio.run(ask(b"Bearer " + key.encode())) == 200
        assert asyncio.run(ask(b"Bearer " + "clé-ключ-🔒".encode())) == 401
        assert asyncio.run(ask(b"Bearer " + key.encode("utf-8")[:-1])) == 401
    finally:
        server.close()


def test_echo_of_a_token_id_prompt_ending_inside_a_character():
    tokenizer = ByteTokenizer()
    server = InProcessServer(tiny_generator(tokenizer, favoured_token=0xA9))  # the last byte of "é"
    try:
        prompt = list("hé".encode())[:-1]
        answer, = server.post_all([dict(prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=0)])
        choice = answer.json()["choices"][0]
        assert choice["text"] == "hé"
        assert choice["logprobs"]["text_offset"] == [0, 1, 1]
        streamed, = server.post_all([dict(prompt=prompt, max_tokens=1, temperature=0, echo=True, stream=True)])
        assert "".join(c["text"] for e in stream_events(streamed) for c in e["choices"]) == "hé"
    finally:
        server.close()
