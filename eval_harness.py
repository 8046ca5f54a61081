"""Score a model on lm-evaluation-harness tasks, also installed as ``mtj-eval-harness`` (see docs/evaluation.md).
Runs its entry in the command table, mesh_transformer/cli/commands.py."""

import sys

from mesh_transformer.cli.commands import run

if __name__ == "__main__":
    sys.exit(run("python eval_harness.py"))
