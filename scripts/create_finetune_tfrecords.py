"""Turn text documents into TFRecords, under the original mesh-transformer-jax script name; also installed as
``mtj-create-tfrecords`` (see docs/training.md). Thin wrapper over mesh_transformer.cli.create_tfrecords."""

import os
import sys

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from mesh_transformer.cli.create_tfrecords import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
