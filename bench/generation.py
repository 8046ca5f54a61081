"""Generation speed on this CPU: our KV-cache decoding vs Hugging Face ``generate``, and the HTTP
server's throughput with concurrent clients vs one client at a time. Not a test.

1. Builds a GPT-J-shaped model with random weights (default: 6 layers, d_model 512, 8 heads, rotary
   64, the GPT-J vocabulary 50400, seq 512), saves it as a native checkpoint and exports that to
   Hugging Face format in fp32 (``mesh_transformer.hf``), so both sides run the same weights.
2. Greedy decoding of ``--new-tokens`` tokens after ``--prompt-tokens``-token prompts, at each
   ``--batch`` size: ``Generator.generate`` (prefill, decode, text decoding of every token) vs
   ``GPTJForCausalLM.generate`` with each ``--torch-threads`` setting. End of text never stops either
   side. Runs are interleaved; each reports the median of ``--repeats`` timed runs after a warmup run.
   The greedy tokens of the two are compared.
3. Starts ``device_serve.py`` on 127.0.0.1 with the same checkpoint (byte tokenizer, so the padded
   vocabulary is masked) and measures completion tokens/s of ``--clients`` concurrent clients, each
   sending ``--requests-per-client`` greedy requests, against the same requests sent one at a time.
4. The ``echo`` path's host work: the text offset of every token of a ``--echo-tokens``-token prompt
   (``text_offsets``, which the server runs in its worker thread), with a byte-level BPE tokenizer
   trained on this machine's Python standard library source, for a prompt of source text, of random
   ids and of one lone UTF-8 continuation byte repeated. Median time of ``--repeats`` runs, and the
   ids decoded against a prompt a quarter as long (linear work: 4x; quadratic: 16x).

    python bench/generation.py                  # full run (about 5 min on 2 cores); appends to RESULTS.md
    python bench/generation.py --quick --no-write
    python bench/generation.py --echo           # only step 4 (under a minute)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import (IdTokenizer, add_repo_to_path, add_run_arguments, add_shape_arguments, append_results,
                    command_line, machine_summary, markdown_table, use_one_cpu_device)

use_one_cpu_device()

import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = add_repo_to_path()
from mesh_transformer.checkpoints.store import Checkpointer  # noqa: E402
from mesh_transformer.convert.hf_export import export_to_hf  # noqa: E402
from mesh_transformer.models.registry import load_config  # noqa: E402
from mesh_transformer.config import Config  # noqa: E402
from mesh_transformer.inference.engine import Generator  # noqa: E402
from mesh_transformer.inference.text import SamplingParams, text_offsets  # noqa: E402
from mesh_transformer.sharding import make_mesh  # noqa: E402
from mesh_transformer.tokenizer import TokenizersTokenizer  # noqa: E402
from mesh_transformer.training.steps import Trainer  # noqa: E402


# ----- the model on both sides -----

def write_model(args, root: Path) -> tuple[Config, dict]:
    raw = dict(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=args.seq,
               pe_rotary_dims=args.rotary, tokenizer="bytes", lr=1e-4, model_dir=str(root / "run"),
               mesh={"dp": 1, "fsdp": 1, "mp": 1}, name="bench-gptj")
    (root / "config.json").write_text(json.dumps(raw))
    config = load_config(str(root / "config.json"))
    state = Trainer(config, make_mesh(config, jax.devices()[:1])).init_state(0)
    state = state.replace(params=sharpened(state.params))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        checkpoints.save(0, state, {})
    export_to_hf(config.run.checkpoint_dir, config, str(root / "hf"), dtype="fp32", show_progress=False)
    return config, state.params


def sharpened(params, factor: float = 20.0) -> dict:
    """Random init gives nearly uniform next-token distributions, where greedy choices hinge on float
    rounding; a larger output layer makes them clear, so both sides' greedy tokens can be compared."""
    head = params["lm_head"]
    return dict(params, lm_head=dict(head, kernel=head["kernel"] * factor))


def hf_model(root: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf")).eval()
    model.generation_config.eos_token_id = None  # run every requested token, as our side does
    model.generation_config.suppress_tokens = None  # every id is a real token here (see IdTokenizer)
    return model


# ----- timing -----

@dataclass
class Runner:
    name: str
    batch: int
    run: Callable[[], list[list[int]]]
    times: list[float]


def ours(generator: Generator, prompts: np.ndarray, new_tokens: int) -> Callable[[], list[list[int]]]:
    settings = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    ids = [list(map(int, p)) for p in prompts]
    return lambda: [c.tokens for c in generator.generate(ids, settings)]


def theirs(model, prompts: np.ndarray, new_tokens: int, threads: int) -> Callable[[], list[list[int]]]:
    ids = torch.from_numpy(prompts.astype(np.int64))

    def run() -> list[list[int]]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    return run


def time_interleaved(runners: list[Runner], repeats: int) -> dict[str, list[list[int]]]:
    outputs = {r.name: r.run() for r in runners}  # warmup: compilation, allocations
    for _ in range(repeats):
        for r in runners:
            started = time.perf_counter()
            r.run()
            r.times.append(time.perf_counter() - started)
    return outputs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of rows whose greedy tokens agree exactly (random weights make near-ties possible)."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


# ----- the server -----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config_path: Path, log: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "device_serve.py"), "--config", str(config_path), "--port", str(port),
         "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "WARNING"],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become ready")


