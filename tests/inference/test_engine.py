"""Generation: KV-cache decoding against full forward passes, sampling rules against Hugging Face's
logits warpers, stop conditions, logprobs, sharding, and the device_sample.py command."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pathlib import Path

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.transformer import Transformer, init_cache
from mesh_transformer.inference.engine import (
    Controls,
    Generator,
    SamplingParams,
    Sequence,
    TokenLogprob,
    choose_tokens,
    filter_top_k_top_p,
)
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.tokenizer import ByteTokenizer
from tests.helpers import REPO, tiny_config

CFG = ModelConfig(layers=2, d_model=32, n_heads=4, n_vocab=40, seq=32, pe_rotary_dims=4)
VARIANTS = {
    "gptj": {},
    "neox": dict(rotary_style="neox", qkv_bias=True, out_bias=True, separate_mlp_norm=True, activation="gelu"),
    "neo": dict(pe="fixed", attention_layers=("global", "local"), window_size=3, residual="sequential",
                separate_mlp_norm=True, qkv_bias=False, out_bias=True, scale_attention=False, tie_embeddings=True,
                lm_head_bias=False),
}


@dataclass(frozen=True)
class PieceTokenizer:
    """Id i decodes to PIECES[i]; id 32 is end-of-text; ids 33-39 of the model are vocabulary padding."""

    PIECES = tuple("abcdefghijklmnopqrstuvwxyz") + (" ", "ab", "cd", "xyz", "hello", " world")
    name: str = "pieces"
    eos_token_id: int = 32
    vocab_size: int = 33

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            best = max((p for p in self.PIECES if text.startswith(p, i)), key=len)
            ids.append(self.PIECES.index(best))
            i += len(best)
        return ids

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join("<eos>" if i == self.eos_token_id else self.PIECES[i] for i in ids)


TOKENIZER = PieceTokenizer()


def init_params(cfg: ModelConfig = CFG, seed: int = 0):
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])


@functools.partial(jax.jit, static_argnums=0)
def _forward_without_cache(cfg: ModelConfig, params, tokens):
    return Transformer(cfg).apply({"params": params}, tokens)


def full_logits(cfg: ModelConfig, params, tokens: list[int]) -> np.ndarray:
    """Next-token logits after ``tokens`` from one full forward pass (padded to seq: causal, so harmless)."""
    padded = np.zeros((1, cfg.seq), np.int32)
    padded[0, :len(tokens)] = tokens
    return np.asarray(_forward_without_cache(cfg, params, padded)[0, len(tokens) - 1])


@functools.partial(jax.jit, static_argnums=0)
def _forward_with_cache(cfg: ModelConfig, params, tokens, positions, cache):
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache=cache)


def log_softmax_real(logits: np.ndarray, real_vocab: int) -> np.ndarray:
    real = logits[:real_vocab].astype(np.float64)
    return real - np.log(np.exp(real - real.max()).sum()) - real.max()


def greedy_reference(params, prompt: list[int], steps: int, real_vocab: int = TOKENIZER.vocab_size) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(full_logits(CFG, params, tokens)[:real_vocab])))
    return tokens[len(prompt):]


def generator(params=None, **kwargs) -> Generator:
    return Generator(CFG, init_params() if params is None else params, TOKENIZER, **kwargs)


# ----- the KV cache in the model -----

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_logits_equal_full_forward_at_every_step_for_a_ragged_batch(variant):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    params = init_params(cfg, seed=1)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, 33, n)) for n in (3, 8, 5)]
    width = 8
    tokens = np.zeros((3, width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    positions = np.broadcast_to(np.arange(width), tokens.shape)
    logits, cache = _forward_with_cache(cfg, params, tokens, positions, init_cache(cfg, 3, 20))
    histories = [list(p) for p in prompts]
    latest = np.stack([np.asarray(logits)[row, len(p) - 1] for row, p in enumerate(prompts)])
    for _ in range(6):
        for row, history in enumerate(histories):
            np.testing.assert_allclose(latest[row], full_logits(cfg, params, history), atol=1e-4)
        new = rng.randint(0, 33, 3)
        step_positions = np.array([[len(h)] for h in histories])
        logits, cache = _forward_with_cache(cfg, params, new[:, None], step_positions, cache)
        latest = np.asarray(logits)[:, 0]
        for history, token in zip(histories, new):
            history.append(int(token))


# ----- generation -----

def test_greedy_generation_equals_a_full_forward_argmax_for_ragged_prompts_with_continuous_batching():
    params = init_params()
    prompts = [[1, 2, 3], [5] * 9, [7], [9, 10, 11, 12, 13], [3, 3], [30, 31, 0, 4]]
    gen = generator(params, max_batch=2, steps_per_call=4)  # six prompts through two slots
    results = gen.generate(prompts, SamplingParams(max_new_tokens=7, temperature=0.0, stop_at_eos=False))
    for prompt, result in zip(prompts, results):
        assert result.tokens == greedy_reference(params, prompt, 7)
        assert result.finish_reason == "length" and result.prompt_tokens == len(prompt)
        assert result.text == TOKENIZER.decode(result.tokens)


def test_the_cache_follows_the_load_without_changing_results():
    """Rows and length of the KV cache grow and shrink as sequences join and finish."""
    cfg = dataclasses.replace(CFG, seq=160)
    params = init_params(cfg, seed=4)
    gen = Generator(cfg, params, TOKENIZER)
    batch = gen.batch(capacity=16, steps_per_call=4)
    rng = np.random.RandomState(5)
    sequences = [gen.sequence(list(rng.randint(0, 33, 3 + i)), SamplingParams(max_new_tokens=4 + 12 * i,
                                                                               temperature=0.0, stop_at_eos=False))
                 for i in range(9)]
    batch.add(sequences[:6])
    shapes, waiting = [(batch.rows, batch.length)], sequences[6:]
    while batch.active:
        batch.step()
        if waiting and len(batch.active) <= 4:
            batch.add(waiting)  # these join while the others are finishing
            waiting = []
        shapes.append((batch.rows, batch.length))
    assert {16, 4, 1} <= {rows for rows, _ in shapes}
    assert {64, 128} <= {length for _, length in shapes}
    for sequence in sequences:
        tokens = list(sequence.prompt)
        for _ in range(sequence.limit):
            tokens.append(int(np.argmax(full_logits(cfg, params, tokens)[:TOKENIZER.vocab_size])))
        assert sequence.tokens == tokens[len(sequence.prompt):]


def test_logprobs_are_the_log_softmax_of_the_full_forward_logits():
    params = init_params(seed=2)
    prompts = [[4, 5, 6], [8] * 6]
    settings = SamplingParams(max_new_tokens=5, temperature=0.8, top_k=10, seed=3, logprobs=3, stop_at_eos=False)
    for prompt, result in zip(prompts, generator(params, steps_per_call=2).generate(prompts, settings)):
        history = list(prompt)
        for entry in result.logprobs:
            expected = log_softmax_real(full_logits(CFG, params, history), TOKENIZER.vocab_size)
            assert entry.logprob == pytest.approx(expected[entry.token], abs=1e-4)
            top_ids = [t for t, _ in entry.top]
            assert top_ids == list(np.argsort(-expected)[:3])
            np.testing.assert_allclose([lp for _, lp in entry.top], expected[top_ids], atol=1e-4)
            history.append(entry.token)


def test_prompt_logprobs_score_each_prompt_token_given_the_ones_before():
    params = init_params(seed=2)
    prompt = [4, 5, 6, 7, 1]
    scored = generator(params).prompt_logprobs(prompt, top_n=2)
    assert scored[0] is None
    for i in range(1, len(prompt)):
        expected = log_softmax_real(full_logits(CFG, params, prompt[:i]), TOKENIZER.vocab_size)
        assert scored[i].logprob == pytest.approx(expected[prompt[i]], abs=1e-4)
        assert [t for t, _ in scored[i].top] == list(np.argsort(-expected)[:2])


def biased_to_padding(params):
    """Every padded id (33..39) gets a huge output bias, so it would win without the rule."""
    bias = jnp.where(jnp.arange(CFG.n_vocab) >= TOKENIZER.vocab_size, 100.0, 0.0)
    return dict(params, lm_head=dict(params["lm_head"], bias=bias))


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=2.0, top_p=0.5),
                                      dict(temperature=1.0, top_k=3)])
def test_padded_vocabulary_ids_are_never_chosen_or_listed(settings):
    gen = generator(biased_to_padding(init_params()))
    results = gen.generate([[1, 2], [3]], SamplingParams(max_new_tokens=12, seed=4, logprobs=5, stop_at_eos=False,
                                                         **settings))
    for result in results:
        assert max(result.tokens) < TOKENIZER.vocab_size
        assert all(t < TOKENIZER.vocab_size for entry in result.logprobs for t, _ in entry.top)


def test_generation_stops_at_eos_unless_told_otherwise():
    params = init_params(seed=3)
    free = generator(params).generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=0.0,
                                                                  stop_at_eos=False))[0]
    eos = free.tokens[3]
    tokenizer = dataclasses.replace(TOKENIZER, eos_token_id=eos)
    gen = Generator(CFG, params, tokenizer)
    stopped = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=0.0))[0]
    cut = free.tokens.index(eos)
    assert stopped.tokens == free.tokens[:cut + 1] and stopped.finish_reason == "stop"
    assert stopped.text == TOKENIZER.decode(free.tokens[:cut])  # the end-of-text token adds no text


def test_max_new_tokens_and_the_context_window_bound_the_length():
    gen = generator()
    short, near_end = gen.generate([[1, 2], [1] * (CFG.seq - 3)],
                                   SamplingParams(max_new_tokens=5, temperature=0.0, stop_at_eos=False))
    assert len(short.tokens) == 5 and short.finish_reason == "length"
    assert len(near_end.tokens) == 3 and near_end.finish_reason == "length"
    assert gen.generate([[1]], SamplingParams(max_new_tokens=0))[0].tokens == []
    with pytest.raises(ValueError, match="context window"):
        gen.generate([[1] * CFG.seq], SamplingParams())


def test_a_stop_string_found_in_the_generated_text_is_cut_with_the_tokens_inside_it():
    params = init_params(seed=5)
    free = generator(params).generate([[1, 2]], SamplingParams(max_new_tokens=12, temperature=0.0,
                                                               stop_at_eos=False))[0]
    stop = free.text[4:7]
    result = generator(params).generate([[1, 2]], SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                 stop_at_eos=False, stop=("zzzz", stop)))[0]
    cut = free.text.index(stop)
    assert result.text == free.text[:cut] and result.finish_reason == "stop"
    starts = [len(TOKENIZER.decode(free.tokens[:i])) for i in range(len(free.tokens))]
    assert result.tokens == [t for t, start in zip(free.tokens, starts) if start < cut]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch_around_it():
    gen = generator(init_params(seed=6), max_batch=4)
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    settings = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=11, stop_at_eos=False)
    together = [r.tokens for r in gen.generate(prompts, settings)]
    alone = [gen.generate([p], settings)[0].tokens for p in prompts]
    assert together == alone
    other_seed = gen.generate(prompts, dataclasses.replace(settings, seed=12))
    assert [r.tokens for r in other_seed] != together


def test_sharded_generation_on_a_2_1_2_mesh_matches_one_device():
    params = init_params(seed=7)
    cfg = dataclasses.replace(CFG, n_vocab=40)
    settings = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=2, stop_at_eos=False)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10, 11]]
    single = Generator(cfg, params, TOKENIZER, max_batch=4).generate(prompts, settings)
    sharded_gen = Generator(cfg, params, TOKENIZER, mesh_from_shape((2, 1, 2)), max_batch=4)
    assert sharded_gen.params["blocks"][0]["attn"]["q_proj"]["kernel"].sharding.spec[1] == "mp"
    sharded = sharded_gen.generate(prompts, settings)
    for a, b in zip(single, sharded):
        assert a.tokens == b.tokens
        np.testing.assert_allclose([e.logprob for e in a.logprobs], [e.logprob for e in b.logprobs], atol=1e-5)


def test_invalid_sampling_settings_name_the_setting():
    for bad, name in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
                      (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(logprobs=99), "logprobs"),
                      (dict(stop=("",)), "stop")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator().generate([[1, 35]], SamplingParams())


def test_a_checkpoint_of_the_original_mesh_transformer_jax_loads_directly(tmp_path):
    from mesh_transformer.inference.engine import load_generator
    from tests.legacy_writer import write_legacy_checkpoint

    config = tiny_config(n_vocab=264, seq=48, model_dir=str(tmp_path / "legacy"), mesh={"dp": 1, "fsdp": 1, "mp": 1})
    params = init_params(config.model, seed=8)
    write_legacy_checkpoint(str(tmp_path / "legacy" / "step_5"), jax.tree.map(np.asarray, params), shards=2, step=5)
    settings = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    loaded = load_generator(config, mesh=mesh_from_shape((1, 1, 1))).generate(["abc", "de"], settings)
    expected = Generator(config.model, params, ByteTokenizer()).generate(["abc", "de"], settings)
    assert [c.tokens for c in loaded] == [c.tokens for c in expected]


# ----- sampling rules against Hugging Face -----

def hf_processed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Hugging Face's warpers in the order generate() applies them."""
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(logits)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.9),
                                                     (1.0, 1, 0.5), (2.0, 0, 0.3), (1.0, 100, 0.999)])
