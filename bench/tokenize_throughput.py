"""Tokenization throughput of the sharded prepare (``mtj-data prepare``), one worker vs two. Not a test.

1. Builds a Pile-format corpus (``--files`` ``jsonl.zst`` files, each line ``{"text", "meta":
   {"pile_set_name"}}``) from this Python's standard library: its modules' source and their docstrings
   as prose, about ``--megabytes`` MB of text in all.
2. Trains a GPT-2-sized byte-level BPE tokenizer (50,257 tokens, ``<|endoftext|>``) on part of it with
   ``tokenizers``, as GPT-2's was built (no download).
3. Times the tokenizer alone on the same documents: ``encode`` per document (a Python call each) vs
   ``encode_batch`` (the fast path prepare uses, 256 documents a call).
4. Times the whole prepare (read, decompress, tokenize, shuffle, pack, write shards, manifest) with
   ``--workers 1`` and with ``--workers 2``, checks both wrote identical shards, and reports tokens/s,
   tokens/s per worker and the ratio to what one host of a GPT-J-6B run on a v3-256 consumes (about
   150k tokens/s over 32 hosts).

    python bench/tokenize_throughput.py              # a few minutes on 2 cores; appends to RESULTS.md
    python bench/tokenize_throughput.py --quick --no-write
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from common import add_repo_to_path, add_run_arguments, append_results, command_line, machine_summary, markdown_table

add_repo_to_path()
import zstandard  # noqa: E402

from mesh_transformer.data.sharded import ShardedConfig, prepare_sharded  # noqa: E402
from mesh_transformer.tokenizer import load_tokenizer  # noqa: E402

V3_256_TOKENS_PER_S = 150_000  # GPT-J-6B on a v3-256, the figure
V3_256_HOSTS = 32
SETS = ("Pile-CC", "Github", "StackExchange", "FreeLaw")
EOT = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=24.0, help="text in the corpus")
    parser.add_argument("--files", type=int, default=8, help="input files (workers take whole files)")
    parser.add_argument("--vocab", type=int, default=50257)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.megabytes, args.files, args.vocab = 1.0, 2, 2000
    return args


def stdlib_documents(max_bytes: int) -> list[str]:
    """Standard-library modules as documents, sorted, repeated until ``max_bytes`` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*.py"))
             if "site-packages" not in p.parts and p.is_file()]
    documents, total = [], 0
    while total < max_bytes:
        for text in texts:
            documents.append(text)
            total += len(text.encode())
            if total >= max_bytes:
                break
    return documents


def write_corpus(folder: Path, documents: list[str], files: int) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        lines = (json.dumps({"text": text, "meta": {"pile_set_name": SETS[i % len(SETS)]}})
                 for i, text in enumerate(documents[f::files]))
        data = "".join(line + "\n" for line in lines).encode()
        (folder / f"{f:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))


def train_tokenizer(documents: list[str], vocab: int, path: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(documents[: max(1, len(documents) // 4)], trainer)
    backend.save(str(path))
    return str(path)


def time_encoding(tokenizer_path: str, documents: list[str]) -> dict[str, float]:
    """Tokens/s of the tokenizer alone: one call per document vs batches of 256."""
    tokenizer = load_tokenizer(tokenizer_path)
    start = time.perf_counter()
    tokens = sum(len(tokenizer.encode(text)) for text in documents)
    per_document = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    batched = sum(len(ids) for i in range(0, len(documents), 256) for ids in tokenizer.encode_batch(documents[i:i + 256]))
    assert batched == tokens
    return {"encode per document": per_document, "encode_batch (256 documents)": tokens / (time.perf_counter() - start)}


def time_prepare(corpus: Path, out: Path, tokenizer_path: str, workers: int) -> tuple[float, int]:
    config = ShardedConfig(input_path="", inputs=(str(corpus),), name="bench", output_dir=str(out),
                           tokenizer=tokenizer_path, seq_len=2048, workers=workers)
    start = time.perf_counter()
    summary = prepare_sharded(config)
    return time.perf_counter() - start, summary.tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    per_host_need = V3_256_TOKENS_PER_S / V3_256_HOSTS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        documents = stdlib_documents(int(args.megabytes * 1e6))
        write_corpus(root / "corpus", documents, args.files)
        start = time.perf_counter()
        tokenizer_path = train_tokenizer(documents, args.vocab, root / "tokenizer.json")
        print(f"{len(documents)} documents, {args.files} files; tokenizer trained in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        encoding = time_encoding(tokenizer_path, documents)
        print(", ".join(f"{name}: {rate:,.0f} tokens/s" for name, rate in encoding.items()), flush=True)
        prepares = {}
        for workers in (1, 2):
            prepares[workers] = time_prepare(root / "corpus", root / f"out{workers}", tokenizer_path, workers)
            seconds, tokens = prepares[workers]
            print(f"--workers {workers}: {tokens:,} tokens in {seconds:.1f} s", flush=True)
        comparison = filecmp.dircmp(root / "out1", root / "out2")
        identical = not comparison.diff_files and not comparison.left_only and not comparison.right_only
        assert prepares[1][1] == prepares[2][1]
    tokens = prepares[1][1]
    rows = [[name, f"{rate:,.0f}", "", f"{rate / per_host_need:.1f}x"] for name, rate in encoding.items()]
    for workers, (seconds, _) in prepares.items():
        rate = tokens / seconds
        rows.append([f"prepare --workers {workers}", f"{rate:,.0f}", f"{rate / workers:,.0f}",
                     f"{rate / per_host_need:.1f}x"])
    speedup = prepares[1][0] / prepares[2][0]
    report = "\n".join([
        f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: tokenization throughput of "
        "the sharded prepare, 1 vs 2 workers\n",
        f"- command: `{command_line(__file__, argv)}`",
        f"- machine: {machine_summary()} (no accelerator); `tokenizers` may use both cores even with one worker",
        f"- corpus: {len(documents)} Python standard-library modules as Pile-format documents, "
        f"{args.megabytes:g} MB of text in {args.files} `jsonl.zst` files; {tokens:,} tokens with a "
        f"{args.vocab:,}-token byte-level BPE trained here; seq 2048",
        f"- prepare: read, decompress, tokenize (`encode_batch`), shuffle, pack, write shards and manifest; "
        f"outputs of 1 and 2 workers byte-identical: **{identical}**; 2 workers / 1 worker: **{speedup:.2f}x**",
        f"- need: GPT-J-6B on a v3-256 consumes {V3_256_TOKENS_PER_S:,} tokens/s / {V3_256_HOSTS} hosts = "
        f"{per_host_need:,.0f} tokens/s per host\n",
        markdown_table(["what", "tokens/s", "tokens/s per worker", "x one host's need"], rows),
        "",
    ])
    print(report)
    if not args.no_write:
        append_results(report)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
