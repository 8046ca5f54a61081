"""The pod launcher, also installed as ``mtj-pod``: train on the hosts of a TPU pod slice, or on local host
actors, through Ray, retrying after failures and preemptions (see docs/pods.md). Single-host training is
``device_train.py``. Runs its entry in the command table, mesh_transformer/cli/commands.py."""

import sys

from mesh_transformer.cli.commands import run

if __name__ == "__main__":
    sys.exit(run("python train.py"))
