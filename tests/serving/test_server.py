"""device_serve.py in a subprocess on 127.0.0.1: the original /complete, the OpenAI API through the
official openai client (streaming included), 32 concurrent clients, malformed requests, and, on a
second server with one slot and an API key: authentication, the queue bound (429), cancellation of a
request whose client went away, and the request timeout (504)."""

import concurrent.futures
import re
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from mesh_transformer.inference.engine import load_generator
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.models.registry import load_config
from mesh_transformer.sharding import mesh_from_shape
from tests.inference.tiny_model import write_checkpoint
from tests.serving.live_server import Server

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model"), suppress_eos=True, seq=64)


@pytest.fixture(scope="module")
def server(config, tmp_path_factory):
    server = Server(config, tmp_path_factory.mktemp("log") / "server.log", "--max-batch", "4",
                    "--steps-per-call", "4", "--max-body-bytes", "65536")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(config):
    """The same checkpoint in this process, for the expected outputs."""
    generator = load_generator(load_config(str(config)), mesh=mesh_from_shape((1, 1, 1)), max_batch=4)
    generator.steps_per_call = 4

    def greedy(prompts: list[str], max_tokens: int, **settings) -> list:
        return generator.generate(prompts, SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **settings))

    return greedy


def client(server: Server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


# ----- the main server -----

def test_health_models_and_docs(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-test"
    assert [m.id for m in client(server).models.list().data] == ["tiny-test"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert "/v1/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_the_original_complete_endpoint(server, reference):
    response = httpx.post(f"{server.url}/complete", json={"context": "def main():", "top_p": 0.9, "temp": 0.0,
                                                            "length": 12}, timeout=60)
    assert response.status_code == 200
    assert response.json() == {"completion": reference(["def main():"], 12)[0].text}
    default = httpx.post(f"{server.url}/complete", json={"context": "x = ", "top_p": 0.9, "temp": 0.7}, timeout=60)
    assert default.status_code == 200 and isinstance(default.json()["completion"], str)


def test_openai_client_completions_equal_offline_generation(server, reference):
    prompts = ["import os\n", "class A:"]
    result = client(server).completions.create(model="tiny-test", prompt=prompts, max_tokens=10, temperature=0,
                                               logprobs=2)
    expected = reference(prompts, 10, logprobs=2)
    assert [c.index for c in result.choices] == [0, 1]
    for choice, completion in zip(result.choices, expected):
        assert choice.text == completion.text
        assert choice.finish_reason == ("length" if len(completion.tokens) == 10 else "stop")
        assert choice.logprobs.token_logprobs == pytest.approx([e.logprob for e in completion.logprobs], abs=1e-4)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert result.usage.prompt_tokens == len("import os\n") + len("class A:")
    assert result.usage.completion_tokens == sum(len(c.tokens) for c in expected)


def test_openai_client_streaming_gives_the_same_text(server):
    api = client(server)
    whole = api.completions.create(model="tiny-test", prompt=["for i in", "while"], max_tokens=16, temperature=0)
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in api.completions.create(model="tiny-test", prompt=["for i in", "while"], max_tokens=16, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason or finish[choice.index]
        usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_stop_echo_n_and_seed(server, reference):
    api = client(server)
    free = reference(["print("], 20)[0].text
    stop = free[5:8]
    assert len(stop) == 3, free
    stopped = api.completions.create(model="tiny-test", prompt="print(", max_tokens=20, temperature=0, stop=[stop],
                                     echo=True)
    assert stopped.choices[0].text == "print(" + free[:free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [api.completions.create(prompt="a", max_tokens=8, temperature=1.0, n=2, seed=7, model="tiny-test")
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert sampled[0].choices[0].text != sampled[0].choices[1].text
    scored = api.completions.create(model="tiny-test", prompt="abc", max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == "abc" and scored.choices[0].logprobs.token_logprobs[0] is None
    assert len(scored.choices[0].logprobs.token_logprobs) == 3
    assert scored.choices[0].logprobs.text_offset == [0, 1, 2]


def test_32_concurrent_clients_all_get_their_own_completion(server, reference):
    prompts = [f"request {i}: " for i in range(32)]
    expected = [c.text for c in reference(prompts, 12)]

    def ask(i: int) -> str:
        if i % 3 == 0:
            return httpx.post(f"{server.url}/complete", json={"context": prompts[i], "top_p": 1.0, "temp": 0.0,
                                                              "length": 12}, timeout=120).json()["completion"]
        settings = dict(model="tiny-test", prompt=prompts[i], max_tokens=12, temperature=0)
        if i % 3 == 1:
            return client(server).completions.create(**settings).choices[0].text
        stream = client(server).completions.create(**settings, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == expected


def test_a_top_k_overflow_alongside_16_requests_fails_alone_with_400(server, reference):
    prompts = [f"innocent {i}: " for i in range(16)]
    expected = [c.text for c in reference(prompts, 8)]

    def ask(i: int) -> httpx.Response:
        if i == 16:
            return httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "top_k": 2**31, "stream": True},
                              timeout=120)
        if i == 17:
            return httpx.post(f"{server.url}/complete", json={"context": "x", "top_k": 2**31}, timeout=120)
        return httpx.post(f"{server.url}/v1/completions", json={"prompt": prompts[i], "max_tokens": 8,
                                                                 "temperature": 0}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(18) as pool:
        answers = list(pool.map(ask, [16, 17, *range(16)]))
    for bad in answers[:2]:
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
        assert "2147483647" in bad.json()["error"]["message"]
    assert [a.status_code for a in answers[2:]] == [200] * 16
    assert [a.json()["choices"][0]["text"] for a in answers[2:]] == expected


MALFORMED = [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "top_k": 2**31}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 100}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x" * 100}, "prompt"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "x", "frequency_penalty": 1}, "frequency_penalty"),
    ({"prompt": "x", "suffix": "end"}, "suffix"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
]


@pytest.mark.parametrize("body,field", MALFORMED, ids=[f"{f}-{i}" for i, (_, f) in enumerate(MALFORMED)])
def test_an_invalid_field_gets_400_naming_it(server, body, field):
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize("path,content,headers,status", [
    ("/v1/completions", b"{not json", {"content-type": "application/json"}, 400),
    ("/v1/completions", b"[1, 2]", {"content-type": "application/json"}, 400),
    ("/v1/completions", b"", {"content-type": "application/json"}, 400),
    ("/v1/completions", b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 400),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', {"content-type": "application/json"}, 400),
    ("/v1/completions", b'{"prompt": "' + b"x" * 70000 + b'"}', {"content-type": "application/json"}, 413),
    ("/complete", b'{"context": 5}', {"content-type": "application/json"}, 400),
    ("/complete", b'{"top_p": 0.9, "temp": 1}', {"content-type": "application/json"}, 400),
    ("/complete", b'{"context": "x", "temp": -1}', {"content-type": "application/json"}, 400),
    ("/complete", b'{"context": "' + b"y" * 80 + b'"}', {"content-type": "application/json"}, 400),
    ("/nowhere", b"{}", {"content-type": "application/json"}, 404),
])
def test_malformed_requests_get_4xx_json_errors(server, path, content, headers, status):
    response = httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_the_server_still_answers_after_the_malformed_battery(server, reference):
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405
    with socket.create_connection(("127.0.0.1", server.port)) as raw:  # a body cut short by the client
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 9999\r\n\r\n{\"prompt\": \"x\"")
    assert httpx.get(f"{server.url}/health").status_code == 200
    result = client(server).completions.create(model="tiny-test", prompt="ok", max_tokens=4, temperature=0)
    assert result.choices[0].text == reference(["ok"], 4)[0].text
    assert "Traceback" not in server.log.read_text()


# ----- a second server: one slot, one queue place, an API key, a short timeout -----

@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    # Eight layers and one step per call: 4000 tokens take well over the 5 s timeout on any CPU.
    config = write_checkpoint(tmp_path_factory.mktemp("long-model"), suppress_eos=True, seq=4096, layers=8,
                              d_model=64)
    server = Server(config, tmp_path_factory.mktemp("log") / "strict.log", "--api-key", API_KEY, "--max-batch", "1",
                    "--max-queue", "1", "--steps-per-call", "1", "--request-timeout", "5", "--compile-all")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_every_endpoint_but_health_needs_the_api_key(strict_server):
    url = strict_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/complete"),
                             ("GET", "/docs")):
            response = httpx.request(method, f"{url}{path}", json={"prompt": "x"}, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(strict_server, "wrong").completions.create(model="tiny-test", prompt="x", max_tokens=1)
    ok = client(strict_server, API_KEY).completions.create(model="tiny-test", prompt="x", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_a_full_queue_answers_429_and_a_vanished_client_is_cancelled(strict_server):
    url = strict_server.url
    long_request = {"prompt": "a", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(headers=AUTH, timeout=30) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        with http.stream("POST", f"{url}/v1/completions", json=long_request) as holder:
            holder_id = holder.headers["x-request-id"]
            lines = holder.iter_lines()  # kept: dropping the iterator would close the stream
            next(line for line in lines if line.startswith("data:"))  # it is generating
            waiting = pool.submit(http.post, f"{url}/v1/completions",
                                  json={"prompt": "b", "max_tokens": 1, "temperature": 0})
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/health").json()["queued"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.01)
            refused = http.post(f"{url}/v1/completions", json={"prompt": "c", "max_tokens": 1})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "rate_limit_error"
        # Leaving the block closed the stream: its slot must go to the waiting request at once.
        assert waiting.result(timeout=30).status_code == 200
    tokens_out = int(re.search(r"tokens_out=(\d+)", strict_server.log_line(holder_id)).group(1))
    assert tokens_out < 4000


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(strict_server):
    with httpx.Client(headers=AUTH, timeout=30) as http:
        started = time.monotonic()
        late = http.post(f"{strict_server.url}/v1/completions", json={"prompt": "a", "max_tokens": 4000})
        assert late.status_code == 504 and time.monotonic() - started < 15
        assert late.json()["error"]["type"] == "timeout_error"
        assert http.post(f"{strict_server.url}/complete", json={"context": "z", "length": 3}).status_code == 200
