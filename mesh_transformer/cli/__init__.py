"""Command-line entry points; each module parses arguments, calls the package, and reports.

Each module is a command (``hf`` and ``eval_harness`` are two), declared once in the command table,
``cli/commands.py``, with its console script (``mtj-...``), its original script at the top of a checkout
(``device_train.py``...) and its other spellings. This module holds what the commands share: options,
joining the hosts of a multi-host run, and how bad input ends a command.
"""

import argparse
import functools
import sys
from collections.abc import Callable

from mesh_transformer.errors import ConfigError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming which trained model a command loads: a config and one of its checkpoints."""
    parser.add_argument("--config", required=True, help="the model's JSON config")
    parser.add_argument("--checkpoint", default=None,
                        help="run directory or its step_N directory (default: the config's model_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that join this process to the other hosts of a multi-host run."""
    group = parser.add_argument_group(
        "multi-host", "every host runs this same command; on a Cloud TPU VM the hosts are found automatically, "
        "elsewhere give all three (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    group.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0, where the others join")
    group.add_argument("--num-processes", type=int, default=None, help="how many processes (hosts) take part")
    group.add_argument("--process-id", type=int, default=None, help="this process's rank, 0 .. num-processes - 1")


def join_distributed(args: argparse.Namespace) -> None:
    """Join the hosts named by ``add_distributed_arguments``' options (or found on a Cloud TPU VM).
    Raises ConfigError for an incomplete or inconsistent set of options."""
    from mesh_transformer.cluster import distributed_spec, initialize_distributed

    try:
        initialize_distributed(distributed_spec(args.coordinator_address, args.num_processes, args.process_id))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def one_line_errors(*errors: type[Exception], status: int = 2, hint: str = "", exits: bool = False):
    """Decorate a command's ``main(argv)``: bad input (one of ``errors``: a config, a data file, a
    checkpoint...) ends it with ``error: MESSAGE`` on one line of stderr, ``(hint)`` appended when
    given, and exit status ``status``, instead of a traceback. The status is returned, or with
    ``exits`` raised as SystemExit, as argparse does (the data commands always ended so)."""
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def reporting_main(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except errors as e:
                print(f"error: {e}" + (f" ({hint})" if hint else ""), file=sys.stderr)
                if exits:
                    raise SystemExit(status) from None
                return status
        return reporting_main
    return decorate
