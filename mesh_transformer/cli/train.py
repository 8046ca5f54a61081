"""``device_train.py`` and ``mtj-train``: train or fine-tune from a JSON config in this process, resuming
from the latest checkpoint. One host, or one process per host of a multi-host run (--coordinator-address),
without Ray or retries; for those, the pod launcher ``train.py`` / ``mtj-pod`` (cli/pod.py). The training
run itself is ``mesh_transformer.training.run``; its jitted steps are in ``training.steps``."""

from __future__ import annotations

import argparse
import sys

from mesh_transformer.checkpoints.store import BadCheckpoint, CheckpointSaveFailed
from mesh_transformer.cli import add_distributed_arguments, join_distributed, one_line_errors
from mesh_transformer.log import setup_logging
from mesh_transformer.config import Config, ConfigError
from mesh_transformer.errors import DataError
from mesh_transformer.models.registry import load_config
from mesh_transformer.training.run import HookFactory, TrainingDiverged, TrainOptions, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON config (original mesh-transformer-jax keys)")
    parser.add_argument("--tune-model-path", default=None,
                        help="start a fine-tune at step 0 from this checkpoint (a run dir or its step_N dir)")
    parser.add_argument("--fresh-opt", action="store_true",
                        help="with --tune-model-path: start from a fresh optimizer state instead of the saved one")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_distributed_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def harness_hooks(config: Config) -> tuple[HookFactory, ...]:
    """The lm-evaluation-harness as a training hook, when the config lists eval_harness_tasks."""
    if not config.run.eval_harness_tasks:
        return ()
    from mesh_transformer.evaluation import harness_hook  # lm-eval is optional: imported only when used

    return (harness_hook(config),)


@one_line_errors(ConfigError, DataError, FileNotFoundError)
@one_line_errors(TrainingDiverged, CheckpointSaveFailed, BadCheckpoint, status=1)  # the run failed, not its input
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    if args.fresh_opt and not args.tune_model_path:
        raise ConfigError("--fresh-opt only applies together with --tune-model-path")
    join_distributed(args)
    config = load_config(args.config)
    result = train(config, TrainOptions(tune_model_path=args.tune_model_path, fresh_opt=args.fresh_opt,
                                        show_progress=not args.no_progress), harness_hooks(config))
    status = f"stopped at step {result.step}" if result.interrupted else f"finished at step {result.step}"
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    print(f"{status}{loss}; checkpoints in {config.run.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
