"""What the fused attention kernels and sequence parallelism change on TPU slices, in XLA's own
per-device memory figures (the planner compiles the real train step with libtpu; no TPU needed),
plus the planner's estimated step time and MFU for each. Appends the tables to bench/RESULTS.md.

    python bench/attention_memory.py [--quick] [--no-write]

Cases: a GPT-J-style model of about 1B parameters at seq 2048 (4 sequences per device) and 8192
(1 and 2) on a v5e-8 and a v4-8 with ``attention`` xla and flash; GPT-J-6B (configs/example_config.json) on a v3-8 with and without
``sequence_parallel``, at the shipped 1 x 16 split and at 4 x 4; the planner's estimates for GPT-J-6B
on v3-8 and v3-256 and the 1B model on v5e-8. ``--quick`` compiles one case.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_results, command_line, machine_summary, markdown_table  # noqa: E402
from mesh_transformer.hardware import GIB  # noqa: E402
from mesh_transformer.models.registry import load_config, parse_config  # noqa: E402
from mesh_transformer.plan import make_plan, parse_target  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPTJ_1B = dict(layers=16, d_model=2048, n_heads=16, n_vocab=50400, pe_rotary_dims=64, lr=1e-4, total_steps=1,
               tokenizer="gpt2", mesh={"dp": 1, "fsdp": -1, "mp": 1})


def one_billion(seq: int, attention: str, rows: int):
    """The ~1B model, fsdp over the whole slice, ``rows`` sequences per device and micro-batch."""
    return parse_config(dict(GPTJ_1B, seq=seq, attention=attention, per_replica_batch=rows), source=f"gptj-1b seq {seq}")


def gptj_6b(sequence_parallel: bool, rows: int, micro: int):
    config = load_config(str(CONFIGS / "example_config.json"))
    return config.replace(model=dataclasses.replace(config.model, sequence_parallel=sequence_parallel),
                          train=dataclasses.replace(config.train, per_replica_batch=rows,
                                                    gradient_accumulation_steps=micro))


def row(label: str, slice_name: str, config, *, compile: bool = True) -> list[str]:
    plan = make_plan(config, parse_target(slice_name), compile=compile)
    m, e = plan.memory, plan.estimate
    kernel = plan.precision.rsplit("attention kernel ", 1)[-1]
    cells = [label, slice_name, kernel, f"{m.activations / GIB:.2f}", f"{m.total / GIB:.2f}", f"{plan.hbm_bytes / GIB:.2f}",
             "yes" if plan.fits else "NO", f"{e.tokens_per_second:,.0f}", f"{e.mfu:.0%}"]
    print(" | ".join(cells), flush=True)
    return cells


HEADER = ["case", "slice", "kernel", "temporaries GiB", "total GiB/device", "HBM GiB", "fits", "est. tokens/s",
          "est. MFU"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    kernels, sp, estimates = [], [], []
    # (seq, sequences per device and micro-batch, slice)
    cases = [(2048, 4, "v5e-8")] if args.quick else [(2048, 4, "v5e-8"), (8192, 1, "v5e-8"), (8192, 2, "v5e-8"),
                                                     (2048, 4, "v4-8"), (8192, 2, "v4-8")]
    for seq, rows, slice_name in cases:
        for attention in ("xla", "flash"):
            kernels.append(row(f"GPT-J 1B, seq {seq}, {rows} x {seq} tokens/device, attention {attention}", slice_name,
                               one_billion(seq, attention, rows)))
    if not args.quick:
        for rows, micro in ((1, 16), (4, 4)):
            for on in (False, True):
                sp.append(row(f"GPT-J-6B, {rows} x {micro} micro-batches, sequence_parallel {str(on).lower()}", "v3-8",
                              gptj_6b(on, rows, micro)))
        for label, slice_name, config in (
                ("GPT-J-6B example_config.json", "v3-8", load_config(str(CONFIGS / "example_config.json"))),
                ("GPT-J-6B 6B_roto_256.json", "v3-256", load_config(str(CONFIGS / "6B_roto_256.json"))),
                ("GPT-J 1B, seq 2048, attention auto", "v5e-8", one_billion(2048, "auto", 4))):
            estimates.append(row(label, slice_name, config, compile=False))
    text = (f"\n## {time.strftime('%Y-%m-%d %H:%M')}: attention kernels and sequence parallelism on TPU slices "
            f"(XLA's TPU compiler, no TPU)\n\n- command: `{command_line(__file__)}`\n- machine: {machine_summary()}\n\n"
            f"Fused attention (splash kernel) vs the XLA path:\n\n{markdown_table(HEADER, kernels)}\n")
    if sp:
        text += f"\nSequence parallelism (residual stream split over mp = 8):\n\n{markdown_table(HEADER, sp)}\n"
        text += (f"\nEstimates only (the planner's roofline, not compiled here, not measured):\n\n"
                 f"{markdown_table(HEADER, estimates)}\n")
    text += ("\nMemory columns are XLA's figures for the compiled train step (temporaries = everything beyond "
             "parameters, optimizer state, gradient accumulator and batch). tokens/s and MFU are the planner's "
             "roofline estimates (docs/planning.md): upper bounds, not measurements.\n")
    if not args.no_write:
        append_results(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
