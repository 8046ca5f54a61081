"""lm-evaluation-harness adapter: the harness's results with our model equal those of its own Hugging
Face model on the same weights; left truncation, greedy flags and stop strings like the reference;
evaluation during training; task names checked up front; the command lines.

Tiny random GPT-J / GPT-Neo / GPT-NeoX models are built with transformers and a byte-level BPE
tokenizer trained here on the task texts, saved, and imported with ``import_hf``. The tasks are
the YAML files in ``tests/eval_tasks/`` reading local jsonl files, so nothing is downloaded.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by the datasets library when it is imported

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mesh_transformer.convert.hf_import import import_hf  # noqa: E402
from mesh_transformer.cli import eval_harness as cli  # noqa: E402
from mesh_transformer.config import ConfigError  # noqa: E402
from mesh_transformer.evaluation import MeshTransformerLM, check_task_names, harness_hook, harness_metrics  # noqa: E402
from mesh_transformer.models.registry import load_config  # noqa: E402
from mesh_transformer.training.run import TrainOptions, train  # noqa: E402
from tests.convert.test_hf import EOT, gpt_neo_config, gpt_neox_config, gptj_config, save_hf_model  # noqa: E402
from tests.training.test_run import REPO, read_metrics, write_config, write_dataset  # noqa: E402
from tests.test_multihost import distributed_args, run_processes  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
LONG_CONTEXT = " ".join(json.loads(line)["text"] for line in (TASKS_DIR / "ppl_tiny.jsonl").read_text().splitlines())
LOCAL_TASKS = ["mc_tiny", "cloze_tiny", "ppl_tiny", "gen_tiny"]
SEQ = 32  # shorter than the perplexity documents and than some contexts below
VOCAB = 384
MESH = {"dp": 2, "fsdp": 2, "mp": 2}  # parameters split over fsdp and mp, batches over dp x fsdp
LOGPROB_RTOL, LOGPROB_ATOL = 1e-5, 1e-4
METRIC_RTOL = 1e-4  # perplexities; accuracies must be equal

HF_CONFIGS = {
    "gpt_neox": lambda: gpt_neox_config(vocab_size=VOCAB, max_position_embeddings=SEQ, eos_token_id=0, bos_token_id=0),
    "gptj": lambda: gptj_config(vocab_size=VOCAB, n_positions=SEQ, eos_token_id=0, bos_token_id=0),
    "gpt_neo": lambda: gpt_neo_config(vocab_size=VOCAB, max_position_embeddings=SEQ, eos_token_id=0, bos_token_id=0),
}


@pytest.fixture(autouse=True)
def in_tasks_dir(monkeypatch):
    """The task YAMLs name their jsonl files relative to the working directory, as the datasets library reads them."""
    monkeypatch.chdir(TASKS_DIR)


def task_texts() -> list[str]:
    texts = []
    for path in sorted(TASKS_DIR.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts.extend(str(value) for value in json.loads(line).values())
    return texts


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE with VOCAB ids (id 0 is end-of-text), trained on the task texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(task_texts(), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert backend.get_vocab_size() == VOCAB
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, bpe_tokenizer):
    """architecture -> (Hugging Face directory, our config on MESH), each built and imported once."""
    cache = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            source = save_hf_model(root / "hf", HF_CONFIGS[arch](), seed=5)
            bpe_tokenizer.save_pretrained(str(source))
            import_hf(str(source), str(root / "ours"), show_progress=False)
            raw = json.loads((root / "ours" / "config.json").read_text())
            (root / "mesh.json").write_text(json.dumps(dict(raw, mesh=MESH)))
            cache[arch] = source, root / "mesh.json"
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def reference_lm(hf_dir: Path) -> HFLM:
    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1)


@pytest.fixture(scope="module")
def neox_lms(imported):
    """(ours, the harness's reference) on the same GPT-NeoX weights."""
    hf_dir, config = imported("gpt_neox")
    return MeshTransformerLM(str(config), batch_size=4), reference_lm(hf_dir)


def evaluate(model, task_manager, **options) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=LOCAL_TASKS, task_manager=task_manager, bootstrap_iters=0,
                                   log_samples=True, **options)


