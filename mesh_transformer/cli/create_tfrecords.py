"""``scripts/create_finetune_tfrecords.py`` and ``mtj-create-tfrecords``: turn text documents into
mesh-transformer-jax TFRecords.

    create_finetune_tfrecords.py INPUT NAME --output-dir DIR [options]

INPUT is a file or a folder (searched recursively) of .txt, .xz, .jsonl, .jsonl.zst or .json.zst
files. Writes DIR/NAME_{records}.tfrecords and, unless --no-index, DIR/NAME.index.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mesh_transformer.log import setup_logging
from mesh_transformer.data.prepare import PrepareConfig, PrepareError, prepare_tfrecords
from mesh_transformer.tokenizer import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepareConfig(input_path="", name="")
    parser = argparse.ArgumentParser(
        description="Tokenize text documents and pack them into a TFRecord file of seq-len + 1 token records.",
    )
    parser.add_argument("input_path", help="a file, or a folder searched recursively")
    parser.add_argument("name", help="output file is NAME_{number of records}.tfrecords")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="output folder or URL (default: .)")

    cleaning = parser.add_argument_group("data cleaning")
    cleaning.add_argument("--normalize-with-ftfy", action="store_true", help="fix text with ftfy (NFKC)")
    cleaning.add_argument(
        "--normalize-with-wikitext-detokenize", action="store_true", help="undo WikiText tokenization"
    )
    cleaning.add_argument(
        "--min-unique-tokens", type=int, default=defaults.min_unique_tokens,
        help="skip documents with fewer unique tokens (EOS included); <= 0 disables (default: 0)",
    )
    cleaning.add_argument(
        "--treat-eot-as-text", action="store_true",
        help="do not split documents on the string '<|endoftext|>'",
    )

    packing = parser.add_argument_group("shuffling and packing")
    packing.add_argument(
        "--n-repack-epochs", type=int, default=defaults.n_repack_epochs,
        help="repeat the data N times, shuffled differently each time (default: 1)",
    )
    packing.add_argument("--seed", type=int, default=defaults.seed, help="shuffling seed (default: 10)")
    packing.add_argument("--preserve-data-order", action="store_true", help="do not shuffle")
    packing.add_argument(
        "--shuffle-buffer-tokens", type=int, default=defaults.shuffle_buffer_tokens,
        help=f"tokens of documents held for shuffling (default: {defaults.shuffle_buffer_tokens})",
    )
    packing.add_argument(
        "--seq-len", type=int, default=defaults.seq_len,
        help="model sequence length; records hold seq-len + 1 tokens (default: 2048)",
    )
    packing.add_argument(
        "--final-chunk", choices=("pad", "drop"), default=defaults.final_chunk,
        help="the last partial record: pad it with EOS and mask the padding (default), or drop it",
    )

    misc = parser.add_argument_group("miscellaneous")
    misc.add_argument(
        "--tokenizer", default=defaults.tokenizer,
        help="'bytes', a tokenizer.json, a tokenizer folder or a Hugging Face hub name (default: gpt2)",
    )
    misc.add_argument("--no-index", action="store_true", help="do not write DIR/NAME.index")
    misc.add_argument("--verbose", action="store_true", help="log each file read and each skipped document")
    return parser


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(
        input_path=args.input_path,
        name=args.name,
        output_dir=args.output_dir,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        normalize_with_ftfy=args.normalize_with_ftfy,
        normalize_with_wikitext_detokenize=args.normalize_with_wikitext_detokenize,
        min_unique_tokens=args.min_unique_tokens,
        n_repack_epochs=args.n_repack_epochs,
        seed=args.seed,
        preserve_data_order=args.preserve_data_order,
        treat_eot_as_text=args.treat_eot_as_text,
        final_chunk=args.final_chunk,
        write_index=not args.no_index,
        shuffle_buffer_tokens=args.shuffle_buffer_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.verbose:
        # Only our own loggers: third-party debug output would bury the report of skipped documents.
        logging.getLogger("mesh_transformer").setLevel(logging.DEBUG)
    try:
        prepare_tfrecords(config_from_args(args))
    except (PrepareError, TokenizerError) as e:
        parser.exit(1, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
