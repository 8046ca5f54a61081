"""Export a checkpoint as a Hugging Face model, also installed as ``mtj-to-hf`` (see docs/conversion.md).
Thin wrapper over mesh_transformer.cli.to_hf."""

import sys

from mesh_transformer.cli.to_hf import main

if __name__ == "__main__":
    sys.exit(main())
