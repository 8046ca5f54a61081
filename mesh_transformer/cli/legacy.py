"""``mtj-convert-legacy`` (also ``python -m mesh_transformer.legacy``): convert an original
mesh-transformer-jax v1 checkpoint (full or slim) into a native step-0 checkpoint."""

from __future__ import annotations

import argparse
import sys

from mesh_transformer.checkpoints.legacy import LegacyCheckpointError
from mesh_transformer.config import ConfigError, MeshConfig
from mesh_transformer.convert.native import convert_legacy_checkpoint
from mesh_transformer.cli import one_line_errors
from mesh_transformer.log import setup_logging
from mesh_transformer.models.registry import load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mesh_transformer.legacy",
        description="Convert an original mesh-transformer-jax checkpoint (v1 layout, full or slim) into a native "
                    "checkpoint at step 0, ready for device_train.py --tune-model-path.")
    parser.add_argument("--input-ckpt", required=True, help="a step_N directory, or a run directory with meta.json")
    parser.add_argument("--config", required=True, help="JSON config describing the model (original keys)")
    parser.add_argument("--output-dir", required=True, help="where to write the native checkpoint (empty)")
    parser.add_argument("--mp", type=int, default=None,
                        help="tensor-parallel size of the new checkpoint's mesh (default: the config's mesh)")
    parser.add_argument("--legacy-shards", type=int, default=None,
                        help="shard count of the input (default: the number of shard_* directories)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


@one_line_errors(LegacyCheckpointError, FileNotFoundError, FileExistsError)
@one_line_errors(ConfigError, hint="--mp N sets the new mesh's tensor-parallel size")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    config = load_config(args.config)
    if args.mp is not None:
        config = config.replace(mesh=MeshConfig(dp=-1, fsdp=1, mp=args.mp))
    step = convert_legacy_checkpoint(args.input_ckpt, config, args.output_dir, legacy_shards=args.legacy_shards)
    print(f"wrote step {step} to {args.output_dir}; fine-tune with: python device_train.py --config {args.config} "
          f"--tune-model-path {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
