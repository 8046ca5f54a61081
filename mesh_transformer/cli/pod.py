"""``train.py``: train on several hosts through Ray, recovering from failures and preemptions.

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
separate limits for failures and preemptions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mesh_transformer import storage
from mesh_transformer.log import setup_logging
from mesh_transformer.cluster import (
    AttemptResult,
    HostGroup,
    HostSpec,
    Outcome,
    RetryLimitExceeded,
    RetryPolicy,
    Supervisor,
    SupervisorReport,
    group_attempt,
    tpu_attached,
)
from mesh_transformer.config import ConfigError, parse_config

log = logging.getLogger(__name__)

# A local cluster only runs the host actors; its object store holds nothing large.
_LOCAL_OBJECT_STORE_BYTES = 100 << 20
# The gcloud commands live in the tpu_setup scripts of the checkout this package runs from.
TPU_SETUP = Path(__file__).resolve().parents[2] / "tpu_setup"
RAY_TOKEN_FILE = "~/.mtj-ray-token"  # written by tpu_setup/start_ray.sh on every worker
HOST_ACTOR_PID_FILE = "~/.mtj-host-actor.pid"  # read by tpu_setup/stop.sh
EXIT_CONFIG_ERROR, EXIT_GAVE_UP = 2, 3
_SLICE_POLL_S = 30
_SLICE_WAIT_S = 3600
_GONE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED")


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
    """The config as raw JSON, validated here so that a bad config fails before any host starts."""
    try:
        raw = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
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
    # Every host is on this machine: keep Ray on the loopback interface (Ray reads this when imported;
    # without it Ray registers the machine's network address even for a local cluster).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    # The actors must start with their device count set, before JAX loads in them.
    host = HostSpec(resources={"CPU": 1}, strategy="PACK", env_vars={
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_host}", "JAX_PLATFORMS": "cpu"})
    # SIGTERM ends this process through the finally below, which stops the local cluster with it.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    ray.init(num_cpus=args.local_hosts, include_dashboard=False, object_store_memory=_LOCAL_OBJECT_STORE_BYTES)
    options = train_options(args)
    try:
        supervisor = Supervisor(
            lambda: group_attempt(lambda: HostGroup(args.local_hosts, host, coordinator_host="127.0.0.1"),
                                  raw, args.config, options),
            policy=retry_policy(args))
        return supervisor.run()
    finally:
        ray.shutdown()


# ----- TPU VM slices ------------------------------------------------------------------------


class TpuSlice:
    """A Cloud TPU VM slice, managed through the tpu_setup scripts (the one place gcloud is spelled out)."""

    def __init__(self, name: str, zone: str, project: str | None = None, dry_run: bool = False,
                 internal_ip: bool = False):
        self.name, self.zone, self.dry_run = name, zone, dry_run
        self.common = ["--name", name, "--zone", zone, *(["--project", project] if project else []),
                       *(["--internal-ip"] if internal_ip else []), *(["--dry-run"] if dry_run else [])]

    def _script(self, script: str, *args: str, capture: bool = False,
                check: bool = True) -> subprocess.CompletedProcess:
        path = TPU_SETUP / script
        if not path.exists():
            raise ConfigError(f"{path} not found: run train.py --tpu from a checkout of this repository")
        command = ["bash", str(path), *self.common, *args]
        log.info("running %s", shlex.join(command))
        return subprocess.run(command, check=check, text=True, stdout=subprocess.PIPE if capture else None)

    def _query(self, *args: str) -> str:
        return self._script("status.sh", *args, capture=True).stdout.strip().splitlines()[-1]

    def state(self) -> str:
        return self._query()

    def accelerator_type(self) -> str:
        return self._query("--type")

    def create(self, tpu_type: str, provisioning: list[str]) -> None:
        self._script("create_tpu.sh", "--type", tpu_type, *provisioning)

    def delete(self) -> None:
        self._script("delete_tpu.sh")

    def install(self) -> None:
        self._script("install.sh")

    def start_ray(self, workers_only: bool = False) -> None:
        self._script("start_ray.sh", *(["--workers-only"] if workers_only else []))

    def launch(self, config: str, train_args: list[str]) -> int:
        """Run train.py on worker 0 in the foreground; its exit status."""
        return self._script("launch.sh", "--config", config, "--foreground", "--", *train_args, check=False).returncode

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + _SLICE_WAIT_S
        while (state := self.state()) != "READY":
            if state in _GONE_STATES or state == "NOT_FOUND" or time.monotonic() > deadline:
                raise RuntimeError(f"slice {self.name} is {state}, not READY")
            log.info("waiting for slice %s to be READY (now %s)", self.name, state)
            time.sleep(_SLICE_POLL_S)


def provisioning_flags(args: argparse.Namespace) -> list[str]:
    return ["--preemptible"] if args.preemptible else ["--spot"] if args.spot else []


def prepare_slice(tpu: TpuSlice, args: argparse.Namespace) -> None:
    """Make the slice READY with this package and Ray running: create or recreate it when needed."""
    state = tpu.state()
    created = state in _GONE_STATES or state == "NOT_FOUND"
    if state in _GONE_STATES:
        tpu_type = args.tpu_type or tpu.accelerator_type()
        log.warning("slice %s is %s: deleting and recreating it as %s", tpu.name, state, tpu_type)
        tpu.delete()
        tpu.create(tpu_type, provisioning_flags(args))
    elif state == "NOT_FOUND":
        if not args.tpu_type:
            raise ConfigError(f"there is no TPU slice {tpu.name!r} in {tpu.zone}: give --tpu-type to create it")
        tpu.create(args.tpu_type, provisioning_flags(args))
    else:
        tpu.wait_until_ready()
    if created:
        tpu.install()
    tpu.start_ray()


def forwarded_args(args: argparse.Namespace, first: bool) -> list[str]:
    """train.py's arguments for its run on worker 0 (--new only on the first attempt)."""
    forwarded = ["--max-failures", str(args.max_failures), "--max-preemptions", str(args.max_preemptions),
                 "--retry-backoff", str(args.retry_backoff)]
    if args.tune_model_path:
        forwarded += ["--tune-model-path", args.tune_model_path, *(["--fresh-opt"] if args.fresh_opt else [])]
    return forwarded + (["--new"] if args.new and first else [])


