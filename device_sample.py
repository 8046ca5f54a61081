"""Sample from a model: an interactive prompt loop, or --prompt / --prompt-file; also installed as ``mtj-sample``
(see docs/serving.md). Runs its entry in the command table, mesh_transformer/cli/commands.py."""

import sys

from mesh_transformer.cli.commands import run

if __name__ == "__main__":
    sys.exit(run("python device_sample.py"))