def test_temperature_top_k_top_p_keep_the_same_tokens_as_hugging_face(temperature, top_k, top_p):
    logits = np.random.RandomState(top_k).randn(6, 50).astype(np.float32) * 3
    ours = np.asarray(filter_top_k_top_p(jnp.asarray(logits / temperature), jnp.full(6, top_k),
                                         jnp.full(6, top_p, jnp.float32)))
    theirs = hf_processed(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], rtol=1e-6)


def controls_for(rows: int, temperature: float, top_k: int, top_p: float, seed: int = 0) -> Controls:
    return Controls(temperature=jnp.full(rows, temperature, jnp.float32), top_k=jnp.full(rows, top_k, jnp.int32),
                    top_p=jnp.full(rows, top_p, jnp.float32), key_data=jnp.tile(jnp.array([0, seed], jnp.uint32),
                                                                                  (rows, 1)),
                    counter=jnp.arange(rows, dtype=jnp.int32), want_top=jnp.zeros(rows, bool))


def test_seeded_samples_follow_the_hugging_face_distribution():
    logits = np.random.RandomState(0).randn(12).astype(np.float32) * 2
    draws = 40_000
    for temperature, top_k, top_p in [(0.8, 0, 1.0), (1.2, 6, 0.85)]:
        choice = jax.jit(choose_tokens, static_argnums=2)(jnp.tile(jnp.asarray(logits), (draws, 1)),
                                                          controls_for(draws, temperature, top_k, top_p), 12)
        counts = np.bincount(np.asarray(choice.token), minlength=12) / draws
        processed = hf_processed(logits[None], temperature, top_k, top_p)[0]
        probs = np.exp(processed - processed.max())
        probs /= probs.sum()
        assert np.abs(counts - probs).sum() / 2 < 0.02  # total variation distance
        assert (counts[probs == 0] == 0).all()


