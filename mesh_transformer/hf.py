"""The original command path ``python -m mesh_transformer.hf`` (Hugging Face import/export); the code lives in
``mesh_transformer.convert.hf`` and the command line in ``mesh_transformer.cli.hf``."""

import sys

if __name__ == "__main__":
    from mesh_transformer.cli.hf import main

    sys.exit(main())
