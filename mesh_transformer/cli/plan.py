"""``mtj-plan`` (also ``python -m mesh_transformer.plan``): will a config fit a TPU slice or GPUs, and how
fast might it train? (no accelerator needed)"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mesh_transformer.cli import one_line_errors
from mesh_transformer.errors import ConfigError
from mesh_transformer.log import setup_logging

EXAMPLES = """examples:
  mtj-plan --config configs/example_config.json --topology v3-8
  mtj-plan --config configs/6B_roto_256.json --topology v3-256 --json
  mtj-plan --config my.json --topology v5e-16 --suggest --write-config my_v5e.json
  mtj-plan --config my.json --gpu 8xh100-80gb
  mtj-plan --config configs/6B_lora.json --topology v2-8      # a LoRA fine-tune (docs/lora.md)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the JSON config to plan")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--topology", help="TPU slice: v2-8, v3-8, v3-256, v4-32, v5e-16 (v5litepod-16), v5p-8, v6e-8 "
                                          "(default: the config's \"slice\", or v3-{tpu_size})")
    where.add_argument("--gpu", help="GPU type, optionally with a count: h100-80gb, a100-40gb, h200, 8xh100-80gb "
                                     "(analytic: no GPU is compiled for)")
    parser.add_argument("--suggest", action="store_true",
                        help="search mesh, remat and micro-batch split for the fastest estimate that fits "
                             "(same global batch)")
    parser.add_argument("--write-config", metavar="OUT", help="with --suggest: write the suggested config here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def _target(args: argparse.Namespace, config):
    from mesh_transformer.plan import PlanError, intended_slice, parse_gpu, parse_target, parse_tpu

    if args.gpu:
        return parse_gpu(args.gpu)
    if args.topology:
        return parse_tpu(args.topology)
    name = intended_slice(config)
    if name is None:
        raise PlanError(f"{config.source} names no slice: give --topology (e.g. v3-8) or --gpu (e.g. h100-80gb)")
    return parse_target(name)


def _gib(value: float) -> str:
    return f"{value / 2**30:8.2f}"


def report(plan, title: str) -> str:
    m, e, t = plan.memory, plan.estimate, plan.config.train
    method = "XLA's TPU compiler (per device)" if m.source == "compiled" else "analytic model (per device; an estimate)"
    headroom = plan.headroom_bytes
    verdict = (f"FITS with {headroom / 2**30:.2f} GiB headroom ({headroom / plan.hbm_bytes:.0%} of HBM)" if plan.fits
               else f"DOES NOT FIT: {-headroom / 2**30:.2f} GiB over ({m.total / plan.hbm_bytes:.0%} of HBM)")
    lines = [
        title,
        f"  target    {plan.target.describe()}",
        f"  mesh      dp={plan.mesh_shape['dp']} fsdp={plan.mesh_shape['fsdp']} mp={plan.mesh_shape['mp']}, "
        f"remat {plan.config.model.remat}, {t.gradient_accumulation_steps} micro-batches of {t.per_replica_batch} "
        f"sequence(s) per replica",
        f"  precision {plan.precision}",
        f"memory, {method}:                GiB",
        f"  parameters                   {_gib(m.parameters)}",
        *([f"    of which the frozen base   {_gib(m.frozen)}"] if plan.config.lora else []),
        f"  optimizer state              {_gib(m.optimizer_state)}",
        f"  gradient accumulator         {_gib(m.gradients)}",
        f"  batch                        {_gib(m.batch)}",
        f"  activations and temporaries  {_gib(m.activations)}",
        f"  total                        {_gib(m.total)}",
        f"  HBM {'(as XLA counts it)' if plan.target.compiled else '(usable share)'}       {_gib(plan.hbm_bytes)}",
        f"  {verdict}",
        f"model FLOPs per step   {e.model_flops_per_step:.3e} ({'4N' if plan.config.lora else '6N'} + 12 x layers "
        "x d_model x seq per token, as the training MFU)",
    ]
    if plan.compile_seconds is not None:
        lines.append(f"compile time           {plan.compile_seconds:.1f} s")
    lines += [
        f"estimated step time    {e.step_seconds:.3f} s (compute {e.compute_seconds:.3f}, collectives "
        f"{e.communication_seconds:.3f}, optimizer {e.optimizer_seconds:.3f})",
        f"estimated tokens/s     {e.tokens_per_second:,.0f}",
        f"estimated MFU          {e.mfu:.1%}",
        "  (estimates: a roofline from published peak FLOP/s, HBM and interconnect bandwidth, collectives not",
        "   overlapped; an upper bound: real steps lose to matmul efficiency and element-wise work. docs/planning.md)",
    ]
    return "\n".join(lines)


FIX_HINT = ("  to fix: run again with --suggest (searches mesh, remat and micro-batches at the same global batch); "
            "or shard the optimizer state with \"mesh\": {\"fsdp\": N}, use remat \"full\", more micro-batches "
            "(smaller per_replica_batch), grad_accum_dtype \"bfloat16\", \"sequence_parallel\": true with mp > 1, "
            "\"attention\": \"flash\" for long sequences, or a larger slice")


def _plan_as_given(config, target, searching: bool):
    """The config's own plan, or (when a search follows) None and why its mesh cannot run on the target."""
    from mesh_transformer.plan import make_plan

    try:
        return make_plan(config, target), None
    except ConfigError as e:
        if not searching:
            raise
        return None, str(e)


def _write_config(source_path: str, plan, out: str) -> None:
    from mesh_transformer import storage
    from mesh_transformer.config import read_config_dict

    raw = read_config_dict(source_path)  # "extends" resolved: the written file may live elsewhere
    t = plan.config.train
    raw.update({"mesh": plan.mesh_shape, "remat": plan.config.model.remat, "per_replica_batch": t.per_replica_batch,
                "gradient_accumulation_steps": t.gradient_accumulation_steps, "slice": plan.target.name})
    storage.write_text_atomic(out, json.dumps(raw, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    # Compile-only TPU devices need no TPU; keep JAX itself on the CPU and libtpu off the metadata server.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")
    from mesh_transformer.plan import PlanError

    return one_line_errors(ConfigError, PlanError, FileNotFoundError)(plan_and_report)(args)


def plan_and_report(args: argparse.Namespace) -> int:
    """Plan the config (and search, with --suggest) and report; 0 when the config or a suggestion fits."""
    from mesh_transformer.models.registry import load_config
    from mesh_transformer.plan import suggest

    if args.write_config and not args.suggest:
        raise ConfigError("--write-config needs --suggest")
    config = load_config(args.config)
    target = _target(args, config)
    plan, problem = _plan_as_given(config, target, args.suggest)
    suggestion = suggest(config, target) if args.suggest else None
    if args.suggest and suggestion is None:
        print(f"error: no mesh, remat or micro-batch split of {args.config}'s global batch fits {target.name}; "
              "try a larger slice", file=sys.stderr)
    if suggestion is not None and args.write_config:
        _write_config(args.config, suggestion, args.write_config)
    if args.json:
        out = plan.as_json() if plan else {"target": target.name, "fits": False, "error": problem}
        if args.suggest:
            out["suggestion"] = suggestion.as_json() if suggestion else None
        print(json.dumps(out, indent=2))
    else:
        print_reports(args, config, target, (plan, problem), suggestion)
    return 0 if (plan is not None and plan.fits) or suggestion is not None else 1


def print_reports(args: argparse.Namespace, config, target, as_given: tuple, suggestion) -> None:
    """The text report of the config as given (or why it cannot run), the fix hint, and the suggestion."""
    from mesh_transformer.plan import global_sequences

    plan, problem = as_given
    if plan is None:
        print(f"as given: {problem}")
    else:
        print(report(plan, f"plan for {args.config}"))
    if plan is None or not plan.fits:
        print(FIX_HINT)
    if suggestion is not None:
        print()
        print(report(suggestion, f"suggested (fastest estimate that fits, same global batch of "
                                 f"{global_sequences(config, target.devices)} sequences)"))
        if args.write_config:
            print(f"wrote {args.write_config}")


if __name__ == "__main__":
    sys.exit(main())
