"""Score a model on lm-evaluation-harness tasks, also installed as ``mtj-eval-harness`` (see
docs/evaluation.md). Thin wrapper over mesh_transformer.cli.eval_harness."""

import sys

from mesh_transformer.cli.eval_harness import main

if __name__ == "__main__":
    sys.exit(main())
