"""One JAX process of a multi-process test: reads one epoch of a training run's data the way the run
does (this process's block of streams) and writes the (file, record) ids it read as JSON.

Usage: python -m tests.multihost_reader CONFIG COORDINATOR NUM_PROCESSES PROCESS_ID OUTPUT
"""

import json
import sys

from mesh_transformer.cluster import DistributedSpec, initialize_distributed


def main(config_path: str, coordinator: str, num_processes: str, process_id: str, output: str) -> None:
    initialize_distributed(DistributedSpec(coordinator, int(num_processes), int(process_id)))
    from mesh_transformer.models.registry import load_config
    from mesh_transformer.training.run import TrainingRun

    config = load_config(config_path)
    run = TrainingRun(config)
    with run._loader(config.run.train_set, config.train.gradient_accumulation_steps, loop=False,
                     seed=config.train.seed) as loader:
        # Records of the test data start with (file, record) ids written by tests.test_multihost.
        ids = [row[:2] for batch in loader for row in batch.tokens.reshape(-1, batch.tokens.shape[-1]).tolist()]
        streams = list(loader.own_streams)
    run.close()
    with open(output, "w") as f:
        json.dump({"ids": ids, "streams": streams}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
