"""``eval_harness.py`` and ``mtj-eval-harness``: score a model on lm-evaluation-harness tasks, print the
harness's table and write its results JSON.

The model is a config and one of its checkpoints (native, imported from Hugging Face, or a
mesh-transformer-jax checkpoint), sharded on the config's mesh. Task names are checked before the
weights are loaded; ``--include-path`` adds a folder of task YAML files, as the harness's own
``--include_path`` does.

``lm_eval_main`` (the ``mtj-lm-eval`` command) is the harness's own command line with our model
registered, for every option of the harness: ``mtj-lm-eval --model mesh_transformer --model_args
config=CFG --tasks ... --batch_size 16``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys

import jax
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from mesh_transformer import storage
from mesh_transformer.cli import add_distributed_arguments, add_model_arguments, join_distributed, one_line_errors
from mesh_transformer.log import setup_logging
from mesh_transformer.config import ConfigError
from mesh_transformer.evaluation import DEFAULT_BATCH_SIZE, MeshTransformerLM, check_task_names
from mesh_transformer.models.registry import load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated harness task names (or task YAML paths)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task: a count, or a fraction below 1 (for quick checks only)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="sequences scored or decoded together")
    parser.add_argument("--include-path", default=None, help="a folder of extra task YAML files")
    parser.add_argument("--output", default=None, help="write the harness's results JSON here (path or URL)")
    parser.add_argument("--log-samples", action="store_true",
                        help="with --output: also write every document's requests and responses")
    add_distributed_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.log_samples and not args.output:
        parser.error("--log-samples needs --output (the samples are written into the results JSON)")
    return args


def task_list(text: str) -> list[str]:
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    return tasks


def start_pools_without_fork() -> None:
    """The harness computes standard errors in a multiprocessing pool. A child forked from a process
    running JAX's threads can deadlock, so the pool's processes start from a fork server instead."""
    multiprocessing.set_start_method("forkserver", force=True)


@one_line_errors(ConfigError, FileNotFoundError, ValueError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    start_pools_without_fork()
    join_distributed(args)
    tasks = task_list(args.tasks)
    task_manager = TaskManager(include_path=args.include_path)
    check_task_names(tasks, task_manager, "--tasks")
    lm = MeshTransformerLM(load_config(args.config), args.checkpoint, args.step, batch_size=args.batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=args.num_fewshot,
                              limit=args.limit, batch_size=args.batch_size, log_samples=args.log_samples)
    if jax.process_index() == 0:  # every host computed the same results; one reports them
        report(results, args.output)
    return 0


def report(results: dict, output: str | None) -> None:
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if output:
        storage.write_text_atomic(output, json.dumps(results, indent=2, default=handle_non_serializable,
                                                     ensure_ascii=False) + "\n")
        print(f"results written to {output}")


def lm_eval_main() -> None:
    """The harness's command line (``lm-eval``), with ``--model mesh_transformer`` available: importing
    ``mesh_transformer.evaluation`` above registered it (the harness has no plugin mechanism for models)."""
    from lm_eval.__main__ import cli_evaluate

    start_pools_without_fork()
    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
