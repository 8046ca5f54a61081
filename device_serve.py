"""Serve a model over HTTP: the original /complete plus an OpenAI-compatible API (see docs/serve.md)."""

import sys

from mesh_transformer.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
