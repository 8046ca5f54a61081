"""Serve a model over HTTP: the original /complete plus an OpenAI-compatible API; also installed as ``mtj-serve``
(see docs/serving.md). Runs its entry in the command table, mesh_transformer/cli/commands.py."""

import sys

from mesh_transformer.cli.commands import run

if __name__ == "__main__":
    sys.exit(run("python device_serve.py"))
