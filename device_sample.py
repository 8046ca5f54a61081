"""Sample from a model: an interactive prompt loop, or --prompt / --prompt-file (see --help)."""

import sys

from mesh_transformer.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
