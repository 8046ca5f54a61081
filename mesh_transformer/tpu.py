"""Cloud TPU VM slices: the ``tpu_setup`` scripts that manage them, and training on a slice through Ray.

gcloud is spelled out in one place only, the shell scripts in ``mesh_transformer/tpu_setup/``: package
data, so an installed package has them too (a checkout links them as ``tpu_setup/``). ``TpuSlice`` runs
them. Two ways to train on a slice, both retried by ``cluster.Supervisor``:

* ``train_from_outside``, away from the slice (a laptop, Cloud Shell): keep the slice alive and run
  ``train.py`` on its worker 0 until the run finishes, recreating the slice after a preemption.
* ``train_on_slice``, on worker 0: one Ray host actor per worker; after a lost host, wait for it.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

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
)
from mesh_transformer.config import ConfigError
from mesh_transformer.signals import StopRequest

log = logging.getLogger(__name__)

RAY_TOKEN_FILE = "~/.mtj-ray-token"  # written by tpu_setup/start_ray.sh on every worker
HOST_ACTOR_PID_FILE = "~/.mtj-host-actor.pid"  # read by tpu_setup/stop.sh
# train.py's exit statuses that retrying cannot help: a bad config, or it ran out of retries itself.
EXIT_CONFIG_ERROR, EXIT_GAVE_UP = 2, 3
GONE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED")
_SLICE_POLL_S = 30
_SLICE_WAIT_S = 3600


def setup_scripts_dir() -> Path:
    """The directory of the tpu_setup scripts, inside this package (a checkout or an installation)."""
    return Path(__file__).resolve().parent / "tpu_setup"


class TpuSlice:
    """A Cloud TPU VM slice, managed through the tpu_setup scripts (the one place gcloud is spelled out)."""

    def __init__(self, name: str, zone: str, project: str | None = None, dry_run: bool = False,
                 internal_ip: bool = False):
        self.name, self.zone, self.dry_run = name, zone, dry_run
        self.common = ["--name", name, "--zone", zone, *(["--project", project] if project else []),
                       *(["--internal-ip"] if internal_ip else []), *(["--dry-run"] if dry_run else [])]

    def _script(self, script: str, *args: str, capture: bool = False,
                check: bool = True) -> subprocess.CompletedProcess:
        path = setup_scripts_dir() / script
        if not path.exists():
            raise ConfigError(f"{path} not found: this installation of mesh-transformer lacks its tpu_setup "
                              "scripts (package data); reinstall it")
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
            if state in GONE_STATES or state == "NOT_FOUND" or time.monotonic() > deadline:
                raise RuntimeError(f"slice {self.name} is {state}, not READY")
            log.info("waiting for slice %s to be READY (now %s)", self.name, state)
            time.sleep(_SLICE_POLL_S)


def prepare_slice(tpu: TpuSlice, tpu_type: str | None, provisioning: list[str]) -> None:
    """Make the slice READY with this package and Ray running: create or recreate it when needed.

    ``tpu_type``: what to create a missing slice as (a preempted one keeps its type unless given);
    ``provisioning``: create_tpu.sh's ``--preemptible`` or ``--spot``, or nothing for on-demand.
    """
    state = tpu.state()
    created = state in GONE_STATES or state == "NOT_FOUND"
    if state in GONE_STATES:
        tpu_type = tpu_type or tpu.accelerator_type()
        log.warning("slice %s is %s: deleting and recreating it as %s", tpu.name, state, tpu_type)
        tpu.delete()
        tpu.create(tpu_type, provisioning)
    elif state == "NOT_FOUND":
        if not tpu_type:
            raise ConfigError(f"there is no TPU slice {tpu.name!r} in {tpu.zone}: give --tpu-type to create it")
        tpu.create(tpu_type, provisioning)
    else:
        tpu.wait_until_ready()
    if created:
        tpu.install()
    tpu.start_ray()


def train_from_outside(tpu: TpuSlice, config: str, train_args: Callable[[bool], list[str]],
                       prepare: Callable[[], None], policy: RetryPolicy) -> SupervisorReport:
    """Away from the slice: ``prepare`` it, then run train.py on its worker 0 until the run finishes,
    preparing the slice again after each lost attempt. ``train_args(first_attempt)``: train.py's arguments."""
    launches = []

    def attempt() -> AttemptResult:
        status = tpu.launch(config, train_args(not launches))
        launches.append(status)
        if status == 0:
            return AttemptResult(Outcome.FINISHED)
        if status in (EXIT_CONFIG_ERROR, EXIT_GAVE_UP):
            raise RetryLimitExceeded(f"train.py on worker 0 of {tpu.name} gave up (exit status {status}); see its log")
        state = tpu.state()
        if state != "READY":
            return AttemptResult(Outcome.PREEMPTED, f"slice {tpu.name} is {state}")
        return AttemptResult(Outcome.FAILED, f"train.py on worker 0 of {tpu.name} exited with status {status}")

    prepare()
    return Supervisor(attempt, recover=lambda _: prepare(), policy=policy).run()


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


def train_on_slice(tpu: TpuSlice, raw_config: dict, source: str, options, policy: RetryPolicy) -> SupervisorReport:
    """On worker 0: one host actor per worker through Ray; after a lost host, wait for it to return.

    ``tpu`` is this slice as worker 0 reaches it (``internal_ip=True``). SIGTERM or Ctrl-C stops the
    retries, after the hosts have saved a checkpoint and exited.
    """
    import ray

    connect_to_slice_ray()
    # start_ray.sh returns once every worker has joined, so all hosts are here now.
    n_hosts = int(ray.cluster_resources().get("tpu_host", 0))
    if n_hosts == 0:
        raise ConfigError("no host of this slice has joined Ray: run tpu_setup/start_ray.sh first")
    log.info("%d hosts in slice %s", n_hosts, tpu.name)
    host = HostSpec(resources={"tpu_host": 1}, env_vars={}, strategy="STRICT_SPREAD", pid_file=HOST_ACTOR_PID_FILE)

    def recover(result: AttemptResult) -> None:
        if result.outcome is Outcome.PREEMPTED:
            tpu.wait_until_ready()
            tpu.start_ray(workers_only=True)
            wait_for_ray_hosts(n_hosts)

    with StopRequest(then="no more retries once the hosts have stopped").installed() as stop:
        return Supervisor(lambda: group_attempt(lambda: HostGroup(n_hosts, host), raw_config, source, options),
                          recover=recover, policy=policy, stop_requested=lambda: bool(stop)).run()
