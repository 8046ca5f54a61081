"""LoRA vs a full fine-tune: step time and memory of our train step on this CPU, and the planner's
per-device memory for GPT-J-6B on TPU slices (XLA's TPU compiler) and GPUs (analytic).

CPU part, in ONE process on ONE real device, at train_throughput.py's shape (GPT-J layout, 6 layers,
d_model 512, vocab 50400, seq 512, batch 8, float32, remat full): the full fine-tune, LoRA rank 16 on
q_proj, v_proj, fc_in, fc_out with a float32 base, and the same with a bfloat16 base. Their steps are
interleaved (median of ``--steps`` after one warmup step). Memory per variant: XLA's figure for the
compiled step (arguments + outputs - aliased + temporaries), and the peak resident memory (VmHWM) of a
fresh child process that builds that variant alone and runs two steps.

Planner part: ``configs/6B_lora.json`` against ``configs/example_config.json`` (the same model, batch
and mesh) compiled for a v2-8 and a v3-8, and on one 80 GB GPU and one 24 GiB GPU (analytic; mesh
dp=1). ``--quick``: tiny CPU shapes and the GPU rows only (analytic; libtpu is not loaded).

    python bench/lora.py                      # about 5 min on 2 cores; appends to RESULTS.md
    python bench/lora.py --quick --no-write   # under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (RESULTS, add_repo_to_path, add_run_arguments, add_shape_arguments, append_results, command_line,
                    machine_summary, markdown_table, use_one_cpu_device)

use_one_cpu_device()
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = add_repo_to_path()
from mesh_transformer.config import MeshConfig  # noqa: E402
from mesh_transformer.hardware import GIB  # noqa: E402
from mesh_transformer.models.registry import load_config, parse_config  # noqa: E402
from mesh_transformer.sharding import make_mesh  # noqa: E402
from mesh_transformer.training.steps import Trainer  # noqa: E402

MIB = 2**20
TARGETS = ["q_proj", "v_proj", "fc_in", "fc_out"]
VARIANTS = {"full": None, "lora": "float32", "lora-bf16": "bfloat16"}  # name -> LoRA base_dtype


# ----- CPU: our train step -----

def variant_config(args, variant: str):
    raw = dict(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=args.seq,
               pe_rotary_dims=args.rotary, remat=args.remat, lr=1e-4, warmup_steps=0, per_replica_batch=args.batch,
               param_dtype="float32", compute_dtype="float32", tokenizer="bytes")
    if VARIANTS[variant]:
        raw["lora"] = {"rank": args.rank, "alpha": 2 * args.rank, "targets": TARGETS, "base_dtype": VARIANTS[variant]}
    return parse_config(raw, source=f"bench-{variant}")


class Runner:
    """One variant's compiled step, its state and its timings."""

    def __init__(self, args, variant: str):
        config = variant_config(args, variant)
        self.name, self.times = variant, []
        trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
        self.state = trainer.init_state(seed=0)
        tokens = np.random.default_rng(1).integers(0, args.vocab, (1, args.batch, args.seq + 1), dtype=np.int32)
        self.batch = jax.device_put(tokens, trainer.batch_sharding())
        self.mask = jax.device_put(np.ones(tokens.shape, np.float32), trainer.batch_sharding())
        start = time.perf_counter()
        self.compiled = trainer.jit_train_step().lower(self.state, self.batch, self.mask).compile()
        self.compile_s = time.perf_counter() - start
        stats = self.compiled.memory_analysis()
        self.xla_bytes = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                          + stats.temp_size_in_bytes)
        self.state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(self.state))
        self.trained = sum(leaf.size for leaf in jax.tree.leaves(self.state.params))

    def step(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch, self.mask)
        jax.block_until_ready((metrics["loss"], self.state))


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_peak(args, variant: str) -> int:
    """The peak resident memory of a fresh process that builds ``variant`` alone and runs two steps."""
    shape = ["--layers", args.layers, "--d-model", args.d_model, "--heads", args.heads, "--rotary", args.rotary,
             "--vocab", args.vocab, "--seq", args.seq, "--batch", args.batch, "--rank", args.rank, "--remat",
             args.remat]
    out = subprocess.run([sys.executable, __file__, "--child", variant, *map(str, shape)], cwd=REPO,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"]


def run_child(args) -> None:
    runner = Runner(args, args.child)
    for _ in range(2):
        runner.step()
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))


def cpu_rows(args) -> tuple[list[list[str]], dict]:
    runners = [Runner(args, variant) for variant in VARIANTS]
    for r in runners:
        r.step()  # warmup
    for _ in range(args.steps):  # interleaved, so background load hits all alike
        for r in runners:
            start = time.perf_counter()
            r.step()
            r.times.append(time.perf_counter() - start)
    peaks = {r.name: child_peak(args, r.name) for r in runners}
    full = runners[0]
    full_time = statistics.median(full.times)
    rows, numbers = [], {}
    for r in runners:
        seconds = statistics.median(r.times)
        label = "full fine-tune" if r.name == "full" else f"LoRA r{args.rank}, {VARIANTS[r.name]} base"
        rows.append([label, f"{r.trained:,}", f"{seconds:.3f}", f"{seconds / full_time:.2f}x",
                     f"{r.state_bytes / MIB:,.0f}", f"{r.xla_bytes / MIB:,.0f}", f"{r.xla_bytes / full.xla_bytes:.2f}x",
                     f"{peaks[r.name] / MIB:,.0f}", f"{peaks[r.name] / peaks['full']:.2f}x", f"{r.compile_s:.1f}"])
        numbers[r.name] = {"step_s": seconds, "xla_bytes": r.xla_bytes, "state_bytes": r.state_bytes,
                           "peak_rss_bytes": peaks[r.name], "trained_params": r.trained}
        print(" | ".join(rows[-1]), flush=True)
    return rows, numbers


