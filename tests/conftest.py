"""Test-wide setup: 8 fake CPU devices so real (dp, fsdp, mp) meshes exist on one CPU.

The environment is set before anything imports JAX.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never let a cloud library probe a metadata server from a test.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def gcs_emulator():
    """A running GCS emulator on 127.0.0.1 (its port); clients in this process and children use it."""
    from tests.gcs_emulator import running_emulator

    with running_emulator() as port:
        yield port


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
    """A fresh bucket on the emulator, as a gs:// URL."""
    from tests.gcs_emulator import make_bucket

    name = "test-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    return make_bucket(name)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Each tier of the suite (.ci/tests) runs in one
    process, and without this every module's executables stay resident to the end (modules rarely share
    them)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
