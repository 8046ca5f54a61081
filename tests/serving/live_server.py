"""``device_serve.py`` as a subprocess on a free 127.0.0.1 port, for the tests that need a real server
(sockets, signals, the process's exit status)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import REPO

STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``device_serve.py`` on a free loopback port, its log in a file; stopped on exit."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
        env.pop("MTJ_API_KEY", None)
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "device_serve.py"), "--config", str(config), "--port", str(self.port), *args],
            cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()

    def log_line(self, request_id: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if f"id={request_id} " in line:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no log line for {request_id}")
