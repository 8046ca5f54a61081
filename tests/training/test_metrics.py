"""MetricsLogger (local files and fsspec URLs, optional backends) and MFU accounting."""

import json
import logging
import sys
import time
import types
import uuid

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.training.metrics import MetricsLogger, device_peak_flops, mfu
from tests.helpers import strict_json


def read_records(text):
    return [json.loads(line) for line in text.splitlines()]


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def memory_url():
    return f"memory://metrics-{uuid.uuid4().hex}/metrics.jsonl"


def read_url(url):
    with fsspec.open(url, "r") as f:
        return f.read()


def test_local_log_appends_one_flushed_json_line_per_call(tmp_path):
    path = tmp_path / "run" / "nested" / "metrics.jsonl"
    before = time.time()
    logger = MetricsLogger(str(path))
    logger.log(1, {"loss": 2.5, "tokens": 4096})
    # Flushed per line: readable before close.
    assert without_time(read_records(path.read_text())) == [{"step": 1, "loss": 2.5, "tokens": 4096}]
    logger.log(np.int64(2), {"loss": np.float32(1.25), "lr": jnp.array(0.5), "grad_norm": jnp.float32(3.0)})
    logger.close()
    after = time.time()

    records = read_records(path.read_text())
    assert without_time(records) == [
        {"step": 1, "loss": 2.5, "tokens": 4096},
        {"step": 2, "loss": 1.25, "lr": 0.5, "grad_norm": 3.0},
    ]
    assert list(records[1]) == ["step", "loss", "lr", "grad_norm", "time"]
    assert all(before <= r["time"] <= after for r in records)


def test_non_finite_values_are_written_as_null_so_strict_parsers_read_every_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(str(path)) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "lr": jnp.array(-np.inf), "ok": 1.5})
    (record,) = [strict_json(line) for line in path.read_text().splitlines()]
    assert without_time([record]) == [{"step": 1, "loss": None, "grad_norm": None, "lr": None, "ok": 1.5}]


def test_reserved_keys_and_non_scalars_are_rejected(tmp_path):
    logger = MetricsLogger(str(tmp_path / "m.jsonl"))
    with pytest.raises(ValueError, match=r"\['step'\] are reserved"):
        logger.log(1, {"step": 3})
    with pytest.raises(TypeError, match="scalars"):
        logger.log(1, {"loss": np.ones(3)})
    logger.close()


def test_non_primary_writes_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    logger = MetricsLogger(str(path), primary=False, wandb_project="p", tensorboard_dir=str(tmp_path / "tb"))
    logger.log(1, {"loss": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_truncate_after_on_resume_and_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    logger = MetricsLogger(str(path))
    for step in range(1, 6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a process killed mid-write

    resumed = MetricsLogger(str(path))
    resumed.log(6, {"loss": 6.5})  # must start on a fresh line
    lines = path.read_text().splitlines()
    assert lines[-2] == '{"step": 6, "lo' and json.loads(lines[-1])["loss"] == 6.5

    resumed.truncate_after(3)
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    assert without_time(read_records(path.read_text())) == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0}, {"step": 4, "loss": 40.0},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary file left behind


def test_truncate_after_close_rewrites_the_file_without_reopening_it(tmp_path):
    path = tmp_path / "m.jsonl"
    logger = MetricsLogger(str(path))
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)})
    logger.close()
    logger.truncate_after(2)
    assert [r["step"] for r in read_records(path.read_text())] == [1, 2]


def test_url_rewrites_the_object_at_most_every_interval_and_on_close():
    url = memory_url()
    logger = MetricsLogger(url, flush_interval_s=3600)
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 2.0})
    assert not fsspec.filesystem("memory").exists(url)  # buffered: object stores cannot append
    logger.flush()
    assert without_time(read_records(read_url(url))) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    logger.log(3, {"loss": 3.0})
    logger.close()
    assert [r["step"] for r in read_records(read_url(url))] == [1, 2, 3]

    eager = MetricsLogger(url, flush_interval_s=0)  # resuming keeps the earlier lines
    eager.log(4, {"loss": 4.0})
    assert [r["step"] for r in read_records(read_url(url))] == [1, 2, 3, 4]
    eager.truncate_after(2)
    assert [r["step"] for r in read_records(read_url(url))] == [1, 2]
    eager.log(3, {"loss": 30.0})
    eager.close()
    assert without_time(read_records(read_url(url)))[-1] == {"step": 3, "loss": 30.0}


def test_missing_optional_backends_only_warn(tmp_path, monkeypatch, caplog):
    for name in ("wandb", "tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="mesh_transformer.training.metrics"):
        logger = MetricsLogger(str(tmp_path / "m.jsonl"), wandb_project="proj", tensorboard_dir=str(tmp_path))
    logger.log(1, {"loss": 1.0})
    logger.close()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "wandb is not installed" in messages and "TensorBoard" in messages
    assert len(read_records((tmp_path / "m.jsonl").read_text())) == 1


def test_wandb_and_tensorboard_receive_the_metrics(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("wandb.log", values, step))

        def finish(self):
            calls.append(("wandb.finish",))

    def init(**kwargs):
        calls.append(("wandb.init", kwargs))
        return Run()

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("tb.init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append(("tb.add_scalar", tag, value, step))

        def close(self):
            calls.append(("tb.close",))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    logger = MetricsLogger(str(tmp_path / "m.jsonl"), wandb_project="proj", wandb_name="run1",
                           tensorboard_dir="tb-dir", config={"lr": 0.1})
    logger.log(7, {"loss": np.float32(0.5), "note": "warmup"})
    logger.close()
    assert calls == [
        ("wandb.init", {"project": "proj", "name": "run1", "config": {"lr": 0.1}}),
        ("tb.init", "tb-dir"),
        ("wandb.log", {"loss": 0.5, "note": "warmup"}, 7),
        ("tb.add_scalar", "loss", 0.5, 7),
        ("wandb.finish",),
        ("tb.close",),
    ]


@pytest.mark.parametrize("kind,expected", [
    ("TPU v2", 22.5e12), ("TPU v3", 61.5e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
])
def test_device_peak_flops_table(kind, expected):
    device = types.SimpleNamespace(device_kind=kind, platform="tpu" if "TPU" in kind else "gpu")
    assert device_peak_flops(device) == (expected, "table")
    assert device_peak_flops(device, dtype=jnp.bfloat16) == (expected, "table")


def test_device_peak_flops_measures_a_cpu():
    start = time.perf_counter()
    flops, source = device_peak_flops(jax.devices()[0])
    elapsed = time.perf_counter() - start
    assert source == "measured"
    assert 1e8 < flops < 1e14
    assert elapsed < 5  # about 1 s on 2 cores; generous for a loaded machine


def test_mfu():
    assert mfu(1000.0, 1e9, 4, 1e12) == 0.25
    with pytest.raises(ValueError, match="n_devices"):
        mfu(1000.0, 1e9, 0, 1e12)
    with pytest.raises(ValueError, match="peak"):
        mfu(1000.0, 1e9, 4, 0.0)
