"""tpu_setup/: the gcloud commands each script runs (through --dry-run), shellcheck, and train.py --tpu
driving a (fake) slice through a preemption. Nothing here contacts Google Cloud: dry runs only print,
and the last test puts a fake ``gcloud`` first on PATH. The scripts are run by their documented path,
the checkout's tpu_setup/ link to mesh_transformer/tpu_setup/ (test_tpu.py checks the package side).
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from tests.training.test_run import REPO, write_config

SETUP = REPO / "tpu_setup"
NAME, ZONE = "mtj", "europe-west4-a"
SCRIPTS = sorted(SETUP.glob("*.sh"))


def dry_run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(SETUP / script), "--name", NAME, "--zone", ZONE, "--dry-run", *args],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The printed commands ("+ cmd args..."), split back into argument lists."""
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def tpu_vm_create(accelerator: str, version: str, *flags: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, f"--zone={ZONE}",
            f"--accelerator-type={accelerator}", f"--version={version}", *flags]


DESCRIBE_STATE = ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME, f"--zone={ZONE}", "--format=value(state)"]


@pytest.mark.parametrize("accelerator, provisioning, expected", [
    ("v3-8", [], tpu_vm_create("v3-8", "tpu-ubuntu2204-base")),
    ("v3-32", ["--preemptible"], tpu_vm_create("v3-32", "tpu-ubuntu2204-base", "--preemptible")),
    ("v4-32", ["--preemptible"], tpu_vm_create("v4-32", "tpu-ubuntu2204-base", "--preemptible")),
    ("v4-8", ["--spot"], tpu_vm_create("v4-8", "tpu-ubuntu2204-base", "--spot")),
    ("v5litepod-16", ["--spot"], tpu_vm_create("v5litepod-16", "v2-alpha-tpuv5-lite", "--spot")),
    ("v5p-8", [], tpu_vm_create("v5p-8", "v2-alpha-tpuv5")),
    ("v6e-8", ["--spot"], tpu_vm_create("v6e-8", "v2-alpha-tpuv6e", "--spot")),
])
def test_create_a_tpu_vm_for_each_generation(accelerator, provisioning, expected):
    assert commands(dry_run("create_tpu.sh", "--type", accelerator, *provisioning)) == [expected, DESCRIBE_STATE]


