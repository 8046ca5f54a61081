"""The original command path ``python -m mesh_transformer.hf`` (Hugging Face import/export): it runs the
command table's entry for that spelling (``mtj-hf``, in ``mesh_transformer.cli``); the code lives in
``mesh_transformer.convert``."""

import sys

if __name__ == "__main__":
    from mesh_transformer.cli.commands import run

    sys.exit(run("python -m mesh_transformer.hf"))
