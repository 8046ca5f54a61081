"""``to_hf_weights.py`` and ``mtj-to-hf`` (also ``mtj-hf export``): export a checkpoint as a Hugging Face
model directory (GPT-J, GPT-Neo, GPT-NeoX or LLaMA).

The architecture follows from the config (``architecture``, or ``pe: fixed`` for GPT-Neo, ``rotary_style:
neox`` for GPT-NeoX, otherwise GPT-J). The output loads with ``AutoModelForCausalLM.from_pretrained(OUTPUT_PATH)``.

A LoRA run (its config has "lora"; --input-ckpt is the run or one of its steps) exports as its base with
the adapters merged in (--lora merged, the default), or as the adapters alone in peft's format
(--lora adapter): ``peft.PeftModel.from_pretrained(base_model, OUTPUT_PATH)`` applies them to the base.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from mesh_transformer.checkpoints.store import BadCheckpoint
from mesh_transformer.cli import one_line_errors
from mesh_transformer.log import setup_logging
from mesh_transformer.config import ConfigError
from mesh_transformer.convert.hf_export import LORA_EXPORTS, OUTPUT_DTYPES, export_to_hf
from mesh_transformer.convert.safetensors import DEFAULT_MAX_SHARD_BYTES
from mesh_transformer.errors import ConversionError
from mesh_transformer.models.registry import load_config

log = logging.getLogger(__name__)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"1GiB"`` or a plain number (decimal units, as Hugging Face uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 2GB, 500MB or 1GiB")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").upper()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-ckpt", required=True,
                        help="a step_N checkpoint directory or a run directory (its newest step); a "
                             "mesh-transformer-jax v1 checkpoint also works")
    parser.add_argument("--config", required=True, help="the JSON config the checkpoint was trained with")
    parser.add_argument("--output-path", required=True,
                        help="output directory (local path or URL); new or empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="export into a non-empty --output-path: the weights, index and configs of an earlier "
                             "export there are replaced (other files are kept)")
    parser.add_argument("--dtype", default=None, choices=sorted(OUTPUT_DTYPES),
                        help="dtype of the written weights (default fp16, as the original exporter; a --lora "
                             "adapter: fp32, as peft keeps adapters)")
    parser.add_argument("--lora", default="merged", choices=LORA_EXPORTS,
                        help="a LoRA run: its base with the adapters merged in (default), or the adapter alone "
                             "in peft's format")
    parser.add_argument("--base-model", default=None,
                        help="--lora adapter: the base_model_name_or_path written into adapter_config.json "
                             "(default: the run's base checkpoint; e.g. a hub name or the base's HF export)")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                        help="largest safetensors file before starting another (default 2GB)")
    parser.add_argument("--cpu", action="store_true", help="accepted for compatibility; export always runs on the host")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


@one_line_errors(ConfigError, ConversionError, BadCheckpoint, FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    if args.cpu:
        log.info("--cpu has no effect: the export reads one tensor at a time on the host")
    config = load_config(args.config)
    summary = export_to_hf(args.input_ckpt, config, args.output_path, dtype=args.dtype,
                           max_shard_bytes=args.max_shard_size, show_progress=not args.no_progress,
                           lora_export=args.lora, base_model=args.base_model, overwrite=args.overwrite)
    print(f"wrote {summary.architecture} ({summary.tensors} tensors, {summary.dtype}, "
          f"{len(summary.files)} file(s)) to {summary.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
