"""The pod launcher, also installed as ``mtj-pod``: train on the hosts of a TPU pod slice, or on local host
actors, through Ray, retrying after failures and preemptions (see docs/pods.md). Single-host training is
``device_train.py``. Thin wrapper over mesh_transformer.cli.pod."""

import sys

from mesh_transformer.cli.pod import main

if __name__ == "__main__":
    sys.exit(main())
