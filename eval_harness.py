"""Score a model on lm-evaluation-harness tasks (see --help). Thin wrapper over the package."""

import sys

from mesh_transformer.cli.eval_harness import main

if __name__ == "__main__":
    sys.exit(main())