def assert_same_metrics(ours: dict, reference: dict) -> None:
    for task in LOCAL_TASKS:
        for key, expected in reference["results"][task].items():
            actual = ours["results"][task][key]
            if key.startswith(("acc", "exact_match")) or not isinstance(expected, float):
                assert actual == expected, (task, key, actual, expected)
            else:
                assert actual == pytest.approx(expected, rel=METRIC_RTOL), (task, key)


def assert_same_samples(ours: dict, reference: dict) -> None:
    """Per document: the same log-likelihoods (tight tolerance), greedy flags and generated texts."""
    for task in LOCAL_TASKS:
        pairs = list(zip(ours["samples"][task], reference["samples"][task], strict=True))
        for mine, theirs in pairs:
            assert mine["doc_id"] == theirs["doc_id"]
            if task == "gen_tiny":
                assert mine["filtered_resps"] == theirs["filtered_resps"], mine["doc_id"]
                continue
            # (log-likelihood, is greedy) pairs, or one log-likelihood for rolling documents
            flat = [np.atleast_1d(np.asarray(s["filtered_resps"], dtype=float)) for s in (mine, theirs)]
            np.testing.assert_allclose(*flat, rtol=LOGPROB_RTOL, atol=LOGPROB_ATOL, err_msg=f"{task} {mine['doc_id']}")


