"""Accelerator speed in one process: matmul peak, attention kernels, ~1B GPT-J training and generation.

On whatever accelerator JAX sees (one GPU or TPU device; the CPU only with ``--quick``), one run
measures, in this order (Hugging Face runs before our training so that PyTorch gets the memory that
JAX's allocator keeps once it has grown):

1. **peak**: the dense bf16 matmul FLOP/s measured here (median of a jitted ``jnp.dot`` and of
   ``torch.matmul`` on ``--matmul-size`` square matrices; the better one is the measured peak), and
   the chip's datasheet dense bf16 peak from ``mesh_transformer/hardware.py`` (by ``device_kind``);
2. **attention**: forward and forward+backward of causal attention (seq 2048, 16 heads, head_dim 128,
   bf16): our ``models.layers.attend`` vs ``jax.nn.dot_product_attention`` (XLA and cuDNN) vs the
   Pallas GPU kernels (Triton ``mha``; Mosaic GPU ``attention_mgpu`` forward only);
3. **HF training**: ``GPTJForCausalLM`` (PyTorch, fp32 weights, ``torch.autocast`` bf16, sdpa
   attention where transformers offers it, AdamW, grad clipping) at the largest batch that fits;
4. **training**: our ``Trainer.jit_train_step`` (fp32 master weights, bf16 compute) for each
   ``--attention`` value, at the largest batch of ``--batches`` that fits (chosen from the compiled
   step's ``memory_analysis`` against the device's memory, out-of-memory errors caught);
   tokens/s and MFU = tokens/s x (6 N + 12 layers d_model seq) / peak;
5. **generation**: greedy decoding at ``--gen-batches``, our ``Generator`` vs ``transformers``
   ``generate`` in bf16 on the same weights (ours exported in memory through the project's Hugging
   Face conversion table).

Each section is skipped, with a note, when the time budget (``--budget-s``) would be exceeded;
progress lines carry the elapsed time; ``--out-dir`` gets the results so far as JSON after every
section. The report (markdown tables) is printed and appended to ``bench/RESULTS.md``.

    python bench/accelerator.py                          # full run on a GPU (under 8 minutes)
    python bench/accelerator.py --quick --no-write       # tiny shapes, any device (CPU: about a minute)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import (RESULTS, IdTokenizer, add_repo_to_path, add_run_arguments, add_shape_arguments, append_results,
                    command_line, drop_fake_cpu_devices, jax_device_summary, machine_summary, markdown_table,
                    median_seconds)

STARTED = time.monotonic()

drop_fake_cpu_devices()
# PyTorch shares the device: JAX must not take 75% of it up front, and must leave some room when grown.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

add_repo_to_path()
from mesh_transformer.hardware import accelerator_for_device_kind  # noqa: E402
from mesh_transformer.models.flops import model_flops_per_token  # noqa: E402
from mesh_transformer.models.registry import parse_config  # noqa: E402

LR, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 0.1, 1.0
GIB = 2**30
MEMORY_MARGIN = 0.92  # use at most this share of the free device memory for a step's temporaries
SECTIONS = ("peak", "attention", "hf-train", "train", "generation")
# Rough seconds on an H100/H200 at the default sizes that a section needs to be worth starting: the whole
# section, or for training one attention variant and for generation one batch size (checked again inside).
EXPECTED_S = {"peak": 10, "attention": 30, "hf-train": 40, "train": 110, "generation": 45}
TARGETS = {"mfu": 0.45, "train_vs_hf": 1.3, "generation_vs_hf": 2.0}


def elapsed() -> float:
    return time.monotonic() - STARTED


def log(message: str) -> None:
    print(f"[{elapsed():6.1f} s] {message}", flush=True)


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError"


def short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# ----- the run's state: results so far, notes, budget -----

class Run:
    def __init__(self, args):
        self.args = args
        self.data: dict = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "notes": [],
                           "skipped": {}}
        self.device = jax.devices()[0]
        self.platform = self.device.platform
        self.torch = None  # imported after JAX has initialised its backend (it loads its CUDA libraries first)
        self.torch_device = None
        self.train_state = None  # our train state, handed from one training variant to the next

    def note(self, text: str) -> None:
        log(f"NOTE: {text}")
        self.data["notes"].append(text)

    def fits_budget(self, seconds: float) -> bool:
        return elapsed() + seconds * self.args.expected_scale <= self.args.budget_s

    def save(self) -> None:
        if not self.args.out_dir:
            return
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "accelerator.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, out / "accelerator.json")

    def section(self, name: str, fn: Callable[["Run"], None]) -> None:
        if name in self.args.skip:
            self.data["skipped"][name] = "skipped by --skip"
        elif not self.fits_budget(EXPECTED_S[name]):
            self.data["skipped"][name] = (f"over the time budget: {elapsed():.0f} s elapsed of {self.args.budget_s:.0f} s, "
                                          f"the section needs about {EXPECTED_S[name] * self.args.expected_scale:.0f} s")
            self.note(f"section {name} {self.data['skipped'][name]}")
        else:
            log(f"== section {name}")
            started = elapsed()
            try:
                fn(self)
            except Exception as e:  # one broken section must not lose the others
                traceback.print_exc()
                self.note(f"section {name} failed: {short(e)}")
            self.data.setdefault("section_s", {})[name] = round(elapsed() - started, 1)
            print("\n" + render_section(self, name) + "\n", flush=True)
        self.save()


# ----- shapes and configs -----

def model_keys(args) -> dict:
    return dict(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=args.seq,
                pe_rotary_dims=args.rotary)


def train_config(args, attention: str, batch: int):
    raw = dict(model_keys(args), lr=LR, warmup_steps=0, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
               per_replica_batch=batch, param_dtype="float32", compute_dtype="bfloat16", remat=args.remat,
               scan_unroll=args.scan_unroll, mesh={"dp": 1, "fsdp": 1, "mp": 1}, attention=attention)
    return parse_config(raw, source="bench/accelerator.py")


def flops_per_token(args, n_params: int) -> float:
    return model_flops_per_token(n_params, args.layers, args.d_model, args.seq)


def device_memory(device) -> tuple[int | None, int | None]:
    """(bytes_limit, bytes_in_use) of a device, or Nones where it reports none (CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:
        stats = {}
    return stats.get("bytes_limit"), stats.get("bytes_in_use")


# ----- 1. matmul peak -----

def section_peak(run: Run) -> None:
    args, torch = run.args, run.torch
    n, repeats = args.matmul_size, args.matmul_repeats
    flops = 2.0 * n**3
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    result = {"size": n, "jax": flops / median_seconds(lambda: dot(a, b).block_until_ready(), repeats)}
    del a, b
    log(f"jnp.dot {n}^2 bf16: {result['jax'] / 1e12:.2f} TFLOP/s")
    if run.torch_device is not None:
        ta = torch.randn(n, n, dtype=torch.bfloat16, device=run.torch_device)
        tb = torch.randn(n, n, dtype=torch.bfloat16, device=run.torch_device)

        def torch_matmul():
            torch.matmul(ta, tb)
            synchronize(run)

        result["torch"] = flops / median_seconds(torch_matmul, repeats)
        del ta, tb
        empty_torch_cache(run)
        log(f"torch.matmul {n}^2 bf16: {result['torch'] / 1e12:.2f} TFLOP/s")
    result["measured"] = max(v for k, v in result.items() if k in ("jax", "torch"))
    accelerator = accelerator_for_device_kind(run.device.device_kind) if run.platform != "cpu" else None
    if accelerator is not None:
        result["datasheet"] = accelerator.peak_bf16_flops
        result["accelerator"] = accelerator.name
    else:
        run.note(f"device kind {run.device.device_kind!r} is not in mesh_transformer/hardware.py: "
                 "MFU is reported against the measured peak only")
    run.data["peak"] = result


def peaks(run: Run) -> tuple[float | None, float | None]:
    p = run.data.get("peak", {})
    return p.get("measured"), p.get("datasheet")


# ----- 2. attention micro-benchmark -----

def project_flash(run: Run, batch: int, seq: int) -> tuple[str, str, Callable | None, bool]:
    """Our own fused-attention entry point with the kernel ``"attention": "flash"`` resolves to here."""
    from mesh_transformer.models.attention import GLOBAL_WINDOW, resolve_attention, self_attention

    kernel = resolve_attention("flash", run.platform, run.device.device_kind, "bfloat16")
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    return (f"self_attention (ours, flash = {kernel})", "",
            lambda q, k, v: self_attention(q, k, v, positions, GLOBAL_WINDOW, None, kernel, None), True)


def attention_impls(run: Run, batch: int, seq: int, scale: float) -> list[tuple[str, str, Callable | None, bool]]:
    """(name, note, fn(q, k, v) or None, has a backward pass) for each implementation; the first is the
    reference the others' outputs are compared with."""
    try:
        from mesh_transformer.models.attention import attend
    except ImportError:  # before attention moved to its own module
        from mesh_transformer.models.layers import attend

    causal_mask = jnp.tril(jnp.ones((seq, seq), bool))
    impls: list[tuple[str, str, Callable | None, bool]] = [
        ("attend (ours, XLA)", "", lambda q, k, v: attend(q, k, v, causal_mask, None), True),
        project_flash(run, batch, seq),
        ("jax.nn.dot_product_attention xla", "",
         lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"), True),
    ]
    gpu_only = f"not available on {run.platform}"
    if run.platform == "gpu":
        impls.append(("jax.nn.dot_product_attention cudnn", "",
                      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
                      True))
    else:
        impls.append(("jax.nn.dot_product_attention cudnn", gpu_only, None, True))
    if run.platform == "gpu":
        try:
            from jax.experimental.pallas.ops.gpu.attention import mha

            impls.append(("Pallas GPU mha (Triton)", "",
                          lambda q, k, v: mha(q, k, v, None, sm_scale=scale, causal=True), True))
        except Exception as e:
            impls.append(("Pallas GPU mha (Triton)", f"does not import: {short(e, 120)}", None, True))
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu

            config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
            impls.append(("Pallas Mosaic GPU attention (Hopper)",
                          "forward only: its causal backward is not implemented",
                          lambda q, k, v: attention_mgpu.attention(q * scale, k, v, config), False))
        except Exception as e:
            impls.append(("Pallas Mosaic GPU attention (Hopper)", f"does not import: {short(e, 120)}", None, False))
    else:
        impls.append(("Pallas GPU mha (Triton)", gpu_only, None, True))
        impls.append(("Pallas Mosaic GPU attention (Hopper)", gpu_only, None, False))
    return impls


def section_attention(run: Run) -> None:
    args = run.args
    batch, seq, heads, head_dim = args.attn_batch, args.attn_seq, args.attn_heads, args.attn_head_dim
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, g = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16) for key in keys)
    scale = head_dim**-0.5
    forward_flops = 2 * 2 * batch * heads * seq * seq * head_dim / 2  # two matmuls, half of them masked away
    rows = []
    run.data["attention"] = {"shape": dict(batch=batch, seq=seq, heads=heads, head_dim=head_dim, dtype="bfloat16"),
                             "rows": rows}
    reference = None
    for name, note, fn, has_backward in attention_impls(run, batch, seq, scale):
        row = {"name": name, "note": note}
        rows.append(row)
        if fn is None:
            continue
        if not run.fits_budget(5):
            row["note"] = "skipped: over the time budget"
            continue
        try:
            forward = jax.jit(fn)
            out = forward(q, k, v).block_until_ready()
            if reference is None:
                reference = out
            row["max_abs_diff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32))))
            row["forward_ms"] = 1e3 * median_seconds(lambda: forward(q, k, v).block_until_ready(), args.attn_repeats)
            row["forward_tflops"] = forward_flops / row["forward_ms"] * 1e-9
            if has_backward:
                grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g), (0, 1, 2)))
                row["fwd_bwd_ms"] = 1e3 * median_seconds(lambda: jax.block_until_ready(grads(q, k, v)),
                                                         args.attn_repeats)
                # backward = 2.5x forward (five matmuls against two), as FlashAttention's benchmarks count
                row["fwd_bwd_tflops"] = 3.5 * forward_flops / row["fwd_bwd_ms"] * 1e-9
            log(f"attention {name}: forward {row['forward_ms']:.2f} ms, fwd+bwd {row.get('fwd_bwd_ms', float('nan')):.2f} ms")
        except Exception as e:
            row["note"] = f"failed: {short(e, 200)}"
            log(f"attention {name}: {row['note']}")
        run.save()


