"""Export a checkpoint as a Hugging Face model (see mesh_transformer/cli/to_hf.py). Thin wrapper over the package."""

import sys

from mesh_transformer.cli.to_hf import main

if __name__ == "__main__":
    sys.exit(main())