CPU_HEADER = ["variant", "trained params", "median step s", "vs full", "state MiB", "XLA step MiB", "vs full",
              "peak RSS MiB (own process)", "vs full", "compile s"]


# ----- the planner: GPT-J-6B -----

PLAN_TARGETS = [("v2-8", None), ("v3-8", None), ("h100-80gb", 1), ("rtx-4090", 1)]  # name, mesh dp (GPUs: one)


def plan_when_free(config, target, compile: bool, wait_s: float = 900):
    """``make_plan``, waiting while another process holds libtpu (one at a time may load it)."""
    from mesh_transformer.plan import PlanError, make_plan

    deadline = time.time() + wait_s
    while True:
        try:
            return make_plan(config, target, compile=compile)
        except PlanError as e:
            if "in use by another process" not in str(e) or time.time() > deadline:
                raise
            print("libtpu is in use by another process: waiting", flush=True)
            time.sleep(15)


def plan_rows(quick: bool) -> tuple[list[list[str]], dict]:
    from mesh_transformer.plan import parse_target

    configs = {"lora": load_config(str(REPO / "configs" / "6B_lora.json")),
               "full": load_config(str(REPO / "configs" / "example_config.json"))}
    rows, numbers = [], {}
    # --quick leaves libtpu alone: only one process may load it, and a test run may hold it already.
    for name, dp in [t for t in PLAN_TARGETS if t[1]] if quick else PLAN_TARGETS:
        target = parse_target(name)
        plans = {}
        for kind, config in configs.items():
            config = config.replace(mesh=MeshConfig(dp=dp)) if dp else config
            plans[kind] = plan_when_free(config, target, compile=not quick)
            numbers[f"{kind} {name}"] = {"total_bytes": plans[kind].memory.total, "fits": plans[kind].fits,
                                         "method": plans[kind].memory.source}
        for kind in ("full", "lora"):
            m, p = plans[kind].memory, plans[kind]
            method = "XLA (compiled)" if m.source == "compiled" else "analytic (estimate)"
            rows.append([name, "LoRA r16, bf16 base" if kind == "lora" else "full fine-tune", method,
                         f"{m.parameters / GIB:.2f}", f"{m.optimizer_state / GIB:.2f}", f"{m.gradients / GIB:.2f}",
                         f"{m.activations / GIB:.2f}", f"{m.total / GIB:.2f}", f"{p.hbm_bytes / GIB:.2f}",
                         "yes" if p.fits else "NO", f"{m.total / plans['full'].memory.total:.2f}x"])
            print(" | ".join(rows[-1]), flush=True)
    return rows, numbers


PLAN_HEADER = ["target", "run", "memory from", "parameters GiB", "optimizer GiB", "grad accum GiB",
               "activations + temporaries GiB", "total GiB/device", "HBM GiB", "fits", "vs full"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p, layers=6, d_model=512, heads=8, rotary=64, vocab=50400, seq=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--remat", default="full", choices=["none", "full", "dots_with_no_batch_dims"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warmup step)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--only", choices=["cpu", "plan"], help="run one part only")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.rotary, args.vocab = 2, 64, 4, 8, 256
        args.seq, args.batch, args.steps, args.rank = 64, 2, min(args.steps, 2), 4
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    command, load_before = command_line(__file__, argv), os.getloadavg()[0]
    print(f"load before: {load_before:.2f}", flush=True)
    cpu, cpu_numbers = cpu_rows(args) if args.only != "plan" else ([], {})
    plan, plan_numbers = plan_rows(args.quick) if args.only != "cpu" else ([], {})
    load_after = os.getloadavg()[0]
    shape = (f"GPT-J layout, layers {args.layers}, d_model {args.d_model}, heads {args.heads}, rotary {args.rotary}, "
             f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, float32 compute, remat {args.remat}; LoRA rank "
             f"{args.rank} on {', '.join(TARGETS)}; {args.steps} timed steps per variant, interleaved")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_numbers, "plan": plan_numbers}, indent=2))
    cpu_part = [
        f"- CPU shape: {shape}",
        "",
        "Our train step on this CPU (measured). XLA step = the compiled step's arguments + outputs - aliased + "
        "temporaries; peak RSS = VmHWM of a fresh process running only that variant (includes the Python, "
        "JAX and XLA runtime, the same for all):",
        "",
        markdown_table(CPU_HEADER, cpu),
        "",
    ] if cpu else []
    plan_part = [
        "GPT-J-6B (`configs/6B_lora.json` vs `configs/example_config.json`: seq 2048, mp 8 on the TPUs, "
        "16 micro-batches of 1 sequence; on the GPUs the same on one device), per device. TPU rows are "
        "XLA's TPU compiler's figures (a step that does not fit reports what the compiler says it needs); "
        "GPU rows are the planner's analytic model (an estimate):" if not args.quick else
        "GPT-J-6B on GPUs, per device, the planner's analytic model only (`--quick`: estimates):",
        "",
        markdown_table(PLAN_HEADER, plan),
        "",
    ] if plan else []
    text = "\n".join([
        f"\n## {time.strftime('%Y-%m-%d %H:%M')}: LoRA vs full fine-tune (`bench/lora.py`)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_summary()}; one CPU device",
        f"- load average (1 min): {load_before:.2f} before, {load_after:.2f} after",
        *cpu_part, *plan_part])
    print(text)
    if not args.no_write:
        append_results(text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
