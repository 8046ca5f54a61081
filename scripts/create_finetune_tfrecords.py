"""Turn text documents into TFRecords, under the original mesh-transformer-jax script name; also installed as
``mtj-create-tfrecords`` (see docs/training.md). Runs its entry in the command table,
mesh_transformer/cli/commands.py."""

import os
import sys

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from mesh_transformer.cli.commands import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("python scripts/create_finetune_tfrecords.py"))
