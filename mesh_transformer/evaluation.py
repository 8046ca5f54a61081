"""EleutherAI's lm-evaluation-harness on our models: the harness's LM interface, task checks, and
evaluation during training.

``MeshTransformerLM`` is registered in the harness as ``mesh_transformer``. It answers the harness's
three request types the way its reference Hugging Face model (``lm_eval.models.huggingface.HFLM``)
does, so scores are comparable with published ones:

* ``loglikelihood``: context and continuation are tokenized together and split (the harness's
  ``TemplateLM``); an empty context becomes the end-of-text token; a context too long for the window
  loses tokens on the left, keeping the last ``max_length + 1`` tokens of context + continuation.
  Returns the summed log-probability and whether every continuation token is the argmax.
* ``loglikelihood_rolling``: a document is cut into the harness's rolling windows
  (``get_rolling_token_windows`` / ``make_disjoint_window``, one token of context), every token
  scored exactly once.
* ``generate_until``: greedy (or sampled) continuation through ``inference.engine.Generator``, stopping at
  the stop strings, the end-of-text token or ``max_gen_toks``; the prompt keeps its last
  ``max_length - max_gen_toks`` tokens.

Scoring is one jitted forward of ``models.transformer.Transformer`` on the config's mesh:
log-probabilities in float32 over the tokenizer's real vocabulary (``models.outputs``; padded ids
never count; HFLM would include them, which
for GPT-J's 143 padded ids makes differences far below the reported precision). Requests are sorted
by length and batched; every batch has ``batch_size`` rows and a power-of-two length, so a whole
evaluation compiles one program per length bucket (at most log2(seq) of them, shared by later
evaluations of the same model).

During training (``eval_harness_tasks`` in the config) ``TrainingEvaluator`` checks the task names at
start-up and scores the current parameters every ``val_every`` steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, normalize_gen_kwargs
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"evaluation needs lm-evaluation-harness: pip install 'mesh-transformer[eval]' ({e})") from e

from mesh_transformer.checkpoints.params import load_params
from mesh_transformer.config import Config, ConfigError, ModelConfig
from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.shapes import bucket_size
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.models import lora
from mesh_transformer.models.outputs import mask_padded_vocab, real_vocab_size, token_logprobs
from mesh_transformer.models.registry import load_config
from mesh_transformer.models.transformer import Transformer, count_params
from mesh_transformer.sharding import data_parallel_size, logical_to_spec, make_mesh, traced_on
from mesh_transformer.tokenizer import Tokenizer, load_tokenizer
from mesh_transformer.training.hooks import Every, StepInfo

if TYPE_CHECKING:
    from mesh_transformer.training.run import TrainingRun

log = logging.getLogger(__name__)

MODEL_NAME = "mesh_transformer"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for HF models
MIN_LENGTH_BUCKET = 16
TASK_FILE_SUFFIXES = (".yaml", ".yml")
# Sampling settings a generate_until task may give; anything else is refused rather than ignored.
SUPPORTED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


# ----- scoring on the device -----

def continuation_logprobs(cfg: ModelConfig, real_vocab: int, params, inputs, targets, scored):
    """Per row of (batch, length) arrays: the summed log-probability of ``targets`` where ``scored``,
    and whether each scored target is the most likely token. Padded vocabulary ids get no probability."""
    logits = mask_padded_vocab(Transformer(cfg).apply({"params": params}, inputs), real_vocab)
    target_logprobs, _ = token_logprobs(logits, targets, None)  # None: masked above
    is_greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(scored, target_logprobs, 0.0), axis=-1), jnp.all(is_greedy | ~scored, axis=-1)


@functools.lru_cache(maxsize=None)
def _jitted_scorer(cfg: ModelConfig, real_vocab: int, mesh: Mesh):
    """One jitted scorer per model and mesh, shared by every evaluation of a training run. Results are
    replicated so that every process can read them."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(traced_on(mesh, functools.partial(continuation_logprobs, cfg, real_vocab)),
                   out_shardings=(replicated, replicated))


@dataclass(frozen=True)
class ScoringWindow:
    """One forward pass's worth of a request: ``tokens`` (at most max_length + 1) are read as inputs
    ``tokens[:-1]`` predicting ``tokens[1:]``, of which the last ``scored`` count."""

    tokens: tuple[int, ...]
    scored: int


def scoring_window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> ScoringWindow:
    """The window the harness's reference scores: context + continuation cut on the left to max_length + 1."""
    if not continuation:
        raise ValueError("a loglikelihood request has an empty continuation (nothing to score)")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context window "
                         f"of {max_length} tokens")
    return ScoringWindow(tuple([*context, *continuation][-(max_length + 1):]), len(continuation))


# ----- the harness model -----