def run_from_outside(args: argparse.Namespace, policy: RetryPolicy) -> SupervisorReport:
    """Away from the slice: keep it alive, and run train.py on its worker 0 until the run finishes."""
    tpu = TpuSlice(args.tpu, args.tpu_region, args.project)
    launches = []

    def attempt() -> AttemptResult:
        status = tpu.launch(args.config, forwarded_args(args, first=not launches))
        launches.append(status)
        if status == 0:
            return AttemptResult(Outcome.FINISHED)
        if status in (EXIT_CONFIG_ERROR, EXIT_GAVE_UP):
            raise RetryLimitExceeded(f"train.py on worker 0 of {tpu.name} gave up (exit status {status}); see its log")
        state = tpu.state()
        if state != "READY":
            return AttemptResult(Outcome.PREEMPTED, f"slice {tpu.name} is {state}")
        return AttemptResult(Outcome.FAILED, f"train.py on worker 0 of {tpu.name} exited with status {status}")

    prepare_slice(tpu, args)
    return Supervisor(attempt, recover=lambda _: prepare_slice(tpu, args), policy=policy).run()


def connect_to_slice_ray() -> None:
    """Join the Ray cluster start_ray.sh started on this slice (token authentication)."""
    token = os.path.expanduser(RAY_TOKEN_FILE)
    if os.path.exists(token):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN_PATH", token)
    import ray

    ray.init(address="auto")


def wait_for_ray_hosts(n_hosts: int) -> None:
    import ray

    deadline = time.monotonic() + _SLICE_WAIT_S
    while (alive := int(ray.cluster_resources().get("tpu_host", 0))) < n_hosts:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {alive} of {n_hosts} hosts rejoined Ray within {_SLICE_WAIT_S} s")
        log.info("waiting for hosts to rejoin Ray: %d of %d", alive, n_hosts)
        time.sleep(_SLICE_POLL_S)


class StopFlag:
    """SIGTERM / Ctrl-C to the launcher: retry nothing more, but let the hosts save and exit first."""

    def __init__(self) -> None:
        self.requested = False
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        log.warning("%s received: no more retries once the hosts have stopped", signal.Signals(signum).name)


def run_on_slice(args: argparse.Namespace, raw: dict, policy: RetryPolicy) -> SupervisorReport:
    """On worker 0: one host actor per worker through Ray; after a lost host, wait for it to return."""
    import ray

    connect_to_slice_ray()
    # start_ray.sh returns once every worker has joined, so all hosts are here now.
    n_hosts = int(ray.cluster_resources().get("tpu_host", 0))
    if n_hosts == 0:
        raise ConfigError("no host of this slice has joined Ray: run tpu_setup/start_ray.sh first")
    log.info("%d hosts in slice %s", n_hosts, args.tpu)
    # Bringing a lost host back goes through gcloud from here: this VM's service account needs
    # permission to describe the slice and to ssh to its workers (else run train.py from outside).
    tpu = TpuSlice(args.tpu, args.tpu_region, args.project, internal_ip=True)
    host = HostSpec(resources={"tpu_host": 1}, env_vars={}, strategy="STRICT_SPREAD", pid_file=HOST_ACTOR_PID_FILE)
    options = train_options(args)

    def recover(result: AttemptResult) -> None:
        if result.outcome is Outcome.PREEMPTED:
            tpu.wait_until_ready()
            tpu.start_ray(workers_only=True)
            wait_for_ray_hosts(n_hosts)

    stop = StopFlag()
    return Supervisor(lambda: group_attempt(lambda: HostGroup(n_hosts, host), raw, args.config, options),
                      recover=recover, policy=policy, stop_requested=lambda: stop.requested).run()


def print_plan(args: argparse.Namespace) -> SupervisorReport:
    """--dry-run: the tpu_setup commands that set up a new slice and launch the run, without running any."""
    tpu = TpuSlice(args.tpu, args.tpu_region, args.project, dry_run=True)
    if args.tpu_type:
        tpu.create(args.tpu_type, provisioning_flags(args))
    tpu.install()
    tpu.start_ray()
    tpu.launch(args.config, forwarded_args(args, first=True))
    return SupervisorReport()


def run_tpu(args: argparse.Namespace, raw: dict, policy: RetryPolicy) -> SupervisorReport:
    if args.dry_run:
        return print_plan(args)
    if not tpu_attached():
        return run_from_outside(args, policy)
    if args.new:
        clear_run(raw, args.config)
    return run_on_slice(args, raw, policy)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    try:
        raw = read_config(args.config)
        if args.tpu is not None:
            report = run_tpu(args, raw, retry_policy(args))
        else:
            if args.new:
                clear_run(raw, args.config)
            report = run_local(args, raw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RetryLimitExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_GAVE_UP
    if args.dry_run:
        return 0
    status = "stopped" if report.stopped else "finished"
    print(f"{status} after {report.attempts} attempt(s): {report.failures} failure(s), "
          f"{report.preemptions} preemption(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
