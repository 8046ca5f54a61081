"""``mtj-data`` (also ``python -m mesh_transformer.cli.data``): Pile-scale data preparation and its checks.

    mtj-data prepare INPUT... NAME --output-dir DIR [options]   # sharded, parallel, resumable (docs/data.md)
    mtj-data verify DIR/NAME.index     # re-read every shard, CRCs included, and compare with the manifest
    mtj-data stats DIR/NAME.index      # the per-shard, per-input and per-pile_set_name tables

``prepare`` takes the options of create_finetune_tfrecords.py and always writes the sharded layout.
``verify`` exits 1 and names each missing, truncated, damaged, duplicated or extra shard.
"""

from __future__ import annotations

import argparse
import sys

from mesh_transformer.cli import one_line_errors
from mesh_transformer.cli.create_tfrecords import add_prepare_arguments, prepare
from mesh_transformer.data.loader import read_index
from mesh_transformer.data.manifest import ManifestError, manifest_url, read_manifest, stats_text, verify
from mesh_transformer.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtj-data", description="Prepare, verify and count sharded tfrecord data.")
    commands = parser.add_subparsers(dest="command", required=True)
    sharded_prepare = commands.add_parser("prepare", help="tokenize inputs into shards, a manifest and an index")
    add_prepare_arguments(sharded_prepare)
    sharded_prepare.set_defaults(sharded=True)  # create_finetune_tfrecords.py --sharded
    for name, text in (("verify", "re-read every shard and check it against the manifest"),
                       ("stats", "print the manifest's tables")):
        command = commands.add_parser(name, help=text)
        command.add_argument("index", help="NAME.index of a sharded prepare (NAME.manifest.json sits next to it)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_verify(index_url: str) -> int:
    read_index(index_url)  # a missing or empty index is its own one-line error
    report = verify(index_url)
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if report.problems:
        print(f"verify failed: {len(report.problems)} problems in {index_url}", file=sys.stderr)
        return 1
    print(f"ok: {report.shards} shards, {report.records} records, {report.tokens} tokens match the manifest")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return prepare(args) if args.command == "prepare" else check(args)


@one_line_errors(ManifestError, FileNotFoundError, ValueError, status=1, exits=True)
def check(args: argparse.Namespace) -> int:
    """``verify`` or ``stats``."""
    setup_logging()
    if args.command == "verify":
        return run_verify(args.index)
    print(stats_text(read_manifest(manifest_url(args.index))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
