"""mesh_transformer.tpu: the tpu_setup scripts ship inside the package (a wheel carries them, the checkout
links them), and the slice logic: preparing a slice, and supervising a run launched on its worker 0.
The scripts' gcloud commands are tested in test_tpu_setup.py.
"""

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mesh_transformer
from mesh_transformer import tpu
from mesh_transformer.cluster import RetryLimitExceeded, RetryPolicy
from mesh_transformer.config import ConfigError
from mesh_transformer.tpu import TpuSlice, prepare_slice, setup_scripts_dir, train_from_outside
from tests.helpers import REPO

SCRIPTS = {"common.sh", "create_tpu.sh", "delete_tpu.sh", "install.sh", "launch.sh", "logs.sh", "start_ray.sh",
           "status.sh", "stop.sh"}
WHEEL_PREFIX = "mesh_transformer/tpu_setup/"


def test_the_scripts_are_found_inside_the_package():
    found = setup_scripts_dir()
    assert found.is_dir() and found.parent == Path(mesh_transformer.__file__).resolve().parent
    assert {p.name for p in found.glob("*.sh")} == SCRIPTS


def test_the_checkout_keeps_tpu_setup_as_a_link_to_the_package():
    link = REPO / "tpu_setup"
    assert link.is_symlink() and link.resolve() == setup_scripts_dir()


def test_install_finds_the_checkout_through_the_package_path():
    result = subprocess.run(["bash", str(setup_scripts_dir() / "install.sh"), "--name", "n", "--zone", "z",
                             "--dry-run"], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"+ git -C {REPO} archive")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources, so the build leaves nothing in the checkout."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "mesh_transformer", source / "mesh_transformer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("mesh_transformer-*.whl")
    return built


def test_a_wheel_carries_every_script_with_its_executable_bit(wheel):
    with zipfile.ZipFile(wheel) as archive:
        modes = {i.filename.removeprefix(WHEEL_PREFIX): i.external_attr >> 16 for i in archive.infolist()
                 if i.filename.startswith(WHEEL_PREFIX)}
    assert set(modes) == SCRIPTS
    for name, mode in modes.items():
        assert mode & stat.S_IXUSR == (setup_scripts_dir() / name).stat().st_mode & stat.S_IXUSR, name


def test_a_wheel_installs_a_console_script_for_every_command_of_the_table(wheel):
    from mesh_transformer.cli.commands import console_scripts

    with zipfile.ZipFile(wheel) as archive:
        [entry_points] = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        listed = {line.replace(" ", "") for line in archive.read(entry_points).decode().splitlines() if "=" in line}
    assert listed == {line.replace(" ", "") for line in console_scripts()}


def test_an_installed_wheel_finds_its_scripts_and_install_asks_for_a_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)

    def installed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={"PYTHONPATH": str(site), "PATH": os.environ["PATH"]})

    found = installed("-c", "from mesh_transformer.tpu import setup_scripts_dir as d; print(d())")
    scripts = Path(found.stdout.strip())
    assert scripts == site / "mesh_transformer" / "tpu_setup", found.stderr
    assert {p.name for p in scripts.glob("*.sh")} == SCRIPTS
    assert (scripts / "create_tpu.sh").stat().st_mode & stat.S_IXUSR
    # mtj-pod's plan runs the installed scripts; install.sh, which ships a checkout, says it needs one.
    plan = installed("-m", "mesh_transformer.cli.pod", "--config", str(REPO / "configs" / "tiny_cpu.json"), "--tpu",
                     "n", "--tpu_region", "z", "--tpu-type", "v3-8", "--dry-run")
    assert plan.returncode == 1 and "Traceback" not in plan.stderr, plan.stderr
    assert "+ gcloud compute tpus tpu-vm create n --zone=z --accelerator-type=v3-8" in plan.stdout
    assert "is not a git checkout" in plan.stderr
    assert plan.stderr.strip().splitlines()[-1] == (
        f"error: bash {scripts / 'install.sh'} --name n --zone z --dry-run exited with status 2")


def test_a_missing_script_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tpu, "setup_scripts_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match=r"status.sh not found: .* lacks its tpu_setup scripts"):
        TpuSlice("n", "z").state()


# ----- slice logic, against a stand-in for TpuSlice ------------------------------------------


class FakeSlice:
    """Records what would have run; ``launches`` are train.py's exit statuses and the state after each."""

    name, zone = "mtj", "europe-west4-a"

    def __init__(self, state: str, launches: list[tuple[int, str]] = ()):
        self.current, self.launches, self.calls = state, list(launches), []

    def state(self) -> str:
        return self.current

    def accelerator_type(self) -> str:
        return "v3-32"

    def create(self, tpu_type, provisioning):
        self.calls.append(("create", tpu_type, *provisioning))
        self.current = "READY"

    def delete(self):
        self.calls.append(("delete",))
        self.current = "NOT_FOUND"

    def install(self):
        self.calls.append(("install",))

    def start_ray(self, workers_only=False):
        self.calls.append(("start_ray",))

    def wait_until_ready(self):
        self.calls.append(("wait",))

    def launch(self, config, train_args):
        self.calls.append(("launch", config, *train_args))
        status, self.current = self.launches.pop(0)
        return status


def test_a_ready_slice_only_gets_ray_started():
    tpu_slice = FakeSlice("READY")
    prepare_slice(tpu_slice, None, [])
    assert tpu_slice.calls == [("wait",), ("start_ray",)]


def test_a_preempted_slice_is_recreated_as_the_type_it_had():
    tpu_slice = FakeSlice("PREEMPTED")
    prepare_slice(tpu_slice, None, ["--spot"])
    assert tpu_slice.calls == [("delete",), ("create", "v3-32", "--spot"), ("install",), ("start_ray",)]


def test_a_missing_slice_needs_a_type():
    with pytest.raises(ConfigError, match="there is no TPU slice 'mtj' in europe-west4-a: give --tpu-type"):
        prepare_slice(FakeSlice("NOT_FOUND"), None, [])
    tpu_slice = FakeSlice("NOT_FOUND")
    prepare_slice(tpu_slice, "v4-8", [])
    assert tpu_slice.calls == [("create", "v4-8"), ("install",), ("start_ray",)]


def outside(tpu_slice: FakeSlice, prepared: list):
    return train_from_outside(tpu_slice, "cfg.json", lambda first: ["--new"] if first else [],
                              lambda: prepared.append(tpu_slice.current), RetryPolicy(max_failures=1, backoff_s=0))


def test_from_outside_a_lost_slice_is_a_preemption_and_only_the_first_launch_is_new():
    tpu_slice, prepared = FakeSlice("READY", [(255, "PREEMPTED"), (1, "READY"), (0, "READY")]), []
    report = outside(tpu_slice, prepared)
    assert (report.attempts, report.preemptions, report.failures) == (3, 1, 1)
    assert prepared == ["READY", "PREEMPTED", "READY"]
    assert [c for c in tpu_slice.calls if c[0] == "launch"] == [("launch", "cfg.json", "--new"),
                                                                 ("launch", "cfg.json"), ("launch", "cfg.json")]


@pytest.mark.parametrize("status", [tpu.EXIT_CONFIG_ERROR, tpu.EXIT_GAVE_UP])
def test_from_outside_a_run_that_gave_up_is_not_retried(status):
    tpu_slice = FakeSlice("READY", [(status, "READY")])
    with pytest.raises(RetryLimitExceeded, match=f"train.py on worker 0 of mtj gave up \\(exit status {status}\\)"):
        outside(tpu_slice, [])
