"""A LoRA run's config as is, for sampling, serving and evaluation: ``checkpoints.params.load_params``
loads its adapters, loads the base its checkpoint points to, and merges them, so device_sample.py,
device_serve.py and eval_harness.py run the plain model on merged weights. Checked against our model
applied with the base and the adapters unmerged, and against the merged weights' own generations."""

import json
import os
import subprocess
import sys

import httpx
import jax
import numpy as np
import pytest

from mesh_transformer.checkpoints.params import load_params, param_shardings
from mesh_transformer.evaluation import MeshTransformerLM, scoring_window
from mesh_transformer.inference.engine import Generator, load_generator
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.models import lora
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.tokenizer import ByteTokenizer
from tests.convert.test_hf import our_logits as plain_logits
from tests.convert.test_lora_export import make_lora_run, our_logits
from tests.helpers import REPO
from tests.inference.tiny_model import log_softmax_real

PROMPTS = ["def f(x):", "import os", "hello"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
REAL_VOCAB = 257  # the byte tokenizer's


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A GPT-J LoRA run (adapters with random B on every target) on a native base."""
    return make_lora_run(tmp_path_factory.mktemp("lora"), "gptj", seed=4)


@pytest.fixture(scope="module")
def merged(run):
    """The merged weights, merged here in numpy from the saved base and adapters."""
    return lora.merge(run.base, run.adapters, lora.adapted_model(run.config))


def greedy_tokens(generator: Generator) -> list[list[int]]:
    return [c.tokens for c in generator.generate(PROMPTS, GREEDY)]


def test_load_params_merges_the_adapters_into_the_base_on_the_mesh(run, merged):
    mesh = mesh_from_shape((2, 1, 2))
    params = load_params(run.config, mesh=mesh)
    assert jax.tree.structure(params) == jax.tree.structure(run.base)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), jax.device_get(params),
                 jax.device_get(merged))
    shardings = jax.tree.leaves(jax.tree.map(lambda p: p.sharding, params))
    assert shardings == jax.tree.leaves(param_shardings(run.config.model, mesh))

    tokens = np.random.RandomState(0).randint(0, REAL_VOCAB, (2, 24))
    unmerged = our_logits(run.config, run.base, run.adapters, tokens)
    np.testing.assert_allclose(plain_logits(run.config.model, jax.device_get(params), tokens), unmerged, atol=2e-5)
    assert np.abs(plain_logits(run.config.model, run.base, tokens) - unmerged).max() > 0.1  # the adapters matter


def test_a_generator_from_the_lora_config_decodes_like_the_merged_weights(run, merged):
    loaded = load_generator(run.config, mesh=mesh_from_shape((1, 1, 1)))
    expected = greedy_tokens(Generator(run.config.model, merged, ByteTokenizer()))
    assert greedy_tokens(loaded) == expected
    assert expected != greedy_tokens(Generator(run.config.model, run.base, ByteTokenizer()))


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run([sys.executable, str(REPO / script), *args], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_device_sample_takes_the_lora_run_config_as_is(run, merged):
    result = run_script("device_sample.py", "--config", str(run.root / "lora.json"), *[a for p in PROMPTS
                        for a in ("--prompt", p)], "--max-tokens", "12", "--temperature", "0", "--no-eos-stop",
                        "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["tokens"] for line in lines] == greedy_tokens(Generator(run.config.model, merged, ByteTokenizer()))


@pytest.mark.slow
def test_device_serve_takes_the_lora_run_config_as_is(run, merged, tmp_path):
    from tests.serving.test_server import Server

    server = Server(run.root / "lora.json", tmp_path / "server.log", "--max-batch", "4")
    try:
        server.wait_ready()
        response = httpx.post(f"{server.url}/v1/completions", json={
            "model": "mesh_transformer", "prompt": PROMPTS, "max_tokens": 12, "temperature": 0}, timeout=120)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    texts = [choice["text"] for choice in sorted(response.json()["choices"], key=lambda c: c["index"])]
    settings = SamplingParams(max_new_tokens=12, temperature=0.0)
    expected = Generator(run.config.model, merged, ByteTokenizer()).generate(PROMPTS, settings)
    assert texts == [c.text for c in expected]


def test_the_harness_model_of_the_lora_config_scores_like_the_unmerged_model(run):
    """What eval_harness.py builds (``MeshTransformerLM(config)``, weights through load_params)."""
    lm = MeshTransformerLM(str(run.root / "lora.json"), mesh=mesh_from_shape((1, 1, 1)), batch_size=4)
    rng = np.random.RandomState(1)
    requests = [(rng.randint(0, REAL_VOCAB, 10).tolist(), rng.randint(0, REAL_VOCAB, 4).tolist()) for _ in range(3)]
    results = lm.score_windows([scoring_window(context, continuation, lm.max_length)
                                for context, continuation in requests])
    for (context, continuation), (logprob, _) in zip(requests, results):
        tokens = [*context, *continuation]
        logits = our_logits(run.config, run.base, run.adapters, np.asarray([tokens[:-1]]))[0]
        expected = sum(log_softmax_real(logits[len(context) - 1 + i], REAL_VOCAB)[token]
                       for i, token in enumerate(continuation))
        assert logprob == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_eval_harness_takes_the_lora_run_config_and_gives_the_results_of_the_merged_weights(run, merged, tmp_path,
                                                                                          monkeypatch):
    from mesh_transformer.cli import eval_harness
    from mesh_transformer.checkpoints.store import Checkpointer
    from mesh_transformer.training.steps import Trainer
    from tests.test_evaluation import TASKS_DIR

    # The merged weights as a plain run of their own, with the base's config; both on this process's 8 devices.
    mesh = {"dp": 2, "fsdp": 2, "mp": 2}
    raw = dict(json.loads((run.root / "base.json").read_text()), model_dir=str(tmp_path / "merged"), mesh=mesh)
    (tmp_path / "merged.json").write_text(json.dumps(raw))
    (tmp_path / "lora.json").write_text(json.dumps(dict(json.loads((run.root / "lora.json").read_text()), mesh=mesh)))
    state = Trainer(run.base_config, mesh_from_shape((1, 1, 1))).init_state(0)
    params = jax.device_put(merged, jax.tree.map(lambda p: p.sharding, state.params))
    with Checkpointer(str(tmp_path / "merged"), async_save=False) as checkpoints:
        checkpoints.save(0, state.replace(params=params), {"step": 0})

    monkeypatch.chdir(TASKS_DIR)  # the task files name their data relative to it
    results = {}
    for name, config in (("lora", tmp_path / "lora.json"), ("merged", tmp_path / "merged.json")):
        output = tmp_path / f"{name}.json"
        assert eval_harness.main(["--config", str(config), "--tasks", "mc_tiny,ppl_tiny", "--include-path",
                                  str(TASKS_DIR), "--limit", "4", "--output", str(output), "--log-level",
                                  "WARNING"]) == 0
        results[name] = json.loads(output.read_text())["results"]
    for task in ("mc_tiny", "ppl_tiny"):
        for key, value in results["merged"][task].items():
            if isinstance(value, float):
                assert results["lora"][task][key] == pytest.approx(value, rel=1e-4), (task, key)
