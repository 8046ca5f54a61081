"""``train.py`` and ``mtj-pod``: the pod launcher. Trains on several hosts through Ray, recovering from
failures and preemptions. (Single-host training is ``device_train.py`` / ``mtj-train``, in cli/train.py;
the training run itself is ``mesh_transformer.training.run``, its jitted steps ``training.steps``.)

Two ways to run it:

* ``--local-hosts N``: a local Ray cluster with N host actors on this machine, each with its own
  CPU devices (``--devices-per-host``), joined by ``jax.distributed`` on 127.0.0.1. For trying the
  multi-host path without a pod, and for tests.
* ``--tpu NAME --tpu_region ZONE``: the hosts of a Cloud TPU VM slice (see ``tpu_setup/`` and
  docs/pods.md). Run on the slice's worker 0, it drives the Ray cluster of the slice (head on worker
  0, one actor per host); run anywhere else (a laptop, Cloud Shell), it creates the slice if needed,
  installs this package and starts Ray on it, and runs itself on worker 0, recreating the slice
  after a preemption.

Either way a failed or preempted attempt is torn down and retried from the newest checkpoint, with
separate limits for failures and preemptions. The code is in ``mesh_transformer.cluster`` (hosts and
retries) and ``mesh_transformer.tpu`` (slices); this module parses the options and reports.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import subprocess
import sys

from mesh_transformer import storage
from mesh_transformer.cli import one_line_errors
from mesh_transformer.cluster import (
    RetryLimitExceeded,
    RetryPolicy,
    SupervisorReport,
    tpu_attached,
    train_on_local_hosts,
)
from mesh_transformer.config import ConfigError, read_config_dict
from mesh_transformer.log import setup_logging
from mesh_transformer.models.registry import parse_config
from mesh_transformer.tpu import (
    EXIT_CONFIG_ERROR,
    EXIT_GAVE_UP,
    TpuSlice,
    prepare_slice,
    train_from_outside,
    train_on_slice,
)

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON config (original mesh-transformer-jax keys)")
    parser.add_argument("--new", action="store_true",
                        help="start from scratch: delete the run's checkpoints and metrics first (not on retries)")
    parser.add_argument("--tune-model-path", default=None,
                        help="start a fine-tune at step 0 from this checkpoint (a run dir or its step_N dir)")
    parser.add_argument("--fresh-opt", action="store_true",
                        help="with --tune-model-path: start from a fresh optimizer state instead of the saved one")
    local = parser.add_argument_group("local hosts")
    local.add_argument("--local-hosts", type=int, default=None, help="run N host actors on this machine")
    local.add_argument("--devices-per-host", type=int, default=1, help="CPU devices each local host has (default 1)")
    tpu = parser.add_argument_group("TPU VM slice")
    tpu.add_argument("--tpu", default=None, help="name of the TPU VM slice")
    tpu.add_argument("--tpu_region", "--tpu-region", dest="tpu_region", default=None,
                     help="its zone, e.g. europe-west4-a")
    tpu.add_argument("--tpu-type", default=None,
                     help="accelerator type (e.g. v3-8, v4-32, v5litepod-16) to create a missing slice with")
    provisioning = tpu.add_mutually_exclusive_group()
    provisioning.add_argument("--preemptible", action="store_true", help="create the slice as preemptible (v2-v4)")
    provisioning.add_argument("--spot", action="store_true", help="create the slice as a Spot VM (all types)")
    tpu.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
    tpu.add_argument("--dry-run", action="store_true", help="print the commands a TPU run would execute, run nothing")
    retries = parser.add_argument_group("retries")
    retries.add_argument("--max-failures", type=int, default=RetryPolicy.max_failures,
                         help=f"give up after this many failures (default {RetryPolicy.max_failures})")
    retries.add_argument("--max-preemptions", type=int, default=RetryPolicy.max_preemptions,
                         help=f"give up after this many preemptions (default {RetryPolicy.max_preemptions})")
    retries.add_argument("--retry-backoff", type=float, default=RetryPolicy.backoff_s,
                         help=f"seconds to wait before retrying (default {RetryPolicy.backoff_s:.0f})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if (args.local_hosts is None) == (args.tpu is None):
        parser.error("give exactly one of --local-hosts N and --tpu NAME")
    if args.tpu is not None and not args.tpu_region:
        parser.error("--tpu needs --tpu_region (the slice's zone)")
    if args.local_hosts is not None and (args.local_hosts < 1 or args.devices_per_host < 1):
        parser.error("--local-hosts and --devices-per-host must be at least 1")
    if args.fresh_opt and not args.tune_model_path:
        parser.error("--fresh-opt only applies together with --tune-model-path")
    return args


def read_config(path: str) -> dict:
    """The config as raw JSON (what every host receives), validated here so that a bad config fails
    before any host starts."""
    raw = read_config_dict(path)
    parse_config(raw, source=path)
    return raw


def clear_run(raw: dict, source: str) -> None:
    """``--new``: remove what an earlier run left in the checkpoint directory."""
    run_dir = parse_config(raw, source=source).run.checkpoint_dir
    if not run_dir or not storage.exists(run_dir):
        return
    log.warning("--new: deleting everything under %s", run_dir)
    fs, path = storage.filesystem(run_dir)
    fs.rm(path, recursive=True)


def train_options(args: argparse.Namespace):
    from mesh_transformer.training.run import TrainOptions

    return TrainOptions(tune_model_path=args.tune_model_path, fresh_opt=args.fresh_opt, show_progress=False)


def retry_policy(args: argparse.Namespace) -> RetryPolicy:
    return RetryPolicy(max_failures=args.max_failures, max_preemptions=args.max_preemptions,
                       backoff_s=args.retry_backoff)


def run_local(args: argparse.Namespace, raw: dict) -> SupervisorReport:
    # SIGTERM ends the launcher through SystemExit, which train_on_local_hosts turns into stopping its
    # local Ray cluster on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    return train_on_local_hosts(args.local_hosts, args.devices_per_host, raw, args.config, train_options(args),
                                retry_policy(args))


def provisioning_flags(args: argparse.Namespace) -> list[str]:
    return ["--preemptible"] if args.preemptible else ["--spot"] if args.spot else []


def forwarded_args(args: argparse.Namespace, first: bool) -> list[str]:
    """train.py's arguments for its run on worker 0 (--new only on the first attempt)."""
    forwarded = ["--max-failures", str(args.max_failures), "--max-preemptions", str(args.max_preemptions),
                 "--retry-backoff", str(args.retry_backoff)]
    if args.tune_model_path:
        forwarded += ["--tune-model-path", args.tune_model_path, *(["--fresh-opt"] if args.fresh_opt else [])]
    return forwarded + (["--new"] if args.new and first else [])