@pytest.mark.parametrize("accelerator, version", [
    ("v4-64", "tpu-ubuntu2204-base"), ("v5litepod-64", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-256", "v2-alpha-tpuv6e"),
])
def test_queued_resources_for_each_generation(accelerator, version):
    created = commands(dry_run("create_tpu.sh", "--type", accelerator, "--queued", "--spot", "--valid-until", "6h"))
    assert created[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", NAME, f"--node-id={NAME}",
                          f"--zone={ZONE}", f"--accelerator-type={accelerator}", f"--runtime-version={version}",
                          "--spot", "--valid-until-duration=6h"]


def test_an_explicit_version_and_project_are_passed_on():
    created = commands(dry_run("create_tpu.sh", "--type", "v4-8", "--version", "my-runtime", "--project", "proj"))
    assert created[0] == tpu_vm_create("v4-8", "my-runtime", "--project=proj")


@pytest.mark.parametrize("args, message", [
    (["--type", "v5litepod-8", "--preemptible"], "use --spot"),
    (["--type", "v4-8", "--queued", "--preemptible"], "use --spot"),
    (["--type", "v9-8"], "unknown accelerator type 'v9-8'"),
    ([], "--type is required"),
    (["--type", "v4-8", "--valid-until", "2h"], "only applies to --queued"),
])
def test_create_refuses_impossible_requests(args, message):
    result = dry_run("create_tpu.sh", *args, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_name_and_zone_are_required():
    result = subprocess.run(["bash", str(SETUP / "delete_tpu.sh"), "--zone", ZONE, "--dry-run"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--name NAME is required" in result.stderr


def test_delete_a_tpu_vm_or_a_queued_resource():
    assert commands(dry_run("delete_tpu.sh")) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, f"--zone={ZONE}", "--quiet"]]
    assert commands(dry_run("delete_tpu.sh", "--queued")) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", NAME, f"--zone={ZONE}", "--force", "--quiet"]]


def remote_texts(command: list[str]) -> list[str]:
    """The remote command, and each of its words (a quoted inner command such as bash -c's is one)."""
    try:
        return [command[-1], *shlex.split(command[-1])]
    except ValueError:  # not shell words on its own (an if/fi block): the text is enough
        return [command[-1]]


def ssh(workers: str, command_contains: str, found: list[list[str]]) -> None:
    prefix = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, f"--zone={ZONE}", f"--worker={workers}"]
    assert any(c[:8] == prefix and any(command_contains in t for t in remote_texts(c)) for c in found), (
        workers, command_contains, found)


def test_install_ships_the_committed_tree_to_every_worker():
    found = commands(dry_run("install.sh"))
    assert found[0][:3] == ["git", "-C", str(REPO)] and "archive" in found[0]
    assert found[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in found[1]
    ssh("all", "pip install --quiet -e ./mesh-transformer 'jax[tpu]' 'ray[default]>=2.60'", found)


def test_start_ray_puts_the_head_on_worker_0_and_joins_the_others():
    found = commands(dry_run("start_ray.sh"))
    assert found[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME, f"--zone={ZONE}",
                        "--format=value(networkEndpoints[0].ipAddress)"]
    ssh("0", "ray start --head --port=6379", found)
    ssh("all", "ray start --address=WORKER0_IP:6379", found)
    assert all("RAY_AUTH_MODE=token" in c[-1] for c in found if "ray start" in c[-1])
    rejoin = commands(dry_run("start_ray.sh", "--workers-only"))
    assert not any("--head" in c[-1] for c in rejoin)


def test_launch_runs_train_py_on_worker_0_and_follows_its_log():
    found = commands(dry_run("launch.sh", "--config", "cfg.json", "--", "--new"))
    assert found[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "cfg.json",
                        f"{NAME}:mesh-transformer/run_config.json", "--worker=0", f"--zone={ZONE}"]
    ssh("0", f"train.py --tpu {NAME} --tpu_region {ZONE} --config run_config.json --new", found)
    ssh("0", "tail -n +1 -F ~/train.log", found)


def test_launch_direct_runs_device_train_py_on_every_worker():
    found = commands(dry_run("launch.sh", "--config", "cfg.json", "--direct", "--no-tail", "--internal-ip"))
    ssh("all", "device_train.py --config run_config.json", found)
    assert all("--internal-ip" in c for c in found if "ssh" in c or "scp" in c)
    assert not any("tail" in c[-1] for c in found)


def test_logs_and_stop():
    ssh("2", "tail -n 200 -F ~/train.log", commands(dry_run("logs.sh", "--worker", "2")))
    found = commands(dry_run("stop.sh"))
    ssh("0", "kill -TERM -- -$(cat ~/train.pid)", found)
    ssh("all", "kill -TERM -- $(cat ~/.mtj-host-actor.pid)", found)
    ssh("all", "ray stop --force", found)
    assert not any("ray stop" in c[-1] for c in commands(dry_run("stop.sh", "--keep-ray")))


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (Debian: apt-get install -y shellcheck)")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120,
                            cwd=SETUP)
    assert result.returncode == 0, result.stdout


def test_train_py_dry_run_prints_the_whole_plan(tmp_path):
    config = write_config(tmp_path / "config.json", "gs://bucket/run", tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--tpu", NAME,
                             "--tpu_region", ZONE, "--tpu-type", "v3-8", "--preemptible", "--new", "--dry-run"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    found = commands(result)
    assert found[0] == tpu_vm_create("v3-8", "tpu-ubuntu2204-base", "--preemptible")
    ssh("0", "ray start --head", found)
    ssh("0", "train.py --tpu mtj --tpu_region europe-west4-a --config run_config.json --max-failures 3", found)
    assert "--new" in found[-1][-1]


FAKE_GCLOUD = r'''#!PYTHON
"""A stand-in for gcloud: logs its arguments; the slice's state lives in a file next to it."""
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
state_file = os.path.join(here, "state.json")
state = json.load(open(state_file))
args = sys.argv[1:]
with open(os.path.join(here, "calls.log"), "a") as log:
    log.write(json.dumps(args) + "\n")
def save():
    json.dump(state, open(state_file, "w"))
verb = args[3] if len(args) > 3 else ""
if verb == "describe":
    fmt = next(a for a in args if a.startswith("--format="))
    if state["state"] == "NOT_FOUND":
        sys.exit(1)
    print({"--format=value(state)": state["state"], "--format=value(acceleratorType)": "v3-32",
           "--format=value(networkEndpoints[0].ipAddress)": "10.0.0.2"}[fmt])
elif verb == "create":
    state["state"] = "READY"; save()
elif verb == "delete":
    state["state"] = "NOT_FOUND"; save()
elif verb == "ssh" and "train.py" in args[-1]:
    state["launches"] += 1; save()
    if state["launches"] == 1:  # the slice is preempted under the first run
        state["state"] = "PREEMPTED"; save()
        sys.exit(255)
'''


def test_train_py_recreates_a_preempted_slice_and_finishes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "state.json").write_text(json.dumps({"state": "READY", "launches": 0}))
    config = write_config(tmp_path / "config.json", "gs://bucket/run", tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--tpu", NAME,
                             "--tpu_region", ZONE, "--preemptible", "--retry-backoff", "0"],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished after 2 attempt(s): 0 failure(s), 1 preemption(s)" in result.stdout
    calls = [json.loads(line) for line in (bin_dir / "calls.log").read_text().splitlines()]
    verbs = [c[3] for c in calls]
    # Recreated with the type it had and the provisioning asked for, then set up again.
    delete_at, create_at = verbs.index("delete"), verbs.index("create")
    assert delete_at < create_at
    assert "--accelerator-type=v3-32" in calls[create_at] and "--preemptible" in calls[create_at]
    assert "scp" in verbs[create_at:] and sum("train.py" in c[-1] for c in calls if c[3] == "ssh") == 2
