"""Multi-host runs: joining JAX processes, Ray host actors, and supervision with retries.

* ``initialize_distributed`` joins this process to a multi-process JAX run (``jax.distributed``):
  from explicit arguments, from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``, or, on a Cloud TPU VM, from what JAX detects about the slice.
* ``HostGroup`` runs one Ray actor per host, each actor one JAX process of the same training run,
  all scheduled at once through a placement group.
* ``Supervisor`` runs attempts until one finishes, telling preemptions (a host went away, or the
  run was asked to stop by SIGTERM) from failures (anything else), each with its own retry limit.
* ``train_on_local_hosts`` puts them together on one machine. Cloud TPU slices are in ``tpu.py``.
"""

from __future__ import annotations

import enum
import glob
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor id of TPU chips


@dataclass(frozen=True)
class DistributedSpec:
    """Where process 0's coordinator listens, how many processes join, and which one this is."""

    coordinator_address: str
    num_processes: int
    process_id: int

    def __post_init__(self) -> None:
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator address {self.coordinator_address!r} must be HOST:PORT")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process id {self.process_id} must be in [0, num_processes={self.num_processes})")


def distributed_spec(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, environ: dict | None = None) -> DistributedSpec | None:
    """The explicit arguments if any is given, else the environment's; None when neither says anything."""
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError("give all of --coordinator-address, --num-processes and --process-id, or none")
        return DistributedSpec(coordinator_address, int(num_processes), int(process_id))
    environ = os.environ if environ is None else environ
    from_env = [environ.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)]
    if not any(from_env):
        return None
    if not all(from_env):
        raise ValueError(f"set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or none")
    return DistributedSpec(from_env[0], int(from_env[1]), int(from_env[2]))


def tpu_attached() -> bool:
    """True on a Cloud TPU VM: a TPU chip is on the PCI bus. Reads /sys only, never the network."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _bind_address(coordinator_address: str) -> str | None:
    """A loopback coordinator listens on loopback only; otherwise JAX's default (all interfaces)."""
    host = coordinator_address.rpartition(":")[0].strip("[]")
    try:
        return coordinator_address if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return "127.0.0.1:" + coordinator_address.rpartition(":")[2] if host == "localhost" else None


def initialize_distributed(spec: DistributedSpec | None = None, auto_detect_tpu: bool = True) -> None:
    """Join the JAX processes of this run; must come before any other JAX use in the process.

    With a spec, joins exactly that group. Without one, on a Cloud TPU VM, lets JAX find the slice's
    hosts itself (a one-host slice is a group of one); anywhere else the run is a single process.
    """
    import jax

    if spec is not None:
        log.info("joining %d JAX processes as process %d (coordinator %s)", spec.num_processes,
                 spec.process_id, spec.coordinator_address)
        jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id,
                                   coordinator_bind_address=_bind_address(spec.coordinator_address))
    elif auto_detect_tpu and tpu_attached():
        log.info("Cloud TPU detected: joining the slice's JAX processes")
        jax.distributed.initialize()
    else:
        return
    if jax.process_index() != 0:
        # Every host runs the same program; one copy of the progress log is enough.
        logging.getLogger().setLevel(logging.WARNING)


# ----- supervision ---------------------------------------------------------------------------


class Outcome(enum.Enum):
    FINISHED = "finished"
    PREEMPTED = "preempted"  # a host went away, or the run stopped on SIGTERM: not the run's fault
    FAILED = "failed"  # anything else: a crash, an error raised by the run, a host actor that died


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    max_failures: int = 3
    max_preemptions: int = 100
    backoff_s: float = 10.0  # between attempts: storage or network trouble often passes by itself


class RetryLimitExceeded(RuntimeError):
    pass


@dataclass
class SupervisorReport:
    attempts: int = 0
    failures: int = 0
    preemptions: int = 0
    stopped: bool = False


