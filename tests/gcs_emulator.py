"""A real GCS emulator server on 127.0.0.1 for tests, with the settings that keep every client local.

gcsfs and TensorStore (Orbax) are pointed at the emulator with anonymous credentials; the Google auth
libraries are told never to probe a cloud metadata server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_environment(port: int) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:1",
    }


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the GCS emulator did not listen on 127.0.0.1:{port} within {timeout} s")


def start_emulator(port: int, data_dir: str | None = None) -> subprocess.Popen:
    """In memory, or with ``data_dir``: stored on disk there, so a restarted emulator keeps the objects."""
    executable = shutil.which("gcp-storage-emulator") or os.path.join(os.path.dirname(sys.executable),
                                                                      "gcp-storage-emulator")
    storage = [] if data_dir else ["--in-memory"]
    process = subprocess.Popen([executable, "start", "--host=127.0.0.1", f"--port={port}", *storage], cwd=data_dir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_port(port, process)
    return process


@contextlib.contextmanager
def running_emulator() -> Iterator[int]:
    """Start the emulator, export the client settings into os.environ, stop it afterwards."""
    import fsspec.config

    port = free_port()
    previous = {k: os.environ.get(k) for k in client_environment(port)}
    os.environ.update(client_environment(port))
    # fsspec reads FSSPEC_GCS_TOKEN only when it is imported; tell this process's fsspec directly.
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    process = start_emulator(port)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        fsspec.config.conf["gcs"].pop("token", None)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_bucket(name: str) -> str:
    import fsspec

    filesystem = fsspec.filesystem("gs", skip_instance_cache=True)
    filesystem.mkdir(name)
    return f"gs://{name}"
