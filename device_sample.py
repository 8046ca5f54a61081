"""Sample from a model: an interactive prompt loop, or --prompt / --prompt-file; also installed as
``mtj-sample`` (see docs/serving.md). Thin wrapper over mesh_transformer.cli.sample."""

import sys

from mesh_transformer.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
