"""``python -m mesh_transformer.plan``: the planner's command line (``mesh_transformer.cli.plan``)."""

import sys

from mesh_transformer.cli.plan import main

sys.exit(main())