class Supervisor:
    """Runs ``attempt`` until it finishes; after a preemption or failure calls ``recover`` and retries.

    Every attempt resumes from the newest checkpoint (the training run always does), so retrying is
    all there is to recovering. Preemptions and failures are counted separately because preemptions
    are expected on preemptible capacity while repeated failures mean something is broken.
    """

    def __init__(self, attempt: Callable[[], AttemptResult], recover: Callable[[AttemptResult], None] = lambda _: None,
                 policy: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep,
                 stop_requested: Callable[[], bool] = lambda: False):
        self.attempt, self.recover, self.policy, self.sleep = attempt, recover, policy, sleep
        self.stop_requested = stop_requested
        self.report = SupervisorReport()

    def run(self) -> SupervisorReport:
        """Attempts until one finishes or a stop is requested; exceptions from ``attempt`` end the run."""
        while True:
            self.report.attempts += 1
            result = self.attempt()
            if result.outcome is Outcome.FINISHED:
                log.info("finished after %d attempt(s): %d failure(s), %d preemption(s)", self.report.attempts,
                         self.report.failures, self.report.preemptions)
                return self.report
            if self.stop_requested():
                log.warning("stopped as requested (%s); run the same command to continue", result.detail)
                self.report.stopped = True
                return self.report
            self._count(result)
            self.recover(result)
            log.info("retrying in %.0f s from the newest checkpoint", self.policy.backoff_s)
            self.sleep(self.policy.backoff_s)

    def _count(self, result: AttemptResult) -> None:
        if result.outcome is Outcome.PREEMPTED:
            self.report.preemptions += 1
            count, limit, kind = self.report.preemptions, self.policy.max_preemptions, "preemption"
        else:
            self.report.failures += 1
            count, limit, kind = self.report.failures, self.policy.max_failures, "failure"
        log.warning("%s %d (%d allowed): %s", kind, count, limit, result.detail)
        if count > limit:
            raise RetryLimitExceeded(f"giving up after {count} {kind}s (limit {limit}); last: {result.detail}")


# ----- Ray host actors -----------------------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    """What every host actor gets: resources for its placement-group bundle and environment variables
    that must be set before JAX starts in it (XLA_FLAGS, JAX_PLATFORMS)."""

    resources: dict[str, float]
    env_vars: dict[str, str]
    strategy: str  # placement-group strategy: STRICT_SPREAD puts one actor on each host of a pod
    pid_file: str | None = None  # where each actor writes its pid on its host, for tpu_setup/stop.sh


class HostActor:
    """One host of the run: one Ray actor process, one JAX process."""

    def describe(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def train(self, spec: DistributedSpec, raw_config: dict, source: str, options, pid_file: str | None) -> dict:
        """Runs in the actor's main thread, so SIGTERM (a preemption notice, stop.sh) saves a checkpoint."""
        from mesh_transformer.log import setup_logging

        setup_logging()
        if pid_file:
            with open(os.path.expanduser(pid_file), "w") as f:
                f.write(str(os.getpid()))
        initialize_distributed(spec)
        from mesh_transformer.models.registry import parse_config
        from mesh_transformer.training.run import train

        config = parse_config(raw_config, source=source)
        hooks = ()
        if config.run.eval_harness_tasks:  # lm-eval is optional: imported only when used
            from mesh_transformer.evaluation import harness_hook

            hooks = (harness_hook(config),)
        result = train(config, options, hooks)
        return {"start_step": result.start_step, "step": result.step, "interrupted": result.interrupted, "last_loss": result.last_loss}


