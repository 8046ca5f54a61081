"""The original command path ``python -m mesh_transformer.legacy`` (original-checkpoint conversion); the code lives in
``mesh_transformer.convert.legacy`` and the command line in ``mesh_transformer.cli.legacy``."""

import sys

if __name__ == "__main__":
    from mesh_transformer.cli.legacy import main

    sys.exit(main())
