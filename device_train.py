"""Train or fine-tune a model from a JSON config in this process, also installed as ``mtj-train`` (see
docs/training.md; for Ray supervision on a pod, ``train.py``). Thin wrapper over mesh_transformer.cli.train."""

import sys

from mesh_transformer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
