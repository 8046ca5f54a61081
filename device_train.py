"""Train or fine-tune a model from a JSON config in this process, also installed as ``mtj-train`` (see
docs/training.md; for Ray supervision on a pod, ``train.py``). Runs its entry in the command table,
mesh_transformer/cli/commands.py."""

import sys

from mesh_transformer.cli.commands import run

if __name__ == "__main__":
    sys.exit(run("python device_train.py"))