@register_model(MODEL_NAME)
class MeshTransformerLM(TemplateLM):
    """Our model behind the harness's LM interface.

    From the harness (``--model mesh_transformer --model_args config=CFG[,checkpoint=DIR][,step=N]``):
    ``config`` is a JSON config; the weights are the newest checkpoint of its ``model_dir`` (or
    ``checkpoint``: a run directory, a ``step_N`` directory, or a mesh-transformer-jax checkpoint),
    sharded on the config's mesh. In Python, ``config`` may be a ``Config`` and ``params`` the
    parameters already in memory (sharded on ``mesh``). ``max_length`` defaults to the model's
    ``seq``; ``batch_size`` is the number of windows scored together and of sequences decoded together.
    """

    def __init__(self, config: str | Config, checkpoint: str | None = None, step: int | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234, *, params=None, mesh: Mesh | None = None,
                 tokenizer: Tokenizer | None = None, max_batch_size: int | None = None, device: str | None = None):
        # max_batch_size and device are what the harness passes every model; placement here comes
        # from the config's mesh, and the batch size is fixed.
        super().__init__()
        self.config = config if isinstance(config, Config) else load_config(config)
        self.mesh = mesh or make_mesh(self.config)
        self.tokenizer = tokenizer or load_tokenizer(self.config.run.tokenizer)
        self.real_vocab = real_vocab_size(self.tokenizer, self.config.model.n_vocab, self.config.source)
        self._batch_size = _batch_size_argument(batch_size)
        self._max_length = _max_length_argument(max_length, self.config.model.seq)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.params = params if params is not None else load_params(
            self.config, checkpoint, None if step is None else int(step), self.mesh)
        self._scorer = _jitted_scorer(self.config.model, self.real_vocab, self.mesh)

    # ----- what the harness asks about the model -----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.config.run.tokenizer.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": count_params(self.params), "model_dtype": self.config.model.param_dtype,
                "model_config": self.config.source}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Our tokenizers never add special tokens, like GPT-2's and GPT-NeoX's under HFLM.
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ----- loglikelihood and loglikelihood_rolling -----
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation) strings, context ids, continuation ids), from TemplateLM."""
        windows = [scoring_window(context, continuation, self.max_length) for _, context, continuation in requests]
        results = self.score_windows(windows, disable_tqdm)
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        windows, owners = [], []
        for index, text in enumerate(texts):
            for context, continuation in self.rolling_windows(text):
                windows.append(scoring_window(context, continuation, self.max_length))
                owners.append(index)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self.score_windows(windows, disable_tqdm)):
            totals[owner] += logprob
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) pairs covering every token of ``text`` once, the first conditioned on
        the end-of-text token: the harness's own windows, so perplexities match its reference."""
        windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(window) for window in windows]

    def score_windows(self, windows: list[ScoringWindow], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) per window, computed longest first in padded batches."""
        order = Collator(windows, sort_fn=lambda w: (-len(w.tokens), w.tokens))
        results = []
        with tqdm(total=len(windows), desc="scoring", disable=disable_tqdm or not windows) as progress:
            for batch in order.get_batched(n=self.batch_size):
                results.extend(self._score_batch(batch))
                progress.update(len(batch))
        return order.get_original(results)

    def _score_batch(self, batch: list[ScoringWindow]) -> list[tuple[float, bool]]:
        # Always batch_size rows (only a run's last batch is short), and a power-of-two length: one
        # compilation per length bucket.
        length = bucket_size(max(len(w.tokens) for w in batch) - 1, MIN_LENGTH_BUCKET, self.max_length)
        inputs, targets = np.zeros((self.batch_size, length), np.int32), np.zeros((self.batch_size, length), np.int32)
        scored = np.zeros((self.batch_size, length), bool)
        for row, window in enumerate(batch):
            n = len(window.tokens) - 1
            inputs[row, :n], targets[row, :n] = window.tokens[:-1], window.tokens[1:]
            scored[row, n - window.scored:n] = True
        totals, greedy = jax.device_get(self._scorer(self.params, *map(self._on_mesh, (inputs, targets, scored))))
        return [(float(totals[row]), bool(greedy[row])) for row in range(len(batch))]

    def _on_mesh(self, array: np.ndarray) -> jax.Array:
        """A host batch as a global array, split over dp x fsdp when the rows divide evenly (built from
        each process's own shards, so this works across hosts too)."""
        split = array.shape[0] % data_parallel_size(self.mesh) == 0
        spec = logical_to_spec(("batch", None)) if split else PartitionSpec()
        return jax.make_array_from_callback(array.shape, NamedSharding(self.mesh, spec), lambda index: array[index])

    # ----- generate_until -----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations grouped by generation settings, each group decoded as one continuous batch."""
        if not requests:
            return []
        # The decoding layout of the weights is a second copy; it lives only while generating.
        generator = Generator(self.config.model, self.params, self.tokenizer, self.mesh, max_batch=self.batch_size,
                              context=self.max_length)
        # (context, gen_kwargs, context ids): each context tokenized once, for sorting and as the prompt.
        arguments = [(context, gen_kwargs, self.tok_encode(context)) for context, gen_kwargs in
                     (request.args for request in requests)]
        groups = Collator(arguments, sort_fn=lambda a: (-len(a[2]), a[0]), group_by="gen_kwargs",
                          group_fn=lambda a: a[1])
        texts = []
        with tqdm(total=len(requests), desc="generating", disable=disable_tqdm) as progress:
            for group in groups.get_batched(n=0):  # n=0: each group whole
                texts.extend(self._generate_group(generator, group))
                progress.update(len(group))
        return groups.get_original(texts)

    def _generate_group(self, generator: Generator, group: list[tuple[str, dict, list[int]]]) -> list[str]:
        settings, prompt_limit = self.sampling_params(group[0][1])
        prompts = [ids[-prompt_limit:] for _, _, ids in group]
        seeded = [dataclasses.replace(settings, seed=self.seed + i) for i in range(len(prompts))]
        completions = generator.generate(prompts, seeded)
        for (context, gen_kwargs, _), completion in zip(group, completions):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), completion.text)
        return [completion.text for completion in completions]

    def sampling_params(self, gen_kwargs: dict) -> tuple[SamplingParams, int]:
        """A task's ``generation_kwargs`` as SamplingParams, and how many prompt tokens fit beside them."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        unsupported = sorted(set(kwargs) - SUPPORTED_GEN_KWARGS)
        if unsupported:
            raise ValueError(f"generation_kwargs {unsupported} are not supported by {MODEL_NAME} "
                             f"(supported: {', '.join(sorted(SUPPORTED_GEN_KWARGS))})")
        max_gen_toks = kwargs["max_gen_toks"]
        if not 0 < max_gen_toks < self.max_length:
            raise ValueError(f"generation_kwargs max_gen_toks is {max_gen_toks}; it must be between 1 and "
                             f"{self.max_length - 1} (the context window is {self.max_length} tokens)")
        # The end-of-text text is a stop string too, as in the harness: some tokenizers spell it out.
        stops = [*kwargs["until"], self.tok_decode([self.eot_token_id])]
        settings = SamplingParams(max_new_tokens=max_gen_toks,
                                  temperature=float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0,
                                  top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                                  stop=tuple(dict.fromkeys(s for s in stops if s)))
        return settings, self.max_length - max_gen_toks


def _batch_size_argument(value: int | str | None) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"batch_size must be a number, got {value!r} (automatic batch sizes are not "
                         f"supported by {MODEL_NAME})") from None
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


def _max_length_argument(value: int | None, seq: int) -> int:
    if value is None:
        return seq
    if not 1 <= int(value) <= seq:
        raise ValueError(f"max_length must be between 1 and the model's seq ({seq}), got {value}")
    return int(value)


# ----- tasks -----

def is_task_file(name: str) -> bool:
    """A task given as the path of a YAML task file, which the harness loads like a task name."""
    return name.endswith(TASK_FILE_SUFFIXES) and os.path.isfile(name)


def check_task_names(names: Iterable[str], task_manager: TaskManager, where: str) -> None:
    """Raise a ConfigError naming every unknown task of ``names`` and the harness's closest names."""
    known = task_manager.all_tasks
    problems = []
    for name in names:
        if name in known or is_task_file(name):
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "no close names"
        problems.append(f"unknown lm-evaluation-harness task {name!r} ({hint})")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}. List the tasks with `lm-eval ls tasks`, or give "
                          "the path of a task YAML file.")


