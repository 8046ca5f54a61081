"""Train or fine-tune a model from a JSON config (see README). Thin wrapper over the package."""

import sys

from mesh_transformer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