def print_plan(args: argparse.Namespace) -> SupervisorReport:
    """--dry-run: the tpu_setup commands that set up a new slice and launch the run, without running any."""
    tpu = TpuSlice(args.tpu, args.tpu_region, args.project, dry_run=True)
    if args.tpu_type:
        tpu.create(args.tpu_type, provisioning_flags(args))
    tpu.install()
    tpu.start_ray()
    tpu.launch(args.config, forwarded_args(args, first=True))
    return SupervisorReport()


def run_tpu(args: argparse.Namespace, raw: dict) -> SupervisorReport:
    if args.dry_run:
        return print_plan(args)
    if not tpu_attached():
        tpu = TpuSlice(args.tpu, args.tpu_region, args.project)
        return train_from_outside(tpu, args.config, lambda first: forwarded_args(args, first),
                                  lambda: prepare_slice(tpu, args.tpu_type, provisioning_flags(args)),
                                  retry_policy(args))
    if args.new:
        clear_run(raw, args.config)
    # Bringing a lost host back goes through gcloud from here: this VM's service account needs
    # permission to describe the slice and to ssh to its workers (else run train.py from outside).
    tpu = TpuSlice(args.tpu, args.tpu_region, args.project, internal_ip=True)
    return train_on_slice(tpu, raw, args.config, train_options(args), retry_policy(args))


@one_line_errors(ConfigError, status=EXIT_CONFIG_ERROR)
@one_line_errors(RetryLimitExceeded, status=EXIT_GAVE_UP)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    raw = read_config(args.config)
    try:
        if args.tpu is not None:
            report = run_tpu(args, raw)
        else:
            if args.new:
                clear_run(raw, args.config)
            report = run_local(args, raw)
    except subprocess.CalledProcessError as e:  # a tpu_setup script failed; it printed why
        print(f"error: {shlex.join(e.cmd)} exited with status {e.returncode}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    status = "stopped" if report.stopped else "finished"
    print(f"{status} after {report.attempts} attempt(s): {report.failures} failure(s), "
          f"{report.preemptions} preemption(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
