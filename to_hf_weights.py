"""Export a checkpoint as a Hugging Face model, also installed as ``mtj-to-hf`` (see docs/conversion.md). Runs
its entry in the command table, mesh_transformer/cli/commands.py."""

import sys

from mesh_transformer.cli.commands import run

if __name__ == "__main__":
    sys.exit(run("python to_hf_weights.py"))