def server_tokens_per_s(url: str, prompts: list[str], clients: int, new_tokens: int) -> tuple[float, int]:
    """Completion tokens/s of all prompts sent by ``clients`` concurrent clients; and the token count."""

    def ask(prompt: str) -> int:
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(ask, prompts))
    return tokens / (time.perf_counter() - started), tokens


def serve_benchmark(args, config_path: Path, log: Path) -> dict[str, float]:
    rng = np.random.RandomState(1)
    count = args.clients * args.requests_per_client
    prompts = ["".join(chr(c) for c in rng.randint(97, 123, args.prompt_tokens)) for _ in range(count)]
    process, url = start_server(config_path, log, max_batch=args.clients)
    try:
        for _ in range(2):  # compile the shapes that concurrent arrivals produce
            server_tokens_per_s(url, prompts, args.clients, args.new_tokens)
        one, one_tokens = server_tokens_per_s(url, prompts, 1, args.new_tokens)
        many, many_tokens = server_tokens_per_s(url, prompts, args.clients, args.new_tokens)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"sequential": one, "concurrent": many, "tokens": float(one_tokens), "concurrent_tokens": many_tokens}


# ----- echo: the text offsets of a long prompt -----

ECHO_PROMPTS = ("source text", "random ids", "lone continuation bytes")


def stdlib_source(limit: int) -> list[str]:
    """About ``limit`` characters of this Python's standard library source, file by file."""
    texts, total = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        texts.append(path.read_text(errors="replace"))
        total += len(texts[-1])
        if total >= limit:
            break
    return texts


def byte_level_bpe(texts: list[str], vocab: int) -> TokenizersTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return TokenizersTokenizer("bpe", backend.token_to_id("<|endoftext|>"), backend.get_vocab_size(), backend)


@dataclass
class CountingDecodes:
    """Counts the ids decoded: the work, independent of the machine's speed and load."""

    tokenizer: TokenizersTokenizer
    decoded_ids: int = 0

    def decode(self, ids) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids)


