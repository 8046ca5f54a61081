"""Peak host memory of ``python -m mesh_transformer.hf import`` against the model's size. Not a test.

1. Builds a GPT-J with ``transformers``' random initialisation (default: 6 layers, d_model 768, 12
   heads, rotary 64, the GPT-J vocabulary 50400: about 480 MB of fp32 weights, the embedding and
   lm_head being the largest tensors) and saves it as safetensors. Nothing is downloaded.
2. Imports it in a fresh process on ``--devices`` CPU devices (fake ones beyond 1, as in the tests),
   without and then with ``--with-optimizer-state``. The command reports its own peak resident
   memory (``VmHWM`` of ``/proc/self/status``); on a CPU the devices' arrays are host memory too.
3. Measures the fixed cost the same way, by importing a tiny model of the same architecture on the
   same devices (Python, JAX, transformers, Orbax, the compiled programs), and reports each peak
   against the bound: that baseline, plus the model once, plus twice its largest tensor.

    python bench/hf_import_memory.py                  # about 2 min on 2 cores; appends to RESULTS.md
    python bench/hf_import_memory.py --quick --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (REPO, add_run_arguments, add_shape_arguments, append_results, command_line, drop_fake_cpu_devices,
                    machine_summary, markdown_table)

drop_fake_cpu_devices()

import transformers  # noqa: E402

MIB = 2**20


@dataclass(frozen=True)
class Run:
    devices: int
    optimizer_state: bool
    peak: float  # MiB
    baseline: float  # MiB: the tiny model's import on the same devices
    seconds: float


def save_gptj(directory: Path, layers: int, d_model: int, heads: int, rotary: int, vocab: int,
              seq: int) -> tuple[int, int]:
    """A random GPT-J saved with ``save_pretrained``; returns (all bytes, largest tensor's bytes)."""
    config = transformers.GPTJConfig(vocab_size=vocab, n_positions=seq, n_embd=d_model, n_layer=layers, n_head=heads,
                                     rotary_dim=rotary, bos_token_id=0, eos_token_id=0)
    model = transformers.GPTJForCausalLM(config)
    model.save_pretrained(str(directory))
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def import_peak(source: Path, output: Path, devices: int, optimizer_state: bool) -> tuple[float, float]:
    """(peak MiB, seconds) of one import in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    command = [sys.executable, "-m", "mesh_transformer.hf", "import", "--hf-path", str(source), "--output",
               str(output), "--no-progress", "--log-level", "WARNING"]
    start = time.perf_counter()
    result = subprocess.run(command + (["--with-optimizer-state"] if optimizer_state else []), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"import of {source} failed:\n{result.stderr[-3000:]}")
    return float(re.search(r"peak memory (\d+) MiB", result.stdout).group(1)), time.perf_counter() - start


def measure(args, root: Path) -> tuple[int, int, list[Run]]:
    model_bytes, largest = save_gptj(root / "model", args.layers, args.d_model, args.heads, args.rotary, args.vocab,
                                     args.seq)
    save_gptj(root / "tiny", 1, 8 * args.heads, args.heads, 8, 256, args.seq)
    runs = []
    for devices in args.devices:
        baseline, _ = import_peak(root / "tiny", root / f"tiny_{devices}", devices, False)
        for optimizer_state in (False, True):
            peak, seconds = import_peak(root / "model", root / f"out_{devices}_{optimizer_state}", devices,
                                        optimizer_state)
            runs.append(Run(devices, optimizer_state, peak, baseline, seconds))
            print(runs[-1], flush=True)
    return model_bytes, largest, runs


def report(args, command: str, loads: tuple[float, float], model_bytes: int, largest: int, runs: list[Run]) -> str:
    model, bound_extra = model_bytes / MIB, (model_bytes + 2 * largest) / MIB
    rows = [[str(r.devices), "yes" if r.optimizer_state else "no", f"{r.baseline:.0f}", f"{r.peak:.0f}",
             f"{r.peak - r.baseline:.0f}", f"{(r.peak - r.baseline) / model:.2f}x", f"{r.baseline + bound_extra:.0f}",
             "yes" if r.peak <= r.baseline + bound_extra else "**no**", f"{r.seconds:.1f}"]
            for r in runs]
    return "\n".join([
        f"\n## Hugging Face import: peak host memory ({datetime.date.today().isoformat()})\n",
        f"Command: `{command}`  \nMachine: {machine_summary()}, transformers {transformers.__version__}  \n"
        f"Load average before/after: {loads[0]:.2f} / {loads[1]:.2f}\n",
        f"Model: GPT-J layout, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, rotary {args.rotary}, "
        f"vocab {args.vocab}, fp32 safetensors: {model:.0f} MiB, largest tensor {largest / MIB:.0f} MiB. Peak = "
        f"the import process's peak resident memory (VmHWM); baseline = the same import of a tiny model; "
        f"bound = baseline + model + 2 x largest tensor. With the optimizer state the checkpoint holds two more "
        f"copies of the model, so that row is expected above the bound.\n",
        markdown_table(["CPU devices", "optimizer state", "baseline MiB", "peak MiB", "peak - baseline MiB",
                        "x model", "bound MiB", "within bound", "seconds"], rows),
    ]) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p, layers=6, d_model=768, heads=12, rotary=64, vocab=50400, seq=2048)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8], help="CPU device counts to import onto")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.rotary, args.vocab, args.seq = 2, 256, 8, 16, 4096, 128
        args.devices = [8]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = command_line(__file__, argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes, largest, runs = measure(args, Path(tmp))
    section = report(args, command, (load_before, os.getloadavg()[0]), model_bytes, largest, runs)
    print(section)
    if not args.no_write:
        append_results(section)


if __name__ == "__main__":
    main()