# ----- 3. Hugging Face PyTorch training -----

def synchronize(run: Run) -> None:
    if run.torch_device is not None and run.torch_device.type == "cuda":
        run.torch.cuda.synchronize()


def empty_torch_cache(run: Run) -> None:
    gc.collect()
    if run.torch is not None and run.torch.cuda.is_available():
        run.torch.cuda.empty_cache()


def hf_causal_lm(run: Run, hf_config, attention: str):
    """A randomly initialised HF model on the torch device; falls back to eager attention."""
    from transformers import AutoModelForCausalLM

    with run.torch.device(run.torch_device):
        try:
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)
        except (ValueError, ImportError, TypeError) as e:
            run.note(f"transformers refused attn_implementation={attention!r} ({short(e, 120)}); using eager")
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    return model


def implementation_of(model) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def section_hf_train(run: Run) -> None:
    from mesh_transformer.convert.hf_config import config_to_hf

    args, torch = run.args, run.torch
    if run.torch_device is None:
        run.data["hf_train"] = {"note": f"torch has no device here to match JAX's {run.platform}: not measured"}
        return
    hf_config = config_to_hf(train_config(args, "auto", args.batches[0]).model)
    model = hf_causal_lm(run, hf_config, args.hf_attention).float().train()
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    fused = run.torch_device.type == "cuda"
    try:
        opt = torch.optim.AdamW(groups, lr=LR, eps=1e-8, fused=fused)
    except (TypeError, RuntimeError):
        fused = False
        opt = torch.optim.AdamW(groups, lr=LR, eps=1e-8)
    result = {"attention": implementation_of(model), "n_params": n_params, "fused_adamw": fused, "tried": []}
    run.data["hf_train"] = result
    rng = np.random.default_rng(2)

    def make_step(batch: int):
        tokens = torch.from_numpy(rng.integers(0, args.vocab, (batch, args.seq + 1)).astype(np.int64))
        tokens = tokens.to(run.torch_device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=run.torch_device.type, dtype=torch.bfloat16):
                logits = model(input_ids=inputs, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            return loss.item()

        return step

    for batch in args.batches:
        if not run.fits_budget(15):
            run.note("HF training: stopped trying batch sizes, over the time budget")
            break
        step = make_step(batch)
        if run.torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out_of_memory = False
        try:
            for _ in range(args.warmup):
                step()
        except Exception as e:
            if not is_oom(e):
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block: its traceback no longer holds the step's tensors
            del step
            opt.zero_grad(set_to_none=True)
            empty_torch_cache(run)
            result["tried"].append(f"{batch}: out of memory")
            log(f"HF training batch {batch}: out of memory")
            continue
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        result.update(batch=batch, step_s=seconds, tokens_per_s=batch * args.seq / seconds)
        if run.torch_device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
        log(f"HF training batch {batch}: {seconds:.3f} s/step, {result['tokens_per_s']:.0f} tokens/s")
        break
    del model, opt
    empty_torch_cache(run)


# ----- 4. our training -----

@dataclass
class Candidate:
    batch: int
    compiled: object
    tokens: object
    mask: object
    need: int | None


def compile_step(trainer, step_fn, state, batch: int, seq: int, vocab: int) -> Candidate:
    tokens = np.random.default_rng(1).integers(0, vocab, (1, batch, seq + 1), dtype=np.int32)
    tokens = jax.device_put(tokens, trainer.batch_sharding())
    mask = jax.device_put(np.ones(tokens.shape, np.float32), trainer.batch_sharding())
    compiled = step_fn.lower(state, tokens, mask).compile()
    need = None
    try:
        analysis = compiled.memory_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0]
        if analysis is not None:  # the state is resident already; its outputs alias its (donated) inputs
            need = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    except Exception:
        pass
    return Candidate(batch, compiled, tokens, mask, need)


