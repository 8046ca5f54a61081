"""The original command path ``python -m mesh_transformer.legacy`` (original-checkpoint conversion): it runs
the command table's entry for that spelling (``mtj-convert-legacy``, in ``mesh_transformer.cli``); the code
lives in ``mesh_transformer.checkpoints.legacy`` and ``mesh_transformer.convert.native``."""

import sys

if __name__ == "__main__":
    from mesh_transformer.cli.commands import run

    sys.exit(run("python -m mesh_transformer.legacy"))
