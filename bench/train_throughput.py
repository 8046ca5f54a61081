"""Training throughput and MFU of our GPT-J train step vs Hugging Face ``GPTJForCausalLM`` on this CPU.

Measures in ONE process, on ONE real device (no fake devices):

1. the dense-matmul peak: median FLOP/s of jitted ``jnp.dot`` and of ``torch.matmul`` on large fp32
   square matrices; the peak is the larger of the two;
2. our ``Trainer.jit_train_step`` (one micro-batch) for each requested variant (remat policy x scan unroll);
3. the PyTorch reference: ``GPTJForCausalLM`` (eager attention) forward + backward + grad clipping +
   ``torch.optim.AdamW`` on the same batch.

Steps of all runners are interleaved (ours, HF, ours, HF, ...) so that background load hits them alike;
each runner's tokens/s is the median over ``--steps`` timed steps after compilation and one warmup step.

Model FLOPs per token = 6 N + 12 layers d_model seq, N = non-embedding parameters including lm_head;
MFU = tokens/s * FLOPs per token / peak.

    python bench/train_throughput.py                      # full run (a few minutes), appends to RESULTS.md
    python bench/train_throughput.py --quick --no-write   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (RESULTS, add_repo_to_path, add_run_arguments, add_shape_arguments, append_results, command_line,
                    cpu_description, cpu_flags, markdown_table, median_seconds, software_versions,
                    use_one_cpu_device)

use_one_cpu_device()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

add_repo_to_path()
from mesh_transformer.models.registry import parse_config  # noqa: E402
from mesh_transformer.models.transformer import non_embedding_params  # noqa: E402
from mesh_transformer.sharding import make_mesh  # noqa: E402
from mesh_transformer.training.steps import Trainer  # noqa: E402

LR, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 0.1, 1.0


# ----- peak -----

def matmul_peaks(n: int, repeats: int) -> dict[str, float]:
    """Median FLOP/s of an (n, n) @ (n, n) fp32 matmul in JAX and in PyTorch."""
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((2, n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    jax_t = median_seconds(lambda: dot(a, b).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    torch_t = median_seconds(lambda: torch.matmul(ta, tb), repeats)
    return {"jax": flops / jax_t, "torch": flops / torch_t}


# ----- runners -----

@dataclass
class Runner:
    name: str
    step: object  # () -> None, runs one full train step and waits for it
    compile_s: float
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds, all threads


def model_dict(args) -> dict:
    return dict(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=args.seq,
                pe_rotary_dims=args.rotary)


def make_batch(args) -> np.ndarray:
    return np.random.default_rng(1).integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)


def ours_runner(args, tokens: np.ndarray, remat: str, unroll: int) -> tuple[Runner, int]:
    """Our jitted train step; returns the runner and N (non-embedding params incl. lm_head)."""
    config = parse_config(dict(model_dict(args), remat=remat, scan_unroll=unroll, lr=LR, warmup_steps=0,
                               weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, per_replica_batch=args.batch,
                               param_dtype=args.dtype, compute_dtype=args.dtype),
                          source="bench")
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    state = trainer.init_state(seed=0)
    n_params = non_embedding_params(state.params)
    step_fn = trainer.jit_train_step()
    batch = jax.device_put(tokens[None], trainer.batch_sharding())
    mask = jax.device_put(np.ones(batch.shape, np.float32), trainer.batch_sharding())
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, mask).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, mask)
        jax.block_until_ready(metrics["loss"])
        jax.block_until_ready(holder["state"])

    unroll_name = "full" if unroll >= args.layers else str(unroll)
    return Runner(f"ours remat={remat} unroll={unroll_name}", step, compile_s), n_params


def hf_runner(args, tokens: np.ndarray) -> tuple[Runner, int]:
    """HF GPTJForCausalLM: forward, mean CE over the same next-token targets, backward, clip, AdamW."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    hf_config = GPTJConfig(vocab_size=args.vocab, n_positions=max(args.seq, 2048), n_embd=args.d_model,
                           n_layer=args.layers, n_head=args.heads, rotary_dim=args.rotary,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                           bos_token_id=0, eos_token_id=0,
                           attn_implementation="eager")
    model = GPTJForCausalLM(hf_config).train()
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, eps=1e-8)
    inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    targets = torch.from_numpy(tokens[:, 1:].astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        loss.item()

    return Runner("HF GPTJForCausalLM (torch eager)", step, 0.0), n_params


# ----- reporting -----

def machine_info() -> dict[str, str]:
    return {"cpu": cpu_description(), "cores": str(os.cpu_count()), "flags": cpu_flags(),
            **software_versions(torch_threads=str(torch.get_num_threads()))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p, layers=6, d_model=512, heads=8, rotary=64, vocab=50400, seq=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per runner (after 1 warmup step)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our param/compute dtype")
    p.add_argument("--remat", nargs="+", default=["none", "full"],
                   choices=["none", "full", "dots", "dots_with_no_batch_dims"], help="our remat policies to run")
    p.add_argument("--scan-unroll", nargs="+", default=["1", "full"],
                   help="our scan unroll factors to run (an integer, or 'full' = number of layers)")
    p.add_argument("--no-hf", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=10)
    add_run_arguments(p)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.seq, args.d_model, args.heads = 2, 2, 64, 64, 4
        args.rotary, args.vocab, args.steps, args.matmul_size = 8, 256, min(args.steps, 3), 256
    args.unrolls = sorted({args.layers if u == "full" else int(u) for u in args.scan_unroll})
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = command_line(__file__, argv)
    torch.set_num_threads(os.cpu_count())
    info = machine_info()
    load_before = os.getloadavg()[0]
    print(f"machine: {info}\nload before: {load_before:.2f}", flush=True)

    peaks = matmul_peaks(args.matmul_size, args.matmul_repeats)
    print(f"matmul {args.matmul_size}^2 fp32 (before): jax {peaks['jax'] / 1e9:.1f} GFLOP/s, "
          f"torch {peaks['torch'] / 1e9:.1f} GFLOP/s", flush=True)

    tokens = make_batch(args)
    runners, n_params = [], None
    for remat in args.remat:
        for unroll in args.unrolls:
            runner, n_params = ours_runner(args, tokens, remat, unroll)
            runners.append(runner)
            print(f"compiled {runner.name} in {runner.compile_s:.1f} s", flush=True)
    if not args.no_hf:
        runner, hf_params = hf_runner(args, tokens)
        if hf_params != n_params:
            print(f"WARNING: HF non-embedding params {hf_params} != ours {n_params}", flush=True)
        runners.append(runner)
    for r in runners:  # warmup step (first-call allocations, torch autograd caches)
        r.step()
    for _ in range(args.steps):  # interleaved timing
        for r in runners:
            t0, c0 = time.perf_counter(), time.process_time()
            r.step()
            r.times.append(time.perf_counter() - t0)
            r.cpu_times.append(time.process_time() - c0)
    load_after = os.getloadavg()[0]
    # The peak is a ceiling: measure it again after the models and keep the better value of each,
    # so that background load during one of the two measurements does not flatter the MFU.
    after = matmul_peaks(args.matmul_size, args.matmul_repeats)
    print(f"matmul {args.matmul_size}^2 fp32 (after): jax {after['jax'] / 1e9:.1f} GFLOP/s, "
          f"torch {after['torch'] / 1e9:.1f} GFLOP/s", flush=True)
    peaks = {lib: max(peaks[lib], after[lib]) for lib in peaks}
    peak = max(peaks.values())

    tokens_per_step = args.batch * args.seq
    flops_per_token = 6 * n_params + 12 * args.layers * args.d_model * args.seq
    hf = runners[-1] if not args.no_hf else None
    hf_tps = tokens_per_step / statistics.median(hf.times) if hf else None
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        tps = tokens_per_step / med
        ratio = f"{tps / hf_tps:.2f}x" if hf_tps else "-"
        compile_s = f"{r.compile_s:.1f}" if r is not hf else "-"
        rows.append([r.name, f"{med:.3f}", f"{min(r.times):.3f}", f"{statistics.median(r.cpu_times):.3f}",
                     f"{tps:.0f}", ratio, f"{100 * tps * flops_per_token / peak:.1f}%", compile_s])
    header = ["runner", "median step s", "min step s", "CPU s/step", "tokens/s", "vs HF", "MFU", "compile s"]
    result_table = markdown_table(header, rows)
    shape = (f"layers {args.layers}, d_model {args.d_model}, heads {args.heads}, rotary {args.rotary}, "
             f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, {args.dtype}; "
             f"N = {n_params:,} non-embedding params incl. lm_head; "
             f"{flops_per_token / 1e6:.1f} MFLOP/token; {args.steps} timed steps per runner, interleaved")
    print()
    print(shape)
    print(f"peak = max(jax {peaks['jax'] / 1e9:.1f}, torch {peaks['torch'] / 1e9:.1f}) GFLOP/s "
          "(best of before and after)")
    print(result_table)
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    if args.no_write:
        return
    section = "\n".join([
        f"\n## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}, {info['cores']} cores ({info['flags']}); python {info['python']}, "
        f"jax {info['jax']}, torch {info['torch']} ({info['torch_threads']} threads)",
        f"- load average (1 min): {load_before:.2f} before, {load_after:.2f} after; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(none)'}",
        f"- shape: {shape}",
        f"- matmul {args.matmul_size}x{args.matmul_size} fp32 (best of before/after the models): "
        f"jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s; "
        f"MFU is against {peak / 1e9:.1f} GFLOP/s",
        "",
        result_table,
        "",
    ])
    append_results(section, args.results,
                   title="# Training throughput results\n\nAppended by `bench/train_throughput.py`.\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
