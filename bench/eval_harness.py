"""lm-evaluation-harness speed on this CPU: our adapter (``--model mesh_transformer``) vs the harness's
own Hugging Face model (``--model hf``, PyTorch) on the same weights. Not a test.

1. Trains a byte-level BPE tokenizer on generated text, builds a GPT-J with random weights in
   ``transformers`` (default: 4 layers, d_model 256, 8 heads, rotary 32, seq 256, vocabulary 4096),
   saves it and imports it with ``mesh_transformer.hf``, so both sides run the same fp32 weights.
2. Writes a multiple-choice task of ``--docs`` documents with ``--choices`` choices each (200
   loglikelihood requests by default; contexts of 40-120 words, choices of 2-8 words) as a local
   jsonl + YAML task.
3. Times ``lm_eval.simple_evaluate`` on it with each model at the same batch size, after loading:
   our first run (which includes compiling the few padded shapes) and the median of the later runs,
   and the harness's HF model (median of its runs). Checks that both give the same accuracy and
   per-request log-likelihoods within 1e-4.

    python bench/eval_harness.py                 # about 2 min on 2 cores; appends to RESULTS.md
    python bench/eval_harness.py --quick --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import (add_repo_to_path, add_run_arguments, add_shape_arguments, append_results, command_line,
                    machine_summary, markdown_table, use_one_cpu_device)

use_one_cpu_device()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

add_repo_to_path()
from mesh_transformer.convert.hf_import import import_hf  # noqa: E402
from mesh_transformer.evaluation import MeshTransformerLM  # noqa: E402

EOT = "<|endoftext|>"
TASK = "bench_mc"


# ----- data, tokenizer, model -----

def words(rng: np.random.RandomState, count: int) -> str:
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "an", "dor", "el", "is", "um", "qua"]
    return " ".join("".join(rng.choice(syllables, rng.randint(1, 4))) for _ in range(count))


def write_task(args, root: Path) -> list[str]:
    """A multiple-choice task in ``root`` reading an absolute-path jsonl; returns its texts."""
    rng = np.random.RandomState(0)
    docs = [{"question": words(rng, rng.randint(40, 121)),
             "choices": [" " + words(rng, rng.randint(2, 9)) for _ in range(args.choices)],
             "answer": int(rng.randint(args.choices))} for _ in range(args.docs)]
    (root / "bench_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "bench_mc.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'bench_mc.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return [d["question"] for d in docs] + [c for d in docs for c in d["choices"]]


def write_tokenizer(texts: list[str], vocab: int) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT)


def write_models(args, root: Path, texts: list[str]) -> tuple[Path, Path]:
    """The same random GPT-J as a Hugging Face directory and as our imported config."""
    tokenizer = write_tokenizer(texts, args.vocab)
    config = transformers.GPTJConfig(vocab_size=len(tokenizer), n_positions=args.seq, n_embd=args.d_model,
                                     n_layer=args.layers, n_head=args.heads, rotary_dim=args.rotary,
                                     eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(root / "hf"))
    tokenizer.save_pretrained(str(root / "hf"))
    import_hf(str(root / "hf"), str(root / "ours"), show_progress=False)
    return root / "hf", root / "ours" / "config.json"


# ----- timing -----

def timed_evaluation(model, task_manager: TaskManager, batch: int) -> tuple[float, dict]:
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=task_manager, batch_size=batch,
                                      bootstrap_iters=0, log_samples=True)
    return time.perf_counter() - started, results


def logprobs(results: dict) -> np.ndarray:
    return np.array([r[0] for s in results["samples"][TASK] for r in s["filtered_resps"]])


def report(args, command: str, requests: int, ours: list[float], theirs: list[float], loads, agreement) -> str:
    warm, reference = statistics.median(ours[1:]), statistics.median(theirs)
    rows = [("ours, first run (compiles)", ours[0]), (f"ours, median of {len(ours) - 1} later runs", warm),
            (f"harness `hf` model (PyTorch), median of {len(theirs)} runs", reference)]
    title = f"lm-evaluation-harness: our adapter vs the harness's `hf` model ({datetime.date.today().isoformat()})"
    machine = machine_summary(cores_note=" (nproc)", lm_eval=lm_eval.__version__)
    lines = [f"\n## {title}\n",
             f"Command: `{command}`  \nMachine: {machine}  \nLoad average before/after: "
             f"{loads[0]:.2f} / {loads[1]:.2f}\n",
             f"Model: GPT-J, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, rotary {args.rotary}, "
             f"seq {args.seq}, vocabulary {args.vocab} (byte-level BPE), fp32, random weights, one CPU device. "
             f"Task: multiple choice, {args.docs} documents x {args.choices} choices = {requests} loglikelihood "
             f"requests, batch size {args.batch} on both sides. Wall time of `simple_evaluate` after loading.\n",
             markdown_table(["runner", "seconds", "requests/s"],
                            [[name, f"{seconds:.2f}", f"{requests / seconds:.1f}"] for name, seconds in rows]),
             f"\nOurs (warm) vs hf: **{reference / warm:.2f}x** requests/s; with compilation: "
             f"{reference / ours[0]:.2f}x. {agreement}\n"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p, layers=4, d_model=256, heads=8, rotary=32, vocab=4096, seq=256)
    p.add_argument("--docs", type=int, default=50)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (ours: the first compiles)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.rotary, args.vocab, args.docs, args.repeats = 2, 64, 4, 8, 512, 8, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = command_line(__file__, argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf_dir, config = write_models(args, root, write_task(args, root))
        task_manager = TaskManager(include_path=str(root), include_defaults=False)
        ours_lm = MeshTransformerLM(str(config), batch_size=args.batch)
        hf_lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.batch)
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            seconds, mine = timed_evaluation(ours_lm, task_manager, args.batch)
            ours.append(seconds)
            seconds, reference = timed_evaluation(hf_lm, task_manager, args.batch)
            theirs.append(seconds)
        requests = len(logprobs(mine))
        diff = float(np.max(np.abs(logprobs(mine) - logprobs(reference))))
        same_acc = mine["results"][TASK]["acc,none"] == reference["results"][TASK]["acc,none"]
        agreement = f"Same accuracy: {'yes' if same_acc else 'NO'}; max log-likelihood difference {diff:.1e}."
        print(f"ours {ours}, hf {theirs}; {agreement}", flush=True)
    section = report(args, command, requests, ours, theirs, (load_before, os.getloadavg()[0]), agreement)
    print(section)
    if not args.no_write:
        append_results(section)


if __name__ == "__main__":
    main()