def harness_metrics(results: dict) -> dict[str, float]:
    """The numeric per-task metrics of a harness result as ``eval/{task}/{metric}``; a metric under a
    filter other than the default one is named ``{metric}_{filter}``."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not filter_name:
                continue
            metrics[f"eval/{task}/{name if filter_name == 'none' else f'{name}_{filter_name}'}"] = float(value)
    return metrics


# ----- during training -----

class TrainingEvaluator:
    """The config's ``eval_harness_tasks`` run on the parameters being trained.

    Constructed at start-up so that a bad task name stops the run before any training step. Each
    evaluation runs the tasks' whole evaluation sets with their own few-shot setting (zero unless a
    task's YAML says otherwise), without standard errors.
    """

    def __init__(self, config: Config, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.tasks = list(config.run.eval_harness_tasks)
        self.task_manager = TaskManager()
        check_task_names(self.tasks, self.task_manager, f"{config.source}: eval_harness_tasks")
        self.tokenizer = load_tokenizer(config.run.tokenizer)

    def evaluate(self, params) -> dict[str, float]:
        lm = MeshTransformerLM(self.config, params=params, mesh=self.mesh, tokenizer=self.tokenizer)
        results = simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.task_manager, bootstrap_iters=0,
                                  log_samples=False)
        metrics = harness_metrics(results)
        log.info("lm-evaluation-harness: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics


def harness_hook(config: Config):
    """The config's ``eval_harness_tasks`` as a training hook (``training.hooks``), every ``val_every``
    steps: a function of the run that ``TrainingRun`` calls once its mesh exists and before it writes
    anything, so that a bad task name stops the run first."""
    def for_run(run: TrainingRun) -> Every:
        evaluator = TrainingEvaluator(config, run.mesh)

        def evaluate(info: StepInfo) -> None:
            params = info.state.params
            if info.state.frozen is not None:  # the harness runs the plain model: on a merged copy of the base
                params = jax.jit(lora.merge, static_argnums=2)(info.state.frozen, params, run.trainer.model_config)
            run.metrics.log(info.step, evaluator.evaluate(params))

        return Every(evaluate, config.train.val_every)

    return for_run
