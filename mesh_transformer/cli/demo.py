"""``mtj-demo`` (also ``python -m mesh_transformer.cli.demo``), the two-minute tour: train a tiny GPT-J
on CPU from Python's own standard-library source.

Builds a corpus from the stdlib ``.py`` files on this machine (no download), turns it into
tfrecords, trains ``configs/tiny_cpu.json`` with checkpoints and metrics under ``demo_run/``, and
prints a short sample. Running it again resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import sysconfig
from pathlib import Path

from mesh_transformer.log import setup_logging
from mesh_transformer import storage
from mesh_transformer.cli import one_line_errors
from mesh_transformer.cli.create_tfrecords import main as create_tfrecords
from mesh_transformer.errors import ConfigError, DataError
from mesh_transformer.models.registry import load_config
from mesh_transformer.training.run import TrainOptions, train
from mesh_transformer.inference.engine import load_generator
from mesh_transformer.inference.text import SamplingParams

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "tiny_cpu.json"
VAL_EVERY_NTH_FILE = 20


def stdlib_sources(max_bytes: int) -> list[Path]:
    """Python files of the standard library, sorted for reproducibility, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or not path.is_file():
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def write_corpus(files: list[Path], out: Path) -> None:
    """One JSON line per source file, in the lm_dataformat style the data tool reads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for path in files:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")


def prepare_data(data_dir: Path, seq: int, max_bytes: int) -> None:
    if (data_dir / "stdlib_train.index").exists() and (data_dir / "stdlib_val.index").exists():
        log.info("reusing prepared data in %s", data_dir)
        return
    files = stdlib_sources(max_bytes)
    split = {"val": files[::VAL_EVERY_NTH_FILE],
             "train": [f for i, f in enumerate(files) if i % VAL_EVERY_NTH_FILE]}
    for name, subset in split.items():
        corpus = data_dir / "corpus" / f"{name}.jsonl"
        write_corpus(subset, corpus)
        create_tfrecords([str(corpus), f"stdlib_{name}", "--output-dir", str(data_dir),
                          "--tokenizer", "bytes", "--seq-len", str(seq)])


def print_loss_summary(metrics_path: Path) -> None:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    val = [(r["step"], r["val/loss_stdlib"]) for r in records if "val/loss_stdlib" in r]
    if train:
        print(f"train loss: {train[0]:.3f} at step 1 -> {train[-1]:.3f} at step {len(train)} (nats per byte)")
    for step, loss in val:
        print(f"validation loss at step {step}: {loss:.3f}")


def print_sample(config_path: str, prompt: str, max_new_tokens: int, temperature: float) -> None:
    generator = load_generator(load_config(config_path), max_batch=1)
    settings = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
    completion = generator.generate([prompt], settings)[0]
    print(f"\n--- sample (temperature {temperature}) ---")
    print(prompt + completion.text)
    print("-----------------------")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo_run", help="where data, checkpoints and metrics go")
    parser.add_argument("--steps", type=int, default=None, help="override total_steps")
    parser.add_argument("--corpus-mb", type=float, default=6.0, help="how much stdlib source to use")
    parser.add_argument("--prompt", default="import os\n\n\ndef ")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 samples greedily")
    return parser.parse_args(argv)


@one_line_errors(ConfigError, DataError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    workdir = Path(args.workdir).resolve()
    raw = json.loads(DEMO_CONFIG.read_text())
    raw["model_dir"] = str(workdir / "checkpoints")
    raw["train_set"] = str(workdir / "data" / "stdlib_train.index")
    raw["val_set"] = {"stdlib": str(workdir / "data" / "stdlib_val.index")}
    if args.steps is not None:
        raw["total_steps"] = args.steps
        raw["anneal_steps"] = max(args.steps - raw["warmup_steps"], 0)
    config_path = workdir / "config.json"
    workdir.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(str(config_path), json.dumps(raw, indent=2) + "\n")
    prepare_data(workdir / "data", raw["seq"], int(args.corpus_mb * 2**20))
    result = train(load_config(str(config_path)), TrainOptions())
    metrics_path = workdir / "checkpoints" / "metrics.jsonl"
    print(f"trained to step {result.step}; metrics in {metrics_path}; "
          f"config in {config_path} (reuse it with: python device_train.py --config {config_path})")
    print_loss_summary(metrics_path)
    print_sample(str(config_path), args.prompt, max_new_tokens=96, temperature=args.temperature)
    return 0


if __name__ == "__main__":
    sys.exit(main())