def echo_prompt(tokenizer: TokenizersTokenizer, texts: list[str], kind: str, length: int) -> list[int]:
    if kind == "source text":
        return tokenizer.encode("".join(texts[-3:]))[:length]  # files the tokenizer was trained on
    if kind == "random ids":
        return [int(i) for i in np.random.RandomState(length).randint(0, tokenizer.vocab_size, length)]
    lone = next(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd")  # e.g. byte 0x80
    return [lone] * length


def echo_benchmark(args) -> list[list[str]]:
    texts = stdlib_source(args.echo_train_chars)
    tokenizer = byte_level_bpe(texts, args.echo_vocab)
    rows = []
    for kind in ECHO_PROMPTS:
        work, seconds = {}, []
        for length in (args.echo_tokens // 4, args.echo_tokens):
            ids = echo_prompt(tokenizer, texts, kind, length)
            counting = CountingDecodes(tokenizer)
            text_offsets(counting, ids)
            work[length] = counting.decoded_ids
        for _ in range(args.repeats):
            started = time.perf_counter()
            text_offsets(tokenizer, ids)
            seconds.append(time.perf_counter() - started)
        ratio = work[args.echo_tokens] / work[args.echo_tokens // 4]
        rows.append([kind, str(len(ids)), f"{statistics.median(seconds) * 1000:.1f}", f"{work[args.echo_tokens]:,}",
                     f"{ratio:.2f}x"])
        print(f"echo offsets, {kind}: {rows[-1]}", flush=True)
    return rows


def echo_report(args, rows: list[list[str]]) -> str:
    return "\n".join([
        f"\nEcho offsets (`text_offsets`, the server's worker thread): byte-level BPE of vocabulary "
        f"{args.echo_vocab} trained on {args.echo_train_chars:,} characters of the Python standard library "
        f"source; median of {args.repeats} runs. Work = ids decoded; the ratio is against a prompt of "
        f"{args.echo_tokens // 4} tokens (linear: 4x, quadratic: 16x).\n",
        markdown_table(["prompt", "tokens", "ms", "ids decoded", f"work vs {args.echo_tokens // 4} tokens"], rows),
    ]) + "\n"


# ----- reporting -----

def report(args, command: str, loads: tuple[float, float], runners: list[Runner], agree: dict[int, float],
           served: dict[str, float] | None) -> str:
    rows = []
    smallest = [r for r in runners if r.batch == min(args.batch) and r.name.startswith("ours")][0]
    single_stream = min(args.batch) * args.new_tokens / statistics.median(smallest.times)
    for batch in args.batch:
        mine = [r for r in runners if r.batch == batch and r.name.startswith("ours")][0]
        hf_runs = [r for r in runners if r.batch == batch and not r.name.startswith("ours")]
        best_hf = min(statistics.median(r.times) for r in hf_runs)
        for r in [mine, *hf_runs]:
            seconds = statistics.median(r.times)
            rows.append([r.name.split(" (batch")[0], str(batch), f"{batch * args.new_tokens / seconds:.1f}",
                         f"{seconds:.2f}", f"{best_hf / seconds:.2f}x" if r is mine else "",
                         f"{agree[batch]:.0%}" if r is mine else ""])
    text = [f"\n## Generation: KV-cache decoding vs transformers generate, and server throughput "
            f"({datetime.date.today().isoformat()})\n",
            f"Command: `{command}`  \nMachine: {machine_summary()}  \nLoad average before/after: "
            f"{loads[0]:.2f} / {loads[1]:.2f}\n",
            f"Model: GPT-J layout, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, rotary "
            f"{args.rotary}, vocab {args.vocab}, fp32, random weights shared through a Hugging Face export. "
            f"Greedy, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, median of {args.repeats} "
            f"interleaved runs.\n",
            markdown_table(["runner", "batch", "new tokens/s", "seconds", "ours vs best HF", "same greedy tokens"],
                           rows)]
    if served:
        ratio = served["concurrent"] / served["sequential"]
        text.append(f"\nServer (`device_serve.py`, max batch {args.clients}, {args.clients * args.requests_per_client} "
                    f"requests of {args.new_tokens} tokens): one at a time {served['sequential']:.1f} tokens/s, "
                    f"{args.clients} concurrent clients {served['concurrent']:.1f} tokens/s: **{ratio:.2f}x**. "
                    f"One request at a time pays HTTP, a prefill and cache resizes per request: against "
                    f"in-process decoding at batch {min(args.batch)} ({single_stream:.1f} tokens/s) the concurrent "
                    f"clients get {served['concurrent'] / single_stream:.2f}x.\n")
    return "\n".join(text) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p, layers=6, d_model=512, heads=8, rotary=64, vocab=50400, seq=512)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--no-server", action="store_true", help="skip the server measurement")
    p.add_argument("--echo", action="store_true", help="only measure the echo offsets of a long prompt")
    p.add_argument("--echo-tokens", type=int, default=2048, help="tokens of the echoed prompt")
    p.add_argument("--echo-vocab", type=int, default=8192, help="vocabulary of the BPE tokenizer trained for it")
    p.add_argument("--echo-train-chars", type=int, default=2_000_000, help="standard library source to train on")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.rotary, args.vocab, args.seq = 2, 64, 4, 8, 512, 128
        args.new_tokens, args.repeats, args.clients, args.requests_per_client = 16, 1, 4, 1
        args.echo_vocab, args.echo_train_chars = 1024, 200_000
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = command_line(__file__, argv)
    load_before = os.getloadavg()[0]
    echo = echo_benchmark(args)
    if args.echo:
        section = (f"\n## Echo offsets of a {args.echo_tokens}-token prompt ({datetime.date.today().isoformat()})\n\n"
                   f"Command: `{command}`  \nMachine: {machine_summary()}  \nLoad average before/after: "
                   f"{load_before:.2f} / {os.getloadavg()[0]:.2f}\n" + echo_report(args, echo))
    else:
        section = generation_section(args, command, load_before) + echo_report(args, echo)
    print(section)
    if not args.no_write:
        append_results(section)


def generation_section(args, command: str, load_before: float) -> str:
    """Steps 1-3: decoding against HF generate, and the server."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, params = write_model(args, root)
        model = hf_model(root)
        generator = Generator(config.model, params, IdTokenizer(args.vocab), max_batch=max(args.batch))
        rng = np.random.RandomState(0)
        runners, agree = [], {}
        for batch in args.batch:
            prompts = rng.randint(0, args.vocab, (batch, args.prompt_tokens))
            runners.append(Runner(f"ours (batch {batch})", batch, ours(generator, prompts, args.new_tokens), []))
            for threads in args.torch_threads:
                runners.append(Runner(f"HF generate, torch threads {threads} (batch {batch})", batch,
                                      theirs(model, prompts, args.new_tokens, threads), []))
        outputs = time_interleaved(runners, args.repeats)
        for batch in args.batch:
            names = [r.name for r in runners if r.batch == batch]
            agree[batch] = agreement(outputs[names[0]], outputs[names[1]])
        for r in runners:
            print(f"{r.name:36s} batch {r.batch}: {r.batch * args.new_tokens / statistics.median(r.times):8.1f} "
                  f"new tokens/s", flush=True)
        served = None
        if not args.no_server:
            served = serve_benchmark(args, root / "config.json", root / "server.log")
            print(f"server: {served}", flush=True)
    return report(args, command, (load_before, os.getloadavg()[0]), runners, agree, served)


if __name__ == "__main__":
    main()