def train_variant(run: Run, attention: str) -> dict:
    from mesh_transformer.models.transformer import non_embedding_params
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.training.steps import Trainer

    args = run.args
    config = train_config(args, attention, args.batches[0])
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    resolved = trainer.model_config.attention
    result = {"attention": attention, "kernel": resolved, "remat": args.remat, "tried": []}
    state, run.train_state = run.train_state, None
    if state is None:
        log(f"training attention={attention} (kernel {resolved}): initialising the state")
        state = trainer.init_state(seed=0)
    result["n_params"] = non_embedding_params(state.params)
    result["state_gib"] = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / GIB
    step_fn = trainer.jit_train_step()
    chosen = None
    index = 0
    while index < len(args.batches):
        batch = args.batches[index]
        if not run.fits_budget(30):
            run.note(f"training attention={attention}: stopped trying batch sizes, over the time budget")
            break
        started = time.perf_counter()
        try:
            candidate = compile_step(trainer, step_fn, state, batch, args.seq, args.vocab)
        except Exception as e:
            if not is_oom(e):
                raise
            result["tried"].append(f"{batch}: out of memory when compiling")
            index += 1
            continue
        compile_s = time.perf_counter() - started
        limit, in_use = device_memory(run.device)
        free = (limit - in_use) if limit and in_use is not None else None
        need_text = f"needs {candidate.need / GIB:.1f} GiB" if candidate.need is not None else "needs ?"
        log(f"training attention={attention} batch {batch}: compiled in {compile_s:.1f} s, {need_text}"
            + (f" of {free / GIB:.1f} GiB free" if free is not None else ""))
        if free is not None and candidate.need is not None and candidate.need > MEMORY_MARGIN * free:
            result["tried"].append(f"{batch}: needs {candidate.need / GIB:.1f} GiB of {free / GIB:.1f} GiB free")
            # Temporaries grow at most linearly with the batch: skip the sizes that cannot fit either.
            per_row = candidate.need / batch
            index += 1
            while index < len(args.batches) and args.batches[index] * per_row > MEMORY_MARGIN * free:
                result["tried"].append(f"{args.batches[index]}: skipped, needs at least "
                                       f"{args.batches[index] * per_row / GIB:.1f} GiB")
                index += 1
            del candidate
            continue
        holder = {"state": state}
        del state

        def step(c=candidate):
            holder["state"], metrics = c.compiled(holder["state"], c.tokens, c.mask)
            jax.block_until_ready(holder["state"])
            return float(metrics["loss"])

        out_of_memory = False
        try:
            for _ in range(args.warmup):
                loss = step()
        except Exception as e:
            if not is_oom(e):
                raise
            out_of_memory = True
        if out_of_memory:
            result["tried"].append(f"{batch}: out of memory when running")
            log(f"training attention={attention} batch {batch}: out of memory when running")
            state = holder.pop("state")
            del candidate, step
            gc.collect()
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):  # donated to the failed call
                state = trainer.init_state(seed=0)
            index += 1
            continue
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        chosen = batch
        result.update(batch=batch, compile_s=compile_s, step_s=seconds, tokens_per_s=batch * args.seq / seconds,
                      loss=loss, need_gib=candidate.need / GIB if candidate.need is not None else None)
        log(f"training attention={attention} batch {batch}: {seconds:.3f} s/step, "
            f"{result['tokens_per_s']:.0f} tokens/s, loss {loss:.3f}")
        if args.profile:
            trace_dir = Path(args.profile) / f"train_{attention or 'default'}_b{batch}"
            try:
                jax.profiler.start_trace(str(trace_dir))
                try:
                    for _ in range(3):
                        step()
                finally:
                    jax.profiler.stop_trace()
                result["profile"] = str(trace_dir)
                log(f"profile of 3 steps written to {trace_dir}")
            except Exception as e:
                run.note(f"profiling attention={attention} failed: {short(e)}")
        run.train_state = holder.pop("state")  # the next variant trains on from here: same parameter tree
        del candidate, step, holder
        break
    if chosen is None:
        result.setdefault("note", "no batch size of --batches fitted")
        run.train_state = state
    gc.collect()
    return result


