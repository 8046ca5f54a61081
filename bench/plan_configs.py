"""Plan every shipped config on the slice it names (XLA's TPU compiler, no TPU) and append the table
to bench/RESULTS.md. ``--quick`` plans only configs/example_config.json.

    python bench/plan_configs.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_results, command_line, machine_summary, markdown_table  # noqa: E402
from mesh_transformer.hardware import GIB  # noqa: E402
from mesh_transformer.models.registry import load_config  # noqa: E402
from mesh_transformer.plan import intended_slice, make_plan, parse_target  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    paths = [CONFIGS / "example_config.json"] if args.quick else sorted(CONFIGS.glob("*.json"))
    rows = []
    for path in paths:
        config = load_config(str(path))
        name = intended_slice(config)
        if name is None:
            continue  # tiny_cpu.json is for CPUs
        plan = make_plan(config, parse_target(name))
        e, t = plan.estimate, config.train
        rows.append([path.name, name, "x".join(str(plan.mesh_shape[a]) for a in ("dp", "fsdp", "mp")),
                     config.model.remat, f"{t.per_replica_batch}x{t.gradient_accumulation_steps}",
                     f"{plan.memory.total / GIB:.2f}", f"{plan.hbm_bytes / GIB:.2f}",
                     "yes" if plan.fits else "NO",
                     f"{plan.compile_seconds:.0f}" if plan.compile_seconds is not None else "analytic",
                     f"{e.tokens_per_second:,.0f}", f"{e.mfu:.0%}"])
        print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["config", "slice", "dp x fsdp x mp", "remat", "batch x micro", "GiB/device (XLA)",
                            "HBM GiB", "fits", "compile s", "est. tokens/s", "est. MFU"], rows)
    if not args.no_write:
        append_results(f"\n## {time.strftime('%Y-%m-%d %H:%M')}: planner, shipped configs on their slices\n\n"
                       f"- command: `{command_line(__file__)}`\n- machine: {machine_summary()} (no accelerator: "
                       f"XLA's TPU compiler via libtpu)\n\n{table}\n\nGiB/device is XLA's figure for the compiled "
                       "train step; tokens/s and MFU are the planner's roofline estimates (docs/planning.md), "
                       "not measurements.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
