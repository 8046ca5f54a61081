"""``scripts/create_finetune_tfrecords.py`` and ``mtj-create-tfrecords``: turn text documents into
mesh-transformer-jax TFRecords.

    create_finetune_tfrecords.py INPUT... NAME --output-dir DIR [options]

Each INPUT is a file, a folder (searched recursively), a URL prefix or a glob of .txt, .xz, .jsonl,
.jsonl.xz, .jsonl.zst, .json.zst or .tar.gz files; other files a folder or glob holds are skipped and
listed. A truncated or corrupt archive is an error naming it. With one INPUT and none of the sharding
options this writes DIR/NAME_{records}.tfrecords and, unless --no-index, DIR/NAME.index, as it always
did. With several INPUTs or any sharding option (--sharded, --workers, --ray, --shard-size-mb,
--unit-documents, --include-sets, --exclude-sets) it writes many shards, a manifest and the index
(docs/data.md). Bad input ends it with one line "error: ..." and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mesh_transformer.cli import one_line_errors
from mesh_transformer.log import setup_logging
from mesh_transformer.data.documents import PrepareError
from mesh_transformer.data.prepare import PrepareConfig, prepare_tfrecords
from mesh_transformer.data.sharded import ShardedConfig, prepare_sharded
from mesh_transformer.tokenizer import TokenizerError


SHARDING_OPTIONS = ("workers", "shard_size_mb", "unit_documents", "include_sets", "exclude_sets")


def _set_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated pile_set_name values, got {text!r}")
    return names


def add_sharding_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ShardedConfig(input_path="", name="")
    sharding = parser.add_argument_group("sharded output (docs/data.md)")
    sharding.add_argument("--sharded", action="store_true",
                          help="write shards, a manifest and the index even without the options below")
    sharding.add_argument("--workers", type=int, help="worker processes, each taking whole input files (default: 1)")
    sharding.add_argument("--ray", action="store_true",
                          help="run the input files as tasks on the Ray cluster of RAY_ADDRESS (else a local one)")
    sharding.add_argument("--shard-size-mb", type=float,
                          help=f"start a new shard once one reaches this size (default: {defaults.shard_size_mb:g})")
    sharding.add_argument("--unit-documents", type=int,
                          help=f"documents per work unit: the grain of resuming (default: {defaults.unit_documents})")
    sharding.add_argument("--include-sets", type=_set_names, default=None,
                          help="comma-separated meta.pile_set_name values to keep (default: all)")
    sharding.add_argument("--exclude-sets", type=_set_names, default=None,
                          help="comma-separated meta.pile_set_name values to leave out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize text documents and pack them into TFRecord files of seq-len + 1 token records.",
    )
    add_prepare_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The inputs, the output's name and every option; ``mtj-data prepare`` takes the same."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="a file, a folder searched recursively, a URL prefix or a glob")
    parser.add_argument("name", help="one file NAME_{number of records}.tfrecords, or shards NAME-*.tfrecords; "
                                     "and NAME.index")
    add_common_arguments(parser)
    add_sharding_arguments(parser)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PrepareConfig(input_path="", name="")
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
        help=f"tokens of documents held for shuffling: an input that fits is shuffled in the original "
             f"script's order, a larger one in bounded memory (default: {defaults.shuffle_buffer_tokens})",
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


def wants_shards(args: argparse.Namespace) -> bool:
    return args.sharded or args.ray or len(args.inputs) > 1 or any(
        getattr(args, option) is not None for option in SHARDING_OPTIONS)


def sharded_config_from_args(args: argparse.Namespace) -> ShardedConfig:
    base = config_from_args(args)
    chosen = {option: getattr(args, option) for option in SHARDING_OPTIONS if getattr(args, option) is not None}
    return ShardedConfig(**vars(base), inputs=tuple(args.inputs), use_ray=args.ray, **chosen)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(
        input_path=args.inputs[0],
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


@one_line_errors(PrepareError, TokenizerError, exits=True)
def prepare(args: argparse.Namespace) -> int:
    """One file and its index, or with ``wants_shards`` the sharded layout (``mtj-data prepare``)."""
    setup_logging()
    if args.verbose:
        # Only our own loggers: third-party debug output would bury the report of skipped documents.
        logging.getLogger("mesh_transformer").setLevel(logging.DEBUG)
    if wants_shards(args):
        prepare_sharded(sharded_config_from_args(args))
    else:
        prepare_tfrecords(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return prepare(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