class HostGroup:
    """N host actors scheduled together (a placement group), joined into one JAX run per attempt."""

    def __init__(self, n_hosts: int, host: HostSpec, coordinator_host: str | None = None,
                 start_timeout_s: float = 600.0):
        self.n_hosts, self.host, self.start_timeout_s = n_hosts, host, start_timeout_s
        self.coordinator_host = coordinator_host
        self._placement_group = None
        self.actors: list = []
        self.hosts: list[dict] = []

    def start(self) -> None:
        """Reserve every host at once, then start the actors; no JAX process starts before all can."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._placement_group = placement_group([dict(self.host.resources)] * self.n_hosts,
                                                strategy=self.host.strategy)
        ready, _ = ray.wait([self._placement_group.ready()], timeout=self.start_timeout_s)
        if not ready:
            raise TimeoutError(f"could not reserve {self.n_hosts} hosts with {self.host.resources} each "
                               f"within {self.start_timeout_s:.0f} s (cluster resources: {ray.cluster_resources()})")
        actor_class = ray.remote(HostActor)
        self.actors = [actor_class.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement_group, placement_group_bundle_index=i),
            runtime_env={"env_vars": dict(self.host.env_vars)},
            **_bundle_options(self.host.resources),
        ).remote() for i in range(self.n_hosts)]
        self.hosts = ray.get([a.describe.remote() for a in self.actors], timeout=self.start_timeout_s)
        # The address each host's Ray node registered with: on a pod, the host's internal IP.
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        for host in self.hosts:
            host["ip"] = addresses.get(host["node_id"], "?")
        for rank, host in enumerate(self.hosts):
            log.info("host %d of %d: pid %d on %s", rank, self.n_hosts, host["pid"], host["ip"])

    def _coordinator_address(self) -> str:
        import ray

        port = ray.get(self.actors[0].free_port.remote(), timeout=self.start_timeout_s)
        return f"{self.coordinator_host or self.hosts[0]['ip']}:{port}"

    def train(self, raw_config: dict, source: str, options) -> AttemptResult:
        """Train on every host until all finish or the first one fails."""
        import ray

        coordinator = self._coordinator_address()
        refs = [actor.train.remote(DistributedSpec(coordinator, self.n_hosts, rank), raw_config, source, options,
                                   self.host.pid_file) for rank, actor in enumerate(self.actors)]
        pending, results = list(refs), []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results.append(ray.get(done[0]))
            except ray.exceptions.RayActorError as e:
                return self._actor_died(refs.index(done[0]), e)
            except ray.exceptions.RayTaskError as e:
                return AttemptResult(Outcome.FAILED, f"host {refs.index(done[0])} raised {e.cause!r}")
        log.info("attempt ran from step %d to step %d", results[0]["start_step"], results[0]["step"])
        if any(r["interrupted"] for r in results):
            return AttemptResult(Outcome.PREEMPTED, f"the run stopped on a signal at step {results[0]['step']}")
        return AttemptResult(Outcome.FINISHED, f"step {results[0]['step']}")

    def _actor_died(self, rank: int, error: Exception) -> AttemptResult:
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        host = self.hosts[rank]
        if getattr(error, "preempted", False) or host["node_id"] not in alive:
            return AttemptResult(Outcome.PREEMPTED, f"host {rank} ({host['ip']}) went away")
        return AttemptResult(Outcome.FAILED, f"host actor {rank} (pid {host['pid']} on {host['ip']}) died")

    def teardown(self) -> None:
        """Kill every actor (a survivor would wait forever for its dead peers) and free the hosts."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._placement_group is not None:
            remove_placement_group(self._placement_group)
            self._placement_group = None


def _bundle_options(resources: dict[str, float]) -> dict:
    """Actor options asking for exactly its bundle's resources."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), "resources": custom}


def group_attempt(make_group: Callable[[], HostGroup], raw_config: dict, source: str, options) -> AttemptResult:
    """One attempt: start a fresh group (fresh processes), train, and always tear it down."""
    import ray

    group = make_group()
    try:
        group.start()
        return group.train(raw_config, source, options)
    except TimeoutError as e:  # the hosts could not all be reserved: some are missing
        return AttemptResult(Outcome.PREEMPTED, str(e))
    except ray.exceptions.RayError as e:  # an actor could not start
        return AttemptResult(Outcome.FAILED, f"starting the host actors failed: {e}")
    finally:
        group.teardown()


# A local cluster only runs the host actors; its object store holds nothing large.
_LOCAL_OBJECT_STORE_BYTES = 100 << 20


def train_on_local_hosts(n_hosts: int, devices_per_host: int, raw_config: dict, source: str, options,
                         policy: RetryPolicy) -> SupervisorReport:
    """The multi-host path without a pod: a local Ray cluster of ``n_hosts`` host actors on this machine,
    each with ``devices_per_host`` CPU devices, joined by ``jax.distributed`` on 127.0.0.1."""
    # Every host is on this machine: keep Ray on the loopback interface (Ray reads this when imported;
    # without it Ray registers the machine's network address even for a local cluster).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    # The actors must start with their device count set, before JAX loads in them.
    host = HostSpec(resources={"CPU": 1}, strategy="PACK", env_vars={
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_host}", "JAX_PLATFORMS": "cpu"})
    ray.init(num_cpus=n_hosts, include_dashboard=False, object_store_memory=_LOCAL_OBJECT_STORE_BYTES)
    try:
        return Supervisor(
            lambda: group_attempt(lambda: HostGroup(n_hosts, host, coordinator_host="127.0.0.1"),
                                  raw_config, source, options),
            policy=policy).run()
    finally:
        ray.shutdown()
