"""``device_sample.py`` and ``mtj-sample``: sample from a checkpoint.

Without --prompt / --prompt-file: the original's interactive loop ("Type input:", Ctrl-D to quit).
With them: prints each completion; under --json, one JSON object per prompt and line with
``prompt``, ``completion``, ``tokens``, ``logprobs`` and ``finish_reason``.

--prompt-file: a ``.jsonl`` file holds one prompt per line (a JSON string, or an object with a
"prompt" key); any other file is one prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mesh_transformer.cli import add_model_arguments, one_line_errors
from mesh_transformer.log import setup_logging
from mesh_transformer.config import ConfigError
from mesh_transformer.inference.engine import Generator, load_generator
from mesh_transformer.inference.text import MAX_TOP_LOGPROBS, Completion, SamplingParams
from mesh_transformer.models.registry import load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", default=None, help="prompts from a file (see above)")
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens per completion")
    parser.add_argument("--temperature", type=float, default=0.75, help="0 samples greedily")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0, help="0 turns it off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    parser.add_argument("--no-eos-stop", action="store_true", help="keep going after the end-of-text token")
    parser.add_argument("--logprobs", type=int, default=0,
                        help=f"with --json: alternatives listed per token (0-{MAX_TOP_LOGPROBS})")
    parser.add_argument("--num-samples", type=int, default=1, help="interactive mode: samples per input")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    item = json.loads(line)
                    prompts.append(item["prompt"] if isinstance(item, dict) else item)
        else:
            prompts.append(path.read_text(encoding="utf-8"))
    return prompts


def sampling_params(args: argparse.Namespace, seed: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=seed, stop=tuple(args.stop), stop_at_eos=not args.no_eos_stop,
                          logprobs=args.logprobs if args.json else None)


def completion_json(generator: Generator, prompt: str, completion: Completion) -> str:
    def entry(token: int, logprob: float) -> dict:
        return {"token": token, "text": generator.tokenizer.decode([token]), "logprob": logprob}

    logprobs = [dict(entry(lp.token, lp.logprob), top=[entry(t, v) for t, v in lp.top])
                for lp in completion.logprobs or []]
    return json.dumps({"prompt": prompt, "completion": completion.text, "tokens": completion.tokens,
                       "logprobs": logprobs, "finish_reason": completion.finish_reason}, ensure_ascii=False)


def run_batch(generator: Generator, args: argparse.Namespace, prompts: list[str]) -> None:
    completions = generator.generate(prompts, sampling_params(args, args.seed))
    for prompt, completion in zip(prompts, completions):
        print(completion_json(generator, prompt, completion) if args.json else completion.text, flush=True)


def interactive(generator: Generator, args: argparse.Namespace) -> None:
    while True:
        try:
            context = input("Type input: ")
        except EOFError:
            print()
            return
        started = time.time()
        seeds = [None if args.seed is None else args.seed + i for i in range(args.num_samples)]
        try:
            completions = generator.generate([context] * args.num_samples, [sampling_params(args, s) for s in seeds])
        except ValueError as e:
            print(f"error: {e}")
            continue
        for i, completion in enumerate(completions):
            print(f"sample {i}: {completion.text}")
        print(f"completion done in {time.time() - started:.2f}s")


@one_line_errors(ConfigError, FileNotFoundError, ValueError, KeyError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    prompts = read_prompts(args)
    sampling_params(args, args.seed)  # reject bad settings before loading the model
    generator = load_generator(load_config(args.config), args.checkpoint, args.step, max_batch=args.max_batch)
    if prompts:
        run_batch(generator, args, prompts)
    else:
        interactive(generator, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
