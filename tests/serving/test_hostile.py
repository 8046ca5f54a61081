"""Hostile and unlucky clients (issue 22). In-process: prompt scoring (echo with logprobs) waits in
the bounded queue (429) under the request timeout (504). On a real server on 127.0.0.1: a flood of
scoring requests from clients that gave up is not scored; half-open connections, trickling bodies and
wrong API keys with large bodies are cut off; connections beyond the limit get 503; SIGTERM drains.
Every test bounds its request count and its duration."""

import asyncio
import concurrent.futures
import json
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from mesh_transformer.serving import choices
from mesh_transformer.tokenizer import ByteTokenizer
from tests.inference.tiny_model import write_checkpoint
from tests.serving.live_server import Server
from tests.serving.test_robustness import InProcessServer, tiny_generator

API_KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SCORING = {"prompt": "score me", "max_tokens": 0, "echo": True, "logprobs": 1}


# ----- in-process: scoring goes through the queue -----

class BlockedScoring:
    """Prompt scoring that waits until ``release`` (or ``limit_s``, which bounds a test that fails)."""

    def __init__(self, monkeypatch, limit_s: float) -> None:
        self.entered, self.released, self.calls = threading.Event(), threading.Event(), 0
        score = choices.prompt_logprobs

        def blocked(*args):
            self.calls += 1
            self.entered.set()
            self.released.wait(limit_s)
            return score(*args)

        monkeypatch.setattr(choices, "prompt_logprobs", blocked)

    def release(self) -> None:
        self.released.set()


async def until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.fixture
def byte_server_factory():
    servers = []

    def make(**settings) -> InProcessServer:
        servers.append(InProcessServer(tiny_generator(ByteTokenizer()), **settings))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_scoring_requests_wait_in_the_bounded_queue_and_beyond_it_get_429(byte_server_factory, monkeypatch):
    server = byte_server_factory(max_queue=1)
    blocked = BlockedScoring(monkeypatch, limit_s=10)

    async def run():
        async with server.client() as http:
            first = asyncio.create_task(http.post("/v1/completions", json=SCORING))
            assert await until(blocked.entered.is_set)
            second = asyncio.create_task(http.post("/v1/completions", json=SCORING))
            queued = await until(lambda: server.service.scheduler.queued == 1, timeout_s=3)
            refused = await http.post("/v1/completions", json=dict(SCORING, stream=True))
            blocked.release()
            return queued, refused, await first, await second

    try:
        queued, refused, first, second = asyncio.run(run())
    finally:
        blocked.release()
    assert queued, "the second scoring request never waited in the queue"
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["retry-after"]
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["logprobs"] == second.json()["choices"][0]["logprobs"]


def test_a_scoring_request_past_its_timeout_gets_504_and_is_never_scored(byte_server_factory, monkeypatch):
    server = byte_server_factory(request_timeout_s=0.5)
    blocked = BlockedScoring(monkeypatch, limit_s=5)
    started = time.monotonic()
    try:
        # The first holds the decode thread in scoring; the second (a stream) waits behind it.
        answers = server.post_all([SCORING, dict(SCORING, prompt="later", stream=True)])
        elapsed = time.monotonic() - started
    finally:
        blocked.release()
    assert [a.status_code for a in answers] == [504, 504] and elapsed < 3
    assert all(a.json()["error"]["type"] == "timeout_error" for a in answers)
    assert server.post_all([SCORING])[0].status_code == 200
    assert blocked.calls == 2  # the timed-out second prompt was dropped from the queue unscored


def test_a_failure_while_scoring_fails_its_request_alone(byte_server_factory, monkeypatch):
    server = byte_server_factory()
    score = choices.prompt_logprobs

    def fail_on_doomed(generator, prompt, top_n):
        if generator.tokenizer.decode(prompt) == "doomed":
            raise RuntimeError("scoring blew up")
        return score(generator, prompt, top_n)

    monkeypatch.setattr(choices, "prompt_logprobs", fail_on_doomed)
    answers = server.post_all([dict(SCORING, prompt="doomed"), SCORING, dict(SCORING, prompt="doomed", stream=True),
                               dict(prompt="go on", max_tokens=3)])
    assert [a.status_code for a in answers] == [500, 200, 500, 200]
    assert answers[0].json()["error"]["type"] == "server_error"


# ----- a real server: floods and slow clients -----

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 1
MAX_CONNECTIONS = 48
FLOOD = 40


@pytest.fixture(scope="module")
def long_config(tmp_path_factory) -> Path:
    """Eight layers and a 4096-token window: scoring a 2,000-token prompt or generating 4,000 tokens takes
    seconds on any CPU."""
    return write_checkpoint(tmp_path_factory.mktemp("long-model"), suppress_eos=True, seq=4096, layers=8,
                            d_model=64)


@pytest.fixture(scope="module")
def hostile_server(long_config, tmp_path_factory):
    server = Server(long_config, tmp_path_factory.mktemp("log") / "hostile.log", "--api-key", API_KEY,
                    "--max-batch", "1", "--steps-per-call", "1", "--max-queue", "64", "--request-timeout", "5",
                    "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
                    "--max-connections", str(MAX_CONNECTIONS), "--max-body-bytes", "65536")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def logged(server: Server, pattern: str) -> int:
    return len(re.findall(pattern, server.log.read_text()))


