"""Command-line entry points; each module parses arguments, calls the package, and reports.

Each module is one command: a console script in pyproject.toml (``mtj-...``), and for the original
script names also a file at the top of a checkout (``device_train.py``...); its docstring names both.
"""

import argparse


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
    Raises ValueError for an incomplete or inconsistent set of options."""
    from mesh_transformer.cluster import distributed_spec, initialize_distributed

    initialize_distributed(distributed_spec(args.coordinator_address, args.num_processes, args.process_id))
