"""Generation: KV-cache decoding against full forward passes, greedy generation against full
forward passes and transformers, stop conditions, logprobs, sharding, the vocabulary check, and the
device_sample.py command."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mesh_transformer.config import ConfigError, ModelConfig
from mesh_transformer.inference.engine import Generator, decode_layout, decode_param_shardings, load_generator
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.models.layers import init_cache
from mesh_transformer.models.registry import load_config
from mesh_transformer.models.transformer import Transformer
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.tokenizer import ByteTokenizer
from tests.helpers import REPO, tiny_config
from tests.inference.tiny_model import (
    CFG,
    TOKENIZER,
    full_logits,
    generator,
    greedy_reference,
    init_params,
    log_softmax_real,
    write_checkpoint,
)

VARIANTS = {
    "gptj": {},
    "neox": dict(rotary_style="neox", qkv_bias=True, out_bias=True, separate_mlp_norm=True, activation="gelu"),
    "neo": dict(pe="fixed", attention_layers=("global", "local"), window_size=3, residual="sequential",
                separate_mlp_norm=True, qkv_bias=False, out_bias=True, scale_attention=False, tie_embeddings=True,
                lm_head_bias=False),
}


@functools.partial(jax.jit, static_argnums=0)
def _forward_with_cache(cfg: ModelConfig, params, tokens, positions, cache):
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache=cache)



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


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator().generate([[1, 35]], SamplingParams())


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_naming_both_sizes():
    with pytest.raises(ConfigError, match=r"n_vocab \(40\) is smaller than the vocabulary of tokenizer 'bytes' "
                                          r"\(257\)"):
        Generator(CFG, init_params(), ByteTokenizer())


def test_the_decoding_layout_is_built_once_per_model_and_mesh():
    mesh = mesh_from_shape((2, 1, 2))
    params = init_params()
    first, second = generator(params, mesh=mesh), generator(params, mesh=mesh_from_shape((2, 1, 2)))
    assert decode_layout(CFG, mesh) is decode_layout(CFG, mesh_from_shape((2, 1, 2)))
    assert decode_layout(CFG, mesh) is not decode_layout(dataclasses.replace(CFG, layers=3), mesh)
    layout = jax.tree.map(lambda p: p.sharding, second.params)
    assert layout == jax.tree.map(lambda p: p.sharding, first.params) == decode_param_shardings(CFG, mesh)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    """Our weights exported to Hugging Face GPT-J: greedy outputs agree token for token."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mesh_transformer.convert.hf_export import export_to_hf
    from mesh_transformer.checkpoints.store import Checkpointer
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.training.steps import Trainer

    config = tiny_config(n_vocab=264, seq=48, model_dir=str(tmp_path / "run"), mesh={"dp": 1, "fsdp": 1, "mp": 1})
    state = Trainer(config, make_mesh(config, jax.devices()[:1])).init_state(3)
    # A larger output layer than at init makes the next-token choice clear, not a float-rounding tie.
    head = state.params["lm_head"]
    state = state.replace(params=dict(state.params, lm_head=dict(head, kernel=head["kernel"] * 20)))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        checkpoints.save(0, state, {})
    export_to_hf(config.run.checkpoint_dir, config, str(tmp_path / "hf"), dtype="fp32", show_progress=False)
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


# ----- device_sample.py -----

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