def section_train(run: Run) -> None:
    args = run.args
    rows: list[dict] = []
    run.data["train"] = rows
    for i, attention in enumerate(args.attention):
        if i and not run.fits_budget(EXPECTED_S["train"]):
            rows.append({"attention": attention, "note": "skipped: over the time budget"})
            run.note(f"training attention={attention} skipped: over the time budget")
            continue
        try:
            rows.append(train_variant(run, attention))
        except Exception as e:
            traceback.print_exc()
            rows.append({"attention": attention, "note": f"failed: {short(e)}"})
            log(f"training attention={attention} failed: {short(e)}")
            gc.collect()
        run.save()
    run.train_state = None
    gc.collect()


# ----- 5. generation -----

def generation_models(run: Run):
    """Our bf16 params and Generator, and an HF bf16 model holding the same weights."""
    import flax.linen as nn

    from mesh_transformer.convert.hf_config import architecture_for, config_to_hf
    from mesh_transformer.convert.tensor_table import flatten_params, hf_tensors
    from mesh_transformer.inference.engine import Generator
    from mesh_transformer.models.transformer import Transformer

    args, torch = run.args, run.torch
    raw = dict(model_keys(args), lr=LR, param_dtype="bfloat16", compute_dtype="bfloat16",
               mesh={"dp": 1, "fsdp": 1, "mp": 1})
    model_cfg = parse_config(raw, source="bench/accelerator.py").model
    init = jax.jit(lambda key: Transformer(model_cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"])
    params = nn.unbox(init(jax.random.key(3)))
    # Random weights give near-uniform next-token distributions where greedy choices hinge on rounding;
    # a larger output layer makes the choices clear enough to compare the two sides' tokens.
    head = params["lm_head"]
    params = dict(params, lm_head=dict(head, kernel=head["kernel"] * 20.0))
    tokenizer = IdTokenizer(args.vocab)
    generator = Generator(model_cfg, params, tokenizer, max_batch=max(args.gen_batches),
                          context=args.prompt_tokens + args.new_tokens)
    if run.torch_device is None:
        return generator, None
    flat = flatten_params(params)
    weights = {name: torch.from_numpy(np.asarray(array, np.float32))
               for name, array in hf_tensors(architecture_for(model_cfg), model_cfg,
                                             lambda path: np.asarray(flat[path]))}
    del flat, params
    model = hf_causal_lm(run, config_to_hf(model_cfg, tokenizer), args.hf_attention)
    model = model.to(torch.bfloat16).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    if unexpected or parameters & set(missing):
        raise RuntimeError(f"HF weights do not match: missing {sorted(parameters & set(missing))[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    del weights
    model.generation_config.eos_token_id = None  # decode every requested token, as ours does
    model.generation_config.suppress_tokens = None
    return generator, model


def section_generation(run: Run) -> None:
    from mesh_transformer.inference.text import SamplingParams

    args, torch = run.args, run.torch
    generator, model = generation_models(run)
    rows: list[dict] = []
    run.data["generation"] = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows,
                              "hf_attention": implementation_of(model) if model is not None else None}
    settings = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
    rng = np.random.default_rng(4)
    for batch in args.gen_batches:
        if not run.fits_budget(EXPECTED_S["generation"]):
            rows.append({"batch": batch, "note": "skipped: over the time budget"})
            run.note(f"generation batch {batch} skipped: over the time budget")
            continue
        prompts = rng.integers(1, args.vocab, (batch, args.prompt_tokens))
        ours_prompts = [list(map(int, p)) for p in prompts]

        def ours():
            return [c.tokens for c in generator.generate(ours_prompts, settings)]

        runners = {"ours": ours}
        if model is not None:
            ids = torch.from_numpy(prompts.astype(np.int64)).to(run.torch_device)

            def theirs():
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                         do_sample=False, pad_token_id=0)
                return out[:, ids.shape[1]:].tolist()

            runners["hf"] = theirs
        row = {"batch": batch}
        rows.append(row)
        try:
            outputs = {}
            for name, fn in runners.items():  # warmup: compilation, allocations
                started = time.perf_counter()
                outputs[name] = fn()
                row[f"{name}_first_s"] = time.perf_counter() - started
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.gen_repeats):  # interleaved
                for name, fn in runners.items():
                    started = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - started)
            for name in runners:
                row[f"{name}_tokens_per_s"] = batch * args.new_tokens / statistics.median(times[name])
            if "hf" in runners:
                row["ratio"] = row["ours_tokens_per_s"] / row["hf_tokens_per_s"]
                row["same_tokens"] = sum(a == b for a, b in zip(outputs["ours"], outputs["hf"])) / batch
            log(f"generation batch {batch}: ours {row['ours_tokens_per_s']:.0f} tokens/s"
                + (f", HF {row['hf_tokens_per_s']:.0f} tokens/s ({row['ratio']:.2f}x)" if "hf" in runners else ""))
        except Exception as e:
            traceback.print_exc()
            row["note"] = f"failed: {short(e)}"
        run.save()
    del generator, model
    empty_torch_cache(run)


