"""Serve a model over HTTP: the original /complete plus an OpenAI-compatible API; also installed as
``mtj-serve`` (see docs/serving.md). Thin wrapper over mesh_transformer.cli.serve."""

import sys

from mesh_transformer.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
