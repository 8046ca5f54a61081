"""Training-loader throughput from gs:// (the GCS emulator) with a two-source mixture, per host. Not a test.

1. Starts the GCS emulator on 127.0.0.1 (``tests/gcs_emulator.py``, anonymous credentials) and writes
   two sources to a bucket: ``pile`` (``--pile-files`` files) and ``code`` (``--code-files``), each
   file ``--records`` records of ``--seq`` + 1 token ids drawn uniformly from [0, 50400) (GPT-J's
   vocabulary: mostly 3-byte varints, so records as large as real ones or larger).
2. Reads them as one host of a GPT-J-6B run on a v3-256 reads its data: mesh dp=32 x mp=8, so 32 data
   streams, of which the host reads one, ``--rows`` rows of ``--seq`` + 1 tokens per step, with
   ``train_set`` ``{"pile": 0.9, "code": 0.1}`` (``MixtureLoader``). For comparison, the same shape
   from the ``pile`` source alone (``TFRecordLoader``, a plain ``train_set``).
3. Reports tokens/s (``--rows`` x ``--seq`` per batch, as training counts them) over ``--batches``
   batches after the first, the time to the first batch (opening files, scanning record headers), and
   the ratio to what one v3-256 host consumes training GPT-J-6B: about 150k tokens/s over 32 hosts.
   Target: at least 20x.

    python bench/loader_throughput.py                 # about 1-2 min on 2 cores; appends to RESULTS.md
    python bench/loader_throughput.py --quick --no-write
"""

from __future__ import annotations

import argparse
import datetime
import time

from common import add_repo_to_path, add_run_arguments, append_results, command_line, machine_summary, markdown_table

add_repo_to_path()
import numpy as np  # noqa: E402

from mesh_transformer import storage  # noqa: E402
from mesh_transformer.data.loader import TFRecordLoader  # noqa: E402
from mesh_transformer.data.mixture import MixtureLoader  # noqa: E402
from mesh_transformer.data.tfrecord import open_writer  # noqa: E402
from tests.gcs_emulator import make_bucket, running_emulator  # noqa: E402

GPTJ_VOCAB = 50400
# GPT-J-6B on a v3-256: about 150k tokens/s over its 32 hosts (the figure), dp = 32 streams.
V3_256_TOKENS_PER_S = 150_000
V3_256_HOSTS = 32
TARGET_MULTIPLE = 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=8, help="rows per step per host")
    parser.add_argument("--streams", type=int, default=V3_256_HOSTS, help="data streams of the run (dp * fsdp)")
    parser.add_argument("--records", type=int, default=250, help="records per file")
    parser.add_argument("--pile-files", type=int, default=32)
    parser.add_argument("--code-files", type=int, default=32)
    parser.add_argument("--batches", type=int, default=600, help="timed batches")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.pile_files, args.code_files, args.batches = 200, 2, 1, 30
    return args


def write_source(root: str, name: str, files: int, records: int, seq: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(files):
        names.append(f"{name}_{i:05d}.tfrecords")
        with open_writer(f"{root}/{names[-1]}") as writer:
            for _ in range(records):
                writer.write_example({"text": rng.integers(0, GPTJ_VOCAB, seq + 1)})
    index = f"{root}/{name}.index"
    storage.write_text_atomic(index, "\n".join(names) + "\n")
    return index


def measure(make_loader, batches: int) -> tuple[float, float, float]:
    """Seconds to the first batch, seconds for ``batches`` more, and the share of rows of the first source."""
    start = time.perf_counter()
    with make_loader() as loader:
        first = next(loader)
        opened = time.perf_counter()
        pile_rows = total_rows = 0
        for _ in range(batches):
            batch = next(loader)
            total_rows += batch.tokens.shape[0] * batch.tokens.shape[1]
        elapsed = time.perf_counter() - opened
        if isinstance(loader, MixtureLoader):
            counts = loader.state().sources
            pile_rows = next(iter(counts.values())).rows
            total_rows = sum(s.rows for s in counts.values())
    del first
    return opened - start, elapsed, pile_rows / total_rows if pile_rows else 1.0


def main(argv=None) -> int:
    args = parse_args(argv)
    per_host_need = V3_256_TOKENS_PER_S / V3_256_HOSTS
    with running_emulator():
        bucket = make_bucket("loader-bench")
        t = time.perf_counter()
        pile = write_source(f"{bucket}/pile", "pile", args.pile_files, args.records, args.seq, seed=0)
        code = write_source(f"{bucket}/code", "code", args.code_files, args.records, args.seq, seed=1)
        written = time.perf_counter() - t
        fs, path = storage.filesystem(f"{bucket}/pile/pile_00000.tfrecords")
        size = fs.size(path)
        print(f"wrote {args.pile_files + args.code_files} files of {size / 2**20:.1f} MiB in {written:.1f} s", flush=True)
        shape = (1, args.rows)
        options = dict(seed=0, streams=args.streams, stream_range=(0, 1), n_vocab=GPTJ_VOCAB)
        runs = {
            "mixture pile 0.9 / code 0.1 (MixtureLoader)":
                lambda: MixtureLoader({pile: 0.9, code: 0.1}, args.seq + 1, shape, **options),
            "pile alone (TFRecordLoader)": lambda: TFRecordLoader(pile, args.seq + 1, shape, **options),
        }
        results = {}
        for name, make in runs.items():
            results[name] = measure(make, args.batches)
            first, elapsed, share = results[name]
            print(f"{name}: first batch {first:.2f} s, {args.batches * args.rows * args.seq / elapsed:,.0f} tokens/s, "
                  f"pile share {share:.3f}", flush=True)
    rows = []
    for name, (first, elapsed, share) in results.items():
        tokens_per_s = args.batches * args.rows * args.seq / elapsed
        rows.append([name, f"{tokens_per_s:,.0f}", f"{tokens_per_s / per_host_need:.0f}x", f"{first:.2f}",
                     f"{share:.3f}"])
    mixture_multiple = float(rows[0][2][:-1])
    verdict = "met" if mixture_multiple >= TARGET_MULTIPLE else "missed"
    report = "\n".join([
        f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: training-loader throughput from gs:// "
        "(GCS emulator), one v3-256 host's share of GPT-J-6B\n",
        f"- command: `{command_line(__file__, argv)}`",
        f"- machine: {machine_summary()} (2-core CPU, no accelerator); the emulator runs on the same cores",
        f"- data: `pile` {args.pile_files} files and `code` {args.code_files} files on `gs://` (emulator), "
        f"{args.records} records of {args.seq + 1} uniform ids in [0, {GPTJ_VOCAB}) per file ({size / 2**20:.1f} "
        f"MiB a file)",
        f"- loader: {args.streams} streams (dp=32, mp=8), this host reads stream 0: {args.rows} rows x "
        f"{args.seq + 1} tokens per step; {args.batches} timed batches after the first",
        f"- need: {V3_256_TOKENS_PER_S:,} tokens/s / {V3_256_HOSTS} hosts = {per_host_need:,.0f} tokens/s per host; "
        f"target {TARGET_MULTIPLE}x: **{verdict}** ({rows[0][2]} with the mixture)\n",
        markdown_table(["loader", "tokens/s", "x one host's need", "first batch s", "share of pile rows"], rows),
        "",
    ])
    print(report)
    if not args.no_write:
        append_results(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
