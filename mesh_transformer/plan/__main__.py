"""``python -m mesh_transformer.plan``: the planner's command line (``mtj-plan`` in the command table,
``mesh_transformer.cli.commands``)."""

import sys

from mesh_transformer.cli.commands import run

sys.exit(run("python -m mesh_transformer.plan"))