def http_head(path: str, length: int, key: str = API_KEY) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sends until it closes the connection, or until ``timeout_s``."""
    sock.settimeout(timeout_s)
    received = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


@pytest.mark.slow
def test_a_scoring_flood_from_clients_that_gave_up_is_not_scored(hostile_server):
    url = f"{hostile_server.url}/v1/completions"
    flood = {"prompt": "x" * 2000, "max_tokens": 0, "echo": True, "logprobs": 0}
    assert httpx.post(url, json=flood, headers=AUTH, timeout=60).status_code == 200  # compiles this length
    answered = r"POST /v1/completions status=\d+"
    before, scored_before = logged(hostile_server, answered), logged(hostile_server, r"POST /v1/completions status=200")

    def impatient(_) -> None:
        try:
            httpx.post(url, json=flood, headers=AUTH, timeout=1.0)
        except httpx.TimeoutException:
            pass

    with concurrent.futures.ThreadPoolExecutor(FLOOD) as pool:
        list(pool.map(impatient, range(FLOOD)))
    started = time.monotonic()
    normal = httpx.post(f"{hostile_server.url}/complete", json={"context": "z", "length": 3}, headers=AUTH, timeout=5)
    assert normal.status_code == 200 and time.monotonic() - started < 5
    deadline = time.monotonic() + 30
    while logged(hostile_server, answered) < before + FLOOD + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    scored = logged(hostile_server, r"POST /v1/completions status=200") - scored_before
    assert scored < FLOOD // 2, f"{scored} of {FLOOD} abandoned scoring requests were scored"


@pytest.mark.slow
def test_half_open_connections_are_closed_within_the_header_timeout(hostile_server):
    sockets = [socket.create_connection(("127.0.0.1", hostile_server.port)) for _ in range(50)]
    try:
        started = time.monotonic()
        for sock in sockets:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: applic")
        open_ = set(sockets)
        while open_ and time.monotonic() - started < HEADER_TIMEOUT_S + 3:
            readable, _, _ = select.select(list(open_), [], [], 0.2)
            for sock in readable:
                if read_until_closed(sock, 0.5) == b"":
                    open_.discard(sock)
        assert not open_, f"{len(open_)} of 50 half-open connections still open after {HEADER_TIMEOUT_S + 3} s"
        assert time.monotonic() - started > HEADER_TIMEOUT_S - 0.5
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(f"{hostile_server.url}/health").status_code == 200


@pytest.mark.slow
def test_a_trickling_body_is_cut_with_408_within_the_body_timeout(hostile_server):
    body = json.dumps({"prompt": "slow", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", hostile_server.port)) as sock:
        sock.sendall(http_head("/v1/completions", len(body)))
        started, answer = time.monotonic(), b""
        for byte in body[:-1]:  # never the last byte
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.2)[0] or time.monotonic() - started > BODY_TIMEOUT_S + 3:
                answer = read_until_closed(sock, 2)
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"type":"timeout_error"' in answer and elapsed < BODY_TIMEOUT_S + 1.5


@pytest.mark.slow
@pytest.mark.parametrize("declared", [60000, 10_000_000], ids=["slow-body", "too-large-body"])
def test_a_wrong_api_key_gets_401_before_the_body_is_read(hostile_server, declared):
    with socket.create_connection(("127.0.0.1", hostile_server.port)) as sock:
        sock.sendall(http_head("/v1/completions", declared, key="wrong") + b'{"prompt": "')
        started = time.monotonic()
        answer = read_until_closed(sock, 3)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"authentication_error" in answer and time.monotonic() - started < 2  # closed, not waiting for a body


@pytest.mark.slow
def test_connections_beyond_the_limit_get_503(hostile_server):
    time.sleep(0.5)  # the earlier tests' connections are closed
    held = [socket.create_connection(("127.0.0.1", hostile_server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        refused = httpx.get(f"{hostile_server.url}/v1/models", headers=AUTH, timeout=5)
    finally:
        for sock in held:
            sock.close()
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    assert "connections" in refused.json()["error"]["message"]
    deadline = time.monotonic() + 5
    while httpx.get(f"{hostile_server.url}/v1/models", headers=AUTH, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "still refused after the held connections closed"
        time.sleep(0.2)


# ----- SIGTERM -----

def data_lines(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


@pytest.mark.slow
def test_sigterm_drains_ends_what_is_left_cleanly_and_exits_0(long_config, tmp_path):
    grace_s = 3
    server = Server(long_config, tmp_path / "drain.log", "--max-batch", "2", "--steps-per-call", "1",
                    "--shutdown-grace", str(grace_s))
    url = f"{server.url}/v1/completions"
    try:
        server.wait_ready()
        long_request = {"prompt": "a", "max_tokens": 4000, "temperature": 0}
        with httpx.Client(timeout=30) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
            with http.stream("POST", url, json=dict(long_request, stream=True)) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                whole = pool.submit(httpx.post, url, json=long_request, timeout=30)
                time.sleep(0.5)  # the whole request is generating too
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                time.sleep(0.5)
                refused = httpx.post(url, json={"prompt": "new", "max_tokens": 1}, timeout=5)
                ended = data_lines([first, *lines])
                drained_for = time.monotonic() - signalled
            cut = whole.result(timeout=30)
        exit_status = server.process.wait(timeout=30)
    finally:
        server.stop()
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    assert "shutting down" in refused.json()["error"]["message"]
    assert ended[-1] == "[DONE]" and "error" in json.loads(ended[-2]), ended[-3:]
    assert grace_s - 0.5 < drained_for < grace_s + 5  # it ran on through the grace, then was ended
    assert cut.status_code == 503 and "shutting down" in cut.json()["error"]["message"]
    assert exit_status == 0
    log = server.log.read_text()
    assert "Traceback" not in log and "SIGTERM" in log