def test_greedy_rows_take_the_argmax_and_ignore_the_filters():
    logits = np.random.RandomState(3).randn(4, 30).astype(np.float32)
    choice = choose_tokens(jnp.asarray(logits), controls_for(4, 0.0, 2, 0.1), 30)
    np.testing.assert_array_equal(np.asarray(choice.token), logits.argmax(-1))


def test_greedy_generation_equals_transformers_generate(tmp_path):
    """Our weights exported to Hugging Face GPT-J: greedy outputs agree token for token."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mesh_transformer.convert import hf
    from mesh_transformer.training.checkpoint import Checkpointer
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.training.steps import Trainer

    config = tiny_config(n_vocab=264, seq=48, model_dir=str(tmp_path / "run"), mesh={"dp": 1, "fsdp": 1, "mp": 1})
    state = Trainer(config, make_mesh(config, jax.devices()[:1])).init_state(3)
    # A larger output layer than at init makes the next-token choice clear, not a float-rounding tie.
    head = state.params["lm_head"]
    state = state.replace(params=dict(state.params, lm_head=dict(head, kernel=head["kernel"] * 20)))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        checkpoints.save(0, state, {})
    hf.export_to_hf(config.run.checkpoint_dir, config, str(tmp_path / "hf"), dtype="fp32", show_progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokenizer = ByteTokenizer()
    gen = Generator(config.model, state.params, tokenizer, max_batch=2)
    prompts = ["def add(a, b):", "import numpy as np\n", "x"]
    ours = gen.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eos=False))
    for prompt, result in zip(prompts, ours):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.inference_mode():
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                                    do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert result.tokens == theirs[0, ids.shape[1]:].tolist()


# ----- text handling on the host -----

def feed(sequence: Sequence, tokens: list[int]) -> list[str]:
    return [sequence.append(t, TokenLogprob(t, -1.0)) for t in tokens]


def test_streamed_text_holds_back_a_possible_stop_string_and_cuts_it_when_complete():
    hello, world, space = 30, 31, 26
    sequence = Sequence([0], SamplingParams(max_new_tokens=20, stop=("lo wo",)), TOKENIZER, context=32)
    pieces = feed(sequence, [0, hello])  # "a" "hello": "lo" may start the stop string
    assert pieces == ["a", "hel"]
    pieces += feed(sequence, [world])  # " world": the stop string is complete
    assert sequence.finish_reason == "stop" and sequence.text == "ahel"
    assert "".join(pieces) == "ahel"
    assert sequence.tokens == [0, hello]  # " world" starts inside the stop string and is dropped
    assert sequence.settled_tokens == 2
    other = Sequence([0], SamplingParams(max_new_tokens=3, stop=("lo wo",)), TOKENIZER, context=32)
    assert "".join(feed(other, [hello, space, 1])) == "hello b" and other.finish_reason == "length"


def test_bytes_of_one_character_are_released_together():
    tokenizer = ByteTokenizer()
    sequence = Sequence([65], SamplingParams(max_new_tokens=8), tokenizer, context=32)
    euro = list("€".encode())
    assert feed(sequence, euro + [33]) == ["", "", "€", "!"]
    assert sequence.token_offsets == [0, 0, 0, 1]


# ----- device_sample.py -----

def write_checkpoint(root: Path, suppress_eos: bool = False, **overrides) -> Path:
    """A tiny random GPT-J checkpoint with the byte tokenizer and its config; returns the config path.

    Its output layer is scaled up so that greedy choices are clear-cut rather than float-rounding
    ties (random init gives nearly uniform next-token distributions). ``suppress_eos`` gives the
    end-of-text token a large negative output bias, so generation runs to its length limit."""
    from mesh_transformer.training.checkpoint import Checkpointer
    from mesh_transformer.config import load_config
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.training.steps import Trainer

    raw = dict(layers=2, d_model=32, n_heads=4, n_vocab=264, seq=64, pe_rotary_dims=4, tokenizer="bytes", lr=1e-3,
               model_dir=str(root / "run"), mesh={"dp": 1, "fsdp": 1, "mp": 1}, name="tiny-test")
    raw.update(overrides)
    path = root / "config.json"
    path.write_text(json.dumps(raw))
    config = load_config(str(path))
    state = Trainer(config, make_mesh(config, jax.devices()[:1])).init_state(0)
    head = dict(state.params["lm_head"])
    head["kernel"] = head["kernel"] * 20
    if suppress_eos:
        head["bias"] = head["bias"].at[ByteTokenizer().eos_token_id].set(-1e4)
    state = state.replace(params=dict(state.params, lm_head=head))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        checkpoints.save(0, state, {})
    return path


def run_sample(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run([sys.executable, str(REPO / "device_sample.py"), *args], input=stdin, env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_device_sample_prints_one_json_object_per_prompt(tmp_path):
    config = write_checkpoint(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('"def f(x):"\n{"prompt": "import os"}\n')
    result = run_sample("--config", str(config), "--prompt", "hello", "--prompt-file", str(tmp_path / "prompts.jsonl"),
                        "--max-tokens", "6", "--temperature", "0", "--logprobs", "2", "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["hello", "def f(x):", "import os"]
    from mesh_transformer.config import load_config
    from mesh_transformer.inference.engine import load_generator
    gen = load_generator(load_config(str(config)), mesh=mesh_from_shape((1, 1, 1)))
    expected = gen.generate(["hello", "def f(x):", "import os"], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                                 logprobs=2))
    for line, completion in zip(lines, expected):
        assert line["tokens"] == completion.tokens and line["completion"] == completion.text
        assert [e["logprob"] for e in line["logprobs"]] == pytest.approx([e.logprob for e in completion.logprobs],
                                                                          abs=1e-5)
        assert all(len(e["top"]) == 2 for e in line["logprobs"])


@pytest.mark.slow
def test_device_sample_interactive_loop(tmp_path):
    config = write_checkpoint(tmp_path)
    result = run_sample("--config", str(config), "--max-tokens", "5", "--num-samples", "2", "--seed", "1",
                        stdin="hello\nworld\n")
    assert result.stdout.count("Type input:") == 3
    assert result.stdout.count("sample 0:") == 2 and result.stdout.count("sample 1:") == 2
    assert result.stdout.count("completion done in") == 2
