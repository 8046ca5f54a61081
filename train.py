"""Train on a TPU pod slice or on local host actors through Ray (see docs/pods.md). Thin wrapper."""

import sys

from mesh_transformer.cli.pod import main

if __name__ == "__main__":
    sys.exit(main())