# ----- report -----

def tflops(value: float | None) -> str:
    return f"{value / 1e12:.3g}" if value else "-"


def pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def fmt(value, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def render_section(run: Run, name: str) -> str:
    """Markdown for one section (its heading, table and notes), or a line saying why it is missing.
    ``hf-train`` and ``train`` share one table."""
    if name in ("hf-train", "train"):
        return render_train(run)
    title = {"peak": "Dense bf16 matmul peak", "attention": "Attention micro-benchmark", "generation": "Generation"}
    if name in run.data["skipped"]:
        return f"### {title[name]}\n\nskipped: {run.data['skipped'][name]}"
    return {"peak": render_peak, "attention": render_attention, "generation": render_generation}[name](run)


def render_peak(run: Run) -> str:
    p = run.data.get("peak")
    if not p:
        return "### Dense bf16 matmul peak\n\nnot measured (the section failed)"
    rows = [[f"jnp.dot {p['size']}x{p['size']} bf16 (measured, median)", tflops(p.get("jax"))]]
    if "torch" in p:
        rows.append([f"torch.matmul {p['size']}x{p['size']} bf16 (measured, median)", tflops(p["torch"])])
    if "datasheet" in p:
        rows.append([f"datasheet dense bf16 ({p['accelerator']}, mesh_transformer/hardware.py)", tflops(p["datasheet"])])
    else:
        rows.append([f"datasheet: {run.device.device_kind!r} is not in the table", "-"])
    return "### Dense bf16 matmul peak\n\n" + markdown_table(["source", "TFLOP/s"], rows)


def render_attention(run: Run) -> str:
    a = run.data.get("attention")
    if not a:
        return "### Attention micro-benchmark\n\nnot measured (the section failed)"
    s = a["shape"]
    rows = [[r["name"], fmt(r.get("forward_ms")), fmt(r.get("forward_tflops"), ".3g"), fmt(r.get("fwd_bwd_ms")),
             fmt(r.get("fwd_bwd_tflops"), ".3g"), fmt(r.get("max_abs_diff"), ".3g"), r.get("note", "")]
            for r in a["rows"]]
    head = (f"### Attention micro-benchmark\n\nCausal, batch {s['batch']}, seq {s['seq']}, {s['heads']} heads, "
            f"head_dim {s['head_dim']}, bf16; median of {run.args.attn_repeats}; TFLOP/s count the unmasked half "
            "(forward 2 matmuls, backward 5); diff: largest |output - attend's output|.\n\n")
    return head + markdown_table(["implementation", "forward ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
                                  "max abs diff", "note"], rows)


def memory_cell(r: dict) -> str:
    """State + the compiled step's temporaries (ours), or PyTorch's peak allocation (HF), in GiB."""
    if r.get("need_gib") is not None:
        return f"{r['state_gib']:.1f} + {r['need_gib']:.1f}"
    return fmt(r.get("peak_memory_gib"), ".1f")


def render_train(run: Run) -> str:
    args, data = run.args, run.data
    measured, datasheet = peaks(run)
    hf_row = data.get("hf_train") or {}
    ours_rows = data.get("train") or []
    n_params = next((r["n_params"] for r in ours_rows if "n_params" in r), hf_row.get("n_params"))
    fpt = flops_per_token(args, n_params) if n_params else None
    hf_tps = hf_row.get("tokens_per_s")

    def mfu(tps, peak):
        return tps * fpt / peak if tps and fpt and peak else None

    rows = []
    for r in ours_rows:
        tps = r.get("tokens_per_s")
        rows.append([f"ours, attention {r.get('attention')}" + (f" ({r['kernel']})" if r.get("kernel") else ""),
                     str(r.get("batch", "-")), fmt(r.get("step_s"), ".3f"), fmt(tps, ".0f"), pct(mfu(tps, measured)),
                     pct(mfu(tps, datasheet)), f"{tps / hf_tps:.2f}x" if tps and hf_tps else "-",
                     fmt(r.get("compile_s"), ".1f"), memory_cell(r),
                     "; ".join(filter(None, [", ".join(r.get("tried", [])), r.get("note", "")]))])
    if hf_row:
        label = f"HF GPTJForCausalLM (torch autocast bf16, {hf_row.get('attention', '?')})"
        rows.append([label, str(hf_row.get("batch", "-")), fmt(hf_row.get("step_s"), ".3f"), fmt(hf_tps, ".0f"),
                     pct(mfu(hf_tps, measured)), pct(mfu(hf_tps, datasheet)), "1.00x" if hf_tps else "-", "-",
                     fmt(hf_row.get("peak_memory_gib"), ".1f"),
                     "; ".join(filter(None, [", ".join(hf_row.get("tried", [])), hf_row.get("note", "")]))])
    if "train" in data["skipped"]:
        rows.insert(0, ["ours", "-", "-", "-", "-", "-", "-", "-", "-", "skipped: " + data["skipped"]["train"]])
    if "hf-train" in data["skipped"]:
        rows.append(["HF GPTJForCausalLM", "-", "-", "-", "-", "-", "-", "-", "-",
                     "skipped: " + data["skipped"]["hf-train"]])
    if not rows:
        return "### Training\n\nnot measured (the section failed)"
    shape = (f"layers {args.layers}, d_model {args.d_model}, heads {args.heads}, rotary {args.rotary}, vocab "
             f"{args.vocab}, seq {args.seq}; fp32 master weights, bf16 compute, remat {args.remat}; ")
    if n_params:
        shape += f"N = {n_params / 1e6:.1f} M non-embedding params incl. lm_head, {fpt / 1e9:.2f} GFLOP/token; "
    shape += (f"batch: the largest of {args.batches} that fits; median of {args.steps} steps after {args.warmup} "
              "warmup steps. HF: fp32 weights, AdamW" + (" (fused)" if hf_row.get("fused_adamw") else "")
              + ", grad clipping, same shapes, its own largest batch. Memory: ours = train state + the compiled "
              "step's temporaries (memory_analysis), HF = PyTorch's peak allocation.")
    if hf_row and n_params and hf_row.get("n_params") != n_params:
        shape += f" WARNING: HF has {hf_row['n_params']} non-embedding params, ours {n_params}."
    return "### Training\n\n" + shape + "\n\n" + markdown_table(
        ["runner", "batch", "step s", "tokens/s", "MFU vs measured", "MFU vs datasheet", "vs HF", "compile s",
         "memory GiB", "batches tried / notes"], rows)


def render_generation(run: Run) -> str:
    g = run.data.get("generation")
    if not g:
        return "### Generation\n\nnot measured (the section failed)"
    rows = [[str(r["batch"]), fmt(r.get("ours_tokens_per_s"), ".0f"), fmt(r.get("hf_tokens_per_s"), ".0f"),
             f"{r['ratio']:.2f}x" if "ratio" in r else "-", pct(r.get("same_tokens")),
             fmt(r.get("ours_first_s"), ".1f"), r.get("note", "")] for r in g["rows"]]
    head = (f"### Generation\n\nGreedy, {g['prompt_tokens']}-token prompts, {g['new_tokens']} new tokens, bf16 weights "
            f"shared through the project's HF conversion; HF `generate` with {g.get('hf_attention')} attention; median "
            f"of {run.args.gen_repeats} interleaved runs after a warmup run (its time: first-call s).\n\n")
    return head + markdown_table(["batch", "ours new tokens/s", "HF new tokens/s", "ours / HF", "same greedy tokens",
                                  "ours first-call s", "note"], rows)


def target_lines(run: Run) -> list[str]:
    """Issue 10's targets, which are for H100/H200-class GPUs at the full shapes: met or missed."""
    if run.platform != "gpu" or run.args.quick:
        return []
    _, datasheet = peaks(run)
    trained = [r for r in run.data.get("train") or [] if r.get("tokens_per_s")]
    lines = []
    if trained:
        best = max(trained, key=lambda r: r["tokens_per_s"])
        fpt = flops_per_token(run.args, best["n_params"])
        if datasheet:
            mfu = best["tokens_per_s"] * fpt / datasheet
            lines.append(f"training MFU >= {TARGETS['mfu']:.0%} of the datasheet peak: "
                         f"{'met' if mfu >= TARGETS['mfu'] else 'MISSED'} ({mfu:.1%}, attention {best['attention']})")
        hf_tps = (run.data.get("hf_train") or {}).get("tokens_per_s")
        if hf_tps:
            ratio = best["tokens_per_s"] / hf_tps
            lines.append(f"training >= {TARGETS['train_vs_hf']}x HF: "
                         f"{'met' if ratio >= TARGETS['train_vs_hf'] else 'MISSED'} ({ratio:.2f}x)")
    for r in (run.data.get("generation") or {}).get("rows", []):
        if "ratio" in r and r["batch"] in (1, 8):
            lines.append(f"generation >= {TARGETS['generation_vs_hf']}x HF at batch {r['batch']}: "
                         f"{'met' if r['ratio'] >= TARGETS['generation_vs_hf'] else 'MISSED'} ({r['ratio']:.2f}x)")
    return lines


def versions(run: Run) -> dict[str, str]:
    import jaxlib

    found = {"jaxlib": jaxlib.__version__}
    for name in ("flax", "optax", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except Exception:
            found[name] = "not installed"
    if run.torch is not None and run.torch.cuda.is_available():
        found["torch_cuda"] = str(run.torch.version.cuda)
    return found


def full_report(run: Run, command: str) -> str:
    args, data = run.args, run.data
    kind = run.device.device_kind
    lines = [f"\n## Accelerator: {kind} ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})\n",
             f"- command: `{command}`",
             f"- device: {jax_device_summary()}, measured on device 0"
             + (f"; {data['peak']['accelerator']} in mesh_transformer/hardware.py" if data.get("peak", {}).get("accelerator")
                else ""),
             f"- host: {machine_summary(**versions(run))}",
             f"- XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(none)'}; "
             f"XLA_PYTHON_CLIENT_PREALLOCATE={os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')}, "
             f"XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}",
             f"- total time {elapsed():.0f} s (budget {args.budget_s:.0f} s); per section: "
             + ", ".join(f"{k} {v} s" for k, v in data.get("section_s", {}).items()),
             ""]
    for name in ("peak", "attention", "train", "generation"):
        lines += [render_section(run, name), ""]
    targets = target_lines(run)
    if targets:
        lines += ["Targets (issue 10): " + "; ".join(targets) + ".", ""]
    if data["notes"]:
        lines += ["Notes:", *[f"- {n}" for n in data["notes"]], ""]
    return "\n".join(lines) + "\n"


# ----- command line -----

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p, layers=16, d_model=2048, heads=16, rotary=64, vocab=50400, seq=2048)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 8, 4, 2, 1],
                   help="per-device training batch sizes to try, largest first")
    p.add_argument("--attention", nargs="+", default=["flash", "xla"], choices=["auto", "xla", "flash"],
                   help='our training runs, one per value of the model config key "attention"')
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_with_no_batch_dims"])
    p.add_argument("--scan-unroll", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps per runner (after compiling)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per runner")
    p.add_argument("--hf-attention", default="sdpa", help="attn_implementation of the HF models (eager if refused)")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-repeats", type=int, default=2, help="timed generation runs per batch and side")
    p.add_argument("--attn-batch", type=int, default=4)
    p.add_argument("--attn-seq", type=int, default=2048)
    p.add_argument("--attn-heads", type=int, default=16)
    p.add_argument("--attn-head-dim", type=int, default=128)
    p.add_argument("--attn-repeats", type=int, default=10)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-repeats", type=int, default=20)
    p.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, help="sections not to run")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="a section (or batch size) that would end past this many seconds is skipped, with a note")
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of 3 steps of each training run here")
    p.add_argument("--out-dir", metavar="DIR", help="write the results so far to DIR/accelerator.json after each section")
    add_run_arguments(p)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.expected_scale = 1.0
    if args.quick:
        args.layers, args.d_model, args.heads, args.rotary, args.vocab, args.seq = 2, 64, 4, 8, 256, 64
        args.batches, args.warmup, args.steps = [4, 2], 1, 2
        args.gen_batches, args.prompt_tokens, args.new_tokens, args.gen_repeats = [1, 2], 8, 8, 1
        args.attn_batch, args.attn_seq, args.attn_heads, args.attn_head_dim, args.attn_repeats = 1, 128, 2, 32, 2
        args.matmul_size, args.matmul_repeats = 256, 3
        args.expected_scale = 0.1
    args.batches = sorted(set(args.batches), reverse=True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line(__file__, argv)
    run = Run(args)
    log(f"JAX devices: {jax_device_summary()}; device 0: {run.device.device_kind}")
    if run.platform == "cpu" and not args.quick:
        print("JAX sees no accelerator (only the CPU): the full run is for a GPU or TPU; use --quick on a CPU.",
              file=sys.stderr)
        return 2
    import torch

    run.torch = torch
    if run.platform == "gpu" and torch.cuda.is_available():
        run.torch_device = torch.device("cuda", 0)
        log(f"torch device: {torch.cuda.get_device_name(0)}")
    elif run.platform == "cpu":
        run.torch_device = torch.device("cpu")
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        run.note(f"torch has no CUDA device (JAX runs on {run.platform}): the Hugging Face runs are skipped")
    run.data.update(command=command, device=run.device.device_kind, platform=run.platform,
                    versions={"jax": jax.__version__, "torch": torch.__version__, **versions(run)},
                    shape=dict(model_keys(args), remat=args.remat))
    run.section("peak", section_peak)
    run.section("attention", section_attention)
    run.section("hf-train", section_hf_train)
    run.section("train", section_train)
    run.section("generation", section_generation)
    report = full_report(run, command)
    print(report, flush=True)
    run.data["report"] = report
    run.save()
    if not args.no_write:
        append_results(report, args.results)
        log(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