# One architecture in the quick pass; the other two in the slow pass (about 10-30 s each on 2 cores).
ARCHS = ["gpt_neox", pytest.param("gptj", marks=pytest.mark.slow), pytest.param("gpt_neo", marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch", ARCHS)
def test_harness_results_equal_the_reference_hf_model(imported, task_manager, arch):
    hf_dir, config = imported(arch)
    ours = evaluate("mesh_transformer", task_manager, model_args={"config": str(config)}, batch_size=4)
    reference = evaluate(reference_lm(hf_dir), task_manager)
    assert_same_metrics(ours, reference)
    assert_same_samples(ours, reference)
    # The comparison has teeth: the models are far from uniform, so the log-likelihoods differ.
    assert len({round(r[0], 3) for s in ours["samples"]["mc_tiny"] for r in s["filtered_resps"]}) > 40


def loglikelihood_requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def both_loglikelihoods(lms, pairs: list[tuple[str, str]]) -> list[list[tuple[float, bool]]]:
    return [lm.loglikelihood(loglikelihood_requests(pairs)) for lm in lms]


def generation_requests(prompts: list[str], **gen_kwargs) -> list[Instance]:
    return [Instance(request_type="generate_until", doc={}, arguments=(prompt, gen_kwargs), idx=i)
            for i, prompt in enumerate(prompts)]


def test_a_context_longer_than_the_window_is_cut_on_the_left_like_the_reference(neox_lms):
    ours = neox_lms[0]
    assert len(ours.tok_encode(LONG_CONTEXT)) > 10 * SEQ
    pairs = [(LONG_CONTEXT, " the harbor"), (LONG_CONTEXT, " and the price of bread at the market"),
             ("The capital of France is", " Paris"), ("", " Paris is the capital")]
    mine, theirs = both_loglikelihoods(neox_lms, pairs)
    np.testing.assert_allclose([m[0] for m in mine], [t[0] for t in theirs], rtol=LOGPROB_RTOL, atol=LOGPROB_ATOL)
    assert [m[1] for m in mine] == [t[1] for t in theirs]
    # Only the last SEQ + 1 tokens count: more text in front changes nothing.
    [(longer, _)] = ours.loglikelihood(loglikelihood_requests([("Once upon a time. " + LONG_CONTEXT, " the harbor")]))
    assert longer == mine[0][0]


def test_the_greedy_flag_is_true_for_the_models_own_continuation(neox_lms):
    ours = neox_lms[0]
    prompts = ["The capital of France is", "Fish live in", "Bread needs only flour,"]
    continuations = ours.generate_until(generation_requests(prompts, until=[], max_gen_toks=1))
    mine, theirs = both_loglikelihoods(neox_lms, list(zip(prompts, continuations)))
    # Not every one is True: a generated token's text can tokenize differently after the prompt
    # (a lone byte of a UTF-8 character, say); the reference then says False as well.
    assert [m[1] for m in mine] == [t[1] for t in theirs] and sum(m[1] for m in mine) >= 2
    np.testing.assert_allclose([m[0] for m in mine], [t[0] for t in theirs], rtol=LOGPROB_RTOL, atol=LOGPROB_ATOL)


def test_generation_stops_at_a_stop_string_like_the_reference(neox_lms):
    ours, reference = neox_lms
    prompts = [json.loads(line)["prompt"] for line in (TASKS_DIR / "gen_tiny.jsonl").read_text().splitlines()]
    free = ours.generate_until(generation_requests(prompts, until=[], max_gen_toks=10))
    assert free == reference.generate_until(generation_requests(prompts, until=[], max_gen_toks=10))
    # A stop string taken from the middle of one free continuation: it must cut that one there.
    stop = free[0][len(free[0]) // 2:len(free[0]) // 2 + 2]
    stopped = ours.generate_until(generation_requests(prompts, until=[stop], max_gen_toks=10))
    assert stopped == reference.generate_until(generation_requests(prompts, until=[stop], max_gen_toks=10))
    assert stopped == [text.split(stop)[0] for text in free]
    assert len(stopped[0]) < len(free[0])


def test_requests_of_many_lengths_run_in_a_few_padded_shapes(neox_lms, monkeypatch):
    ours = neox_lms[0]
    shapes = []
    scorer = ours._scorer

    def recording(params, inputs, *rest):
        shapes.append(inputs.shape)
        return scorer(params, inputs, *rest)

    monkeypatch.setattr(ours, "_scorer", recording)
    words = LONG_CONTEXT.split()
    pairs = [(" ".join(words[:n]), " " + words[n]) for n in range(1, 40)]
    results = ours.loglikelihood(loglikelihood_requests(pairs))
    assert len(results) == len(pairs) and len(shapes) == -(-len(pairs) // ours.batch_size)
    assert set(shapes) <= {(ours.batch_size, 16), (ours.batch_size, SEQ)}  # every length 1..SEQ in two shapes


def test_unsupported_generation_settings_are_refused_by_name(neox_lms):
    ours = neox_lms[0]
    with pytest.raises(ValueError, match="repetition_penalty"):
        ours.generate_until(generation_requests(["Hi"], until=["\n"], repetition_penalty=1.2))
    with pytest.raises(ValueError, match="max_gen_toks"):
        ours.generate_until(generation_requests(["Hi"], until=["\n"], max_gen_toks=SEQ))


def test_the_model_is_registered_with_the_harness():
    assert get_model("mesh_transformer") is MeshTransformerLM


def test_harness_metrics_are_named_by_task_and_metric():
    results = {"results": {"mc": {"alias": "mc", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 12},
                           "gsm": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5}}}
    assert harness_metrics(results) == {"eval/mc/acc": 0.5, "eval/gsm/exact_match_strict-match": 0.25,
                                        "eval/gsm/exact_match_flexible-extract": 0.5}


def test_unknown_task_names_are_reported_with_close_names(task_manager):
    check_task_names(["mc_tiny", str(TASKS_DIR / "ppl_tiny.yaml")], task_manager, "tasks")  # names and YAML paths
    with pytest.raises(ConfigError, match=r"'ppl_tinny' \(close names: ppl_tiny") as error:
        check_task_names(["mc_tiny", "ppl_tinny", "zzzz"], task_manager, "tasks")
    assert "'zzzz' (no close names)" in str(error.value)


def training_config(tmp_path: Path, tasks: list[str]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data, "train", n_files=2, records_per_file=8, seed=1)
    write_dataset(data, "val", n_files=1, records_per_file=8, seed=2)
    return write_config(tmp_path / "config.json", tmp_path / "run", data, total_steps=2, val_every=2, ckpt_every=2,
                        mesh=MESH, eval_harness_tasks=tasks)


def test_training_logs_harness_metrics_every_val_every(tmp_path):
    tasks = [str(TASKS_DIR / "mc_tiny.yaml"), str(TASKS_DIR / "ppl_tiny.yaml")]
    config = load_config(str(training_config(tmp_path, tasks)))
    train(config, TrainOptions(show_progress=False), [harness_hook(config)])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [evaluation] = [r for r in records if any(key.startswith("eval/") for key in r)]
    assert evaluation["step"] == 2
    assert 0.0 <= evaluation["eval/mc_tiny/acc"] <= 1.0 and evaluation["eval/ppl_tiny/word_perplexity"] > 1.0
    assert any(r["step"] == 2 and "val/loss_heldout" in r for r in records)  # next to the usual validation


def test_a_bad_task_name_stops_training_before_anything_is_written(tmp_path):
    config = load_config(str(training_config(tmp_path, ["hellaswg"])))
    with pytest.raises(ConfigError, match=r"eval_harness_tasks: unknown lm-evaluation-harness task 'hellaswg' "
                                          r"\(close names: hellaswag"):
        train(config, TrainOptions(show_progress=False), [harness_hook(config)])
    assert not (tmp_path / "run").exists()


def test_eval_harness_command_prints_the_table_and_writes_results(imported, tmp_path, capsys):
    _, config = imported("gpt_neox")
    output = tmp_path / "out" / "results.json"
    assert cli.main(["--config", str(config), "--tasks", "mc_tiny,ppl_tiny", "--include-path", str(TASKS_DIR),
                     "--limit", "3", "--batch-size", "4", "--output", str(output), "--log-level", "WARNING"]) == 0
    table = capsys.readouterr().out
    assert "mc_tiny" in table and "ppl_tiny" in table and "word_perplexity" in table
    results = json.loads(output.read_text())
    assert results["results"]["mc_tiny"]["sample_len"] == 3 and "acc,none" in results["results"]["mc_tiny"]

    assert cli.main(["--config", str(config), "--tasks", "mc_tiny,mc_tinyy", "--include-path", str(TASKS_DIR)]) == 2
    assert "unknown lm-evaluation-harness task 'mc_tinyy' (close names: mc_tiny" in capsys.readouterr().err


def test_the_harness_command_line_runs_our_model(imported, monkeypatch, capsys):
    _, config = imported("gpt_neox")
    monkeypatch.setattr("sys.argv", ["mtj-lm-eval", "--model", "mesh_transformer", "--model_args",
                                     f"config={config}", "--tasks", "mc_tiny", "--include_path", str(TASKS_DIR),
                                     "--limit", "2", "--batch_size", "4"])
    cli.lm_eval_main()
    out = capsys.readouterr().out
    assert "mesh_transformer" in out and "mc_tiny" in out


# ----- several hosts -----

def two_host_commands(script: str, *args: str) -> list[list[str]]:
    return [[sys.executable, str(REPO / script), *args, *host_args] for host_args in distributed_args(2)]


def assert_same_results(ours: dict, reference: dict, tasks: list[str]) -> None:
    for task in tasks:
        for key, expected in reference["results"][task].items():
            if isinstance(expected, float):
                assert ours["results"][task][key] == pytest.approx(expected, rel=METRIC_RTOL), (task, key)


@pytest.mark.slow
def test_eval_harness_on_two_hosts_gives_the_results_of_one(imported, tmp_path):
    """2 processes x 4 devices on the (2, 2, 2) mesh against this process's 8 devices: every request
    answered alike, and only process 0 writes."""
    _, config = imported("gpt_neox")
    options = ["--config", str(config), "--tasks", ",".join(LOCAL_TASKS), "--include-path", str(TASKS_DIR),
               "--batch-size", "4", "--log-samples", "--log-level", "WARNING"]
    assert cli.main([*options, "--output", str(tmp_path / "one.json")]) == 0
    runs = run_processes(two_host_commands("eval_harness.py", *options, "--output", str(tmp_path / "two.json")),
                         devices=4, cwd=TASKS_DIR)
    assert "results written to" in runs[0].stdout
    assert "results written to" not in runs[1].stdout and "mc_tiny" not in runs[1].stdout
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert_same_metrics(two, one)
    assert_same_samples(two, one)


@pytest.mark.slow
def test_evaluation_during_a_two_host_training_run_matches_one_host(tmp_path):
    tasks = [str(TASKS_DIR / "mc_tiny.yaml"), str(TASKS_DIR / "ppl_tiny.yaml"), str(TASKS_DIR / "gen_tiny.yaml")]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    config = load_config(str(training_config(one, tasks)))
    train(config, TrainOptions(show_progress=False), [harness_hook(config)])
    run_processes(two_host_commands("device_train.py", "--config", str(training_config(two, tasks)), "--no-progress"),
                  devices=4, cwd=TASKS_DIR)
    evaluations = [[r for r in read_metrics(root / "run") if any(k.startswith("eval/") for k in r)]
                   for root in (one, two)]
    assert [r["step"] for r in evaluations[1]] == [r["step"] for r in evaluations[0]] == [2]
    for key, expected in evaluations[0][0].items():
        assert evaluations[1][0][key] == pytest.approx(expected, rel=METRIC_RTOL), key
