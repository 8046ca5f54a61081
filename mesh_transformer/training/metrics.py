"""Training metrics: a JSON-lines log (local path or URL), optional wandb/TensorBoard, and MFU accounting."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer import storage
from mesh_transformer.hardware import accelerator_for_device_kind

logger = logging.getLogger(__name__)

_RESERVED_KEYS = ("step", "time")


def _json_value(value: Any) -> Any:
    """Plain Python numbers for JSON; numpy/JAX scalars become floats (ints stay ints)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise TypeError(f"metric values must be scalars, got an array of shape {array.shape}")
    return array.item()


def _strict_json_value(value: Any) -> Any:
    """``null`` for NaN and infinities: JSON has no such numbers, and strict parsers reject the bare
    ``NaN`` / ``Infinity`` that Python's json module writes by default."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _parse_line(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLogger:
    """Writes one JSON object per ``log`` call to ``path``: ``{"step": ..., **metrics, "time": unix}``.

    Non-finite values are written as ``null`` (wandb and TensorBoard get them as they are).

    Local files are appended to and flushed per line. Object stores cannot append, so for URLs the
    lines are kept in memory and the whole object is rewritten at most every ``flush_interval_s``
    seconds, on ``flush()`` and on ``close()``; each rewrite replaces the object atomically.
    With ``primary=False`` (non-zero processes) nothing is written anywhere.
    """

    def __init__(
        self,
        path: str,
        *,
        primary: bool = True,
        wandb_project: str | None = None,
        wandb_name: str | None = None,
        tensorboard_dir: str | None = None,
        config: dict | None = None,
        flush_interval_s: float = 60.0,
    ):
        self.path = path
        self.primary = primary
        self._flush_interval_s = flush_interval_s
        self._file = None
        self._lines: list[str] = []
        self._dirty = False
        self._last_flush = time.monotonic()
        self._wandb = None
        self._tensorboard = None
        if not primary:
            return
        if storage.is_local(path):
            self._file = self._open_for_append()
        elif storage.exists(path):
            # Resuming a run: keep what earlier runs logged, since every rewrite replaces the object.
            self._lines = storage.read_text(path).splitlines(keepends=True)
        if wandb_project:
            self._wandb = _start_wandb(wandb_project, wandb_name, config)
        if tensorboard_dir:
            self._tensorboard = _start_tensorboard(tensorboard_dir)

    def _open_for_append(self):
        local = storage.local_path(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        f = open(local, "a+", encoding="utf-8")
        # A process killed mid-write can leave a last line without its newline; without this the
        # next record would be glued onto it and both would be unreadable.
        if f.tell() > 0:
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        return f

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.primary:
            return
        clashing = [key for key in _RESERVED_KEYS if key in metrics]
        if clashing:
            raise ValueError(f"metric names {clashing} are reserved by the metrics log {self.path}")
        values = {key: _json_value(value) for key, value in metrics.items()}
        strict = {key: _strict_json_value(value) for key, value in values.items()}
        line = json.dumps({"step": int(step), **strict, "time": time.time()}, allow_nan=False) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._last_flush >= self._flush_interval_s:
                self.flush()
        self._log_to_wandb(step, values)
        self._log_to_tensorboard(step, values)

    def _log_to_wandb(self, step: int, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def _log_to_tensorboard(self, step: int, values: dict[str, Any]) -> None:
        if self._tensorboard is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tensorboard.add_scalar(key, value, step)

    def flush(self) -> None:
        """Make everything logged so far visible at ``path``."""
        if not self.primary:
            return
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            storage.write_text_atomic(self.path, "".join(self._lines))
            self._dirty = False
        self._last_flush = time.monotonic()

    def truncate_after(self, step: int) -> None:
        """Drop records with a step after ``step`` (a resumed run repeats those steps).

        The file is rewritten atomically. Lines that are not JSON objects (a record cut short by a
        crash) are dropped too. wandb and TensorBoard keep what they already received.
        """
        if not self.primary:
            return
        if storage.is_local(self.path):
            was_open = self._file is not None
            if was_open:
                self._file.close()
            lines = storage.read_text(self.path).splitlines(keepends=True) if storage.exists(self.path) else []
        else:
            lines = self._lines
        kept = [line for line in lines if self._keep(line, step)]
        storage.write_text_atomic(self.path, "".join(kept))
        if storage.is_local(self.path):
            self._file = self._open_for_append() if was_open else None
        else:
            self._lines, self._dirty = kept, False
        logger.info("Truncated %s after step %d: kept %d of %d lines", self.path, step, len(kept), len(lines))

    def _keep(self, line: str, step: int) -> bool:
        record = _parse_line(line)
        if record is None:
            logger.warning("Dropping unreadable line from %s: %r", self.path, line[:200])
            return False
        return record.get("step", -1) <= step

    def close(self) -> None:
        if not self.primary:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _start_wandb(project: str, name: str | None, config: dict | None):
    try:
        import wandb
    except ImportError:
        logger.warning("wandb_project=%r is set but wandb is not installed; not logging to wandb", project)
        return None
    return wandb.init(project=project, name=name, config=config)


def _start_tensorboard(log_dir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard_dir=%r is set but neither tensorboardX nor torch's TensorBoard "
                           "writer is installed; not writing TensorBoard events", log_dir)
            return None
    return SummaryWriter(log_dir)


# ----- MFU accounting -----

_TABLE_DTYPES = ("bfloat16", "float16")


def _table_peak(device_kind: str) -> float | None:
    accelerator = accelerator_for_device_kind(device_kind)
    return accelerator.peak_bf16_flops if accelerator else None


def _measured_peak(device: jax.Device) -> float:
    """Median FLOP/s of a jitted fp32 square matmul on ``device`` (well under 2 s on a CPU)."""
    n = 2048 if device.platform == "cpu" else 8192
    repeats = 5
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.float32), device) for k in keys)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()  # compile and warm up outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / float(np.median(times))


def device_peak_flops(device: jax.Device | None = None, dtype: str = "bfloat16") -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number came from: ``"table"`` or ``"measured"``.

    Known accelerators use the published dense bf16/fp16 peak. CPUs, unknown kinds and other
    dtypes get a quick fp32 matmul measurement instead, which is the practical ceiling there
    (bf16 is slower than fp32 on CPUs without native bf16).
    """
    device = device if device is not None else jax.devices()[0]
    peak = _table_peak(device.device_kind) if jnp.dtype(dtype).name in _TABLE_DTYPES else None
    if peak is not None:
        return peak, "table"
    peak = _measured_peak(device)
    logger.info("Measured %.3g FLOP/s (fp32 matmul) on %s (%s)", peak, device, device.device_kind)
    return peak, "measured"


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    if n_devices <= 0 or not peak_per_device > 0 or not math.isfinite(peak_per_device):
        raise ValueError(f"mfu needs n_devices > 0 and a finite peak > 0, got {n_devices} and {peak_per_device}")
    return tokens_per_sec * flops_per_token / (n_devices * peak_per_device)
