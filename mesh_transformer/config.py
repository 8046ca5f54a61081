"""Typed configuration, read from the original mesh-transformer-jax JSON keys and validated once.

Every key of the original configs is accepted with its original meaning; new keys (``mesh``,
``tokenizer``, ``seed``, dtypes, remat...) are optional. The rest of the code receives the frozen
dataclasses defined here, never raw dicts.

Three keys fill in the rest of a config (docs/architectures.md): ``"extends"`` (another config file
whose keys this one overrides), ``"model"`` (a preset from ``models/presets.py``: an architecture and
a published shape) and ``"architecture"`` (whose defaults fill every model key not set, and whose
fixed choices the config may not contradict). Without ``"architecture"`` a config means what it
always did, and its architecture is inferred from the flat keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mesh_transformer import storage
from mesh_transformer.data.loader import BAD_RECORD_POLICIES
from mesh_transformer.errors import ConfigError
from mesh_transformer.models.presets import PRESETS
from mesh_transformer.models.registry import architecture_of, get_architecture, inferred_architecture

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
# "auto": bfloat16 matmuls on accelerators (float32 master weights and optimizer state, as the original
# trained), float32 on CPUs, which have no fast bfloat16 and where the tests compare against float32.
COMPUTE_DTYPES = ("auto", *DTYPES)
BF16_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ROTARY_STYLES = ("gptj", "neox")
SUPPORTED_PE = ("rotary", "fixed")
ACTIVATIONS = ("gelu_new", "gelu", "silu")
MLPS = ("dense", "gated")
RESIDUALS = ("parallel", "sequential")
ATTENTION_KINDS = ("global", "local")
SUPPORTED_NORMS = ("layernorm", "rmsnorm")
# "flash": the platform's fused kernel (a Pallas splash kernel on TPU, cuDNN on GPU, the TPU kernel
# interpreted on CPU, for tests); "auto": flash where it is the faster choice, else "xla".
ATTENTION = ("auto", "xla", "flash")
# TPU generations whose Pallas (Mosaic) compiler has no bfloat16 matmul: the kernel runs in float32.
FLOAT32_KERNEL_TPUS = ("TPU v2", "TPU v3")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (the config's ``"lora"`` object, docs/lora.md): ``W x + (alpha / rank) B A dropout(x)``
    on each targeted projection of every layer; the base weights stay frozen."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # peft's target_modules names for the architecture (Architecture.lora_targets)
    dropout: float = 0.0
    base_dtype: str | None = None  # the frozen base's storage dtype; None: param_dtype

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModelConfig:
    layers: int
    d_model: int
    n_heads: int
    n_vocab: int
    seq: int
    # "gptj", "gpt_neo", ...: named in the config, else inferred from the flat keys when parsing
    # (None only in ModelConfigs built directly; ``registry.architecture_of`` resolves those).
    architecture: str | None = None
    norm: str = "layernorm"
    pe: str = "rotary"
    pe_rotary_dims: int | None = None
    rotary_style: str = "gptj"
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    d_head: int | None = None
    n_kv_heads: int | None = None  # grouped-query attention: fewer key/value heads than query heads
    param_dtype: str = "float32"
    compute_dtype: str = "auto"
    remat: str = "full"
    scan_unroll: int = 1
    attention: str = "auto"  # ATTENTION, resolved to a kernel by ``for_platform`` (``resolve_attention``)
    sequence_parallel: bool = False  # split the residual stream's length over mp between layers
    # Architecture variants (GPT-J defaults; a named architecture sets its own, see models/<architecture>.py).
    d_ff: int | None = None
    activation: str = "gelu_new"
    mlp: str = "dense"
    mlp_bias: bool = True
    residual: str = "parallel"
    separate_mlp_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    scale_attention: bool = True
    attention_layers: tuple[str, ...] = ()
    window_size: int = 256
    tie_embeddings: bool = False
    lm_head_bias: bool = True
    # Adapters the model applies: set by training from Config.lora, never read from a config's model keys,
    # so inference (on merged weights) builds the plain model from the same config.
    lora: LoraConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rotary_dims(self) -> int:
        if self.pe != "rotary":
            return 0
        return self.pe_rotary_dims if self.pe_rotary_dims is not None else self.head_dim

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def has_local_attention(self) -> bool:
        return "local" in self.attention_layers

    def for_platform(self, platform: str, device_kind: str = "") -> "ModelConfig":
        """This config with ``compute_dtype`` and ``attention`` resolved for a JAX platform (``tpu``,
        ``gpu``, ``cpu``) and device kind (``jax.Device.device_kind``, e.g. ``"TPU v3"``)."""
        dtype = resolve_compute_dtype(self.compute_dtype, platform)
        return dataclasses.replace(self, compute_dtype=dtype,
                                   attention=resolve_attention(self.attention, platform, device_kind, dtype))


def resolve_compute_dtype(requested: str, platform: str) -> str:
    """The dtype matmuls run in: an explicit choice stays, ``auto`` is bfloat16 on accelerators."""
    if requested != "auto":
        return requested
    return "bfloat16" if platform in BF16_PLATFORMS else "float32"


def resolve_attention(requested: str, platform: str, device_kind: str, compute_dtype: str) -> str:
    """The attention kernel a model runs (``models.attention.KERNELS``) for a config's ``attention``.

    ``auto`` is the fused kernel on GPUs (cuDNN, which takes bfloat16 only) and on TPUs from v4 on;
    on v2/v3 the Pallas kernel would run its matmuls in float32, several times slower than XLA's
    bfloat16 ones, so ``auto`` keeps XLA there and ``flash`` is for contexts XLA cannot fit.
    Resolving twice changes nothing.
    """
    if requested not in ("auto", "flash"):
        return requested
    old_tpu = platform == "tpu" and device_kind.startswith(FLOAT32_KERNEL_TPUS)
    gpu_float32 = platform not in ("tpu", "cpu") and compute_dtype != "bfloat16"
    if requested == "auto" and (platform == "cpu" or old_tpu or gpu_float32):
        return "xla"
    if platform == "tpu":
        return "splash_float32" if old_tpu else "splash"
    if platform == "cpu":
        return "splash_interpret"
    if compute_dtype != "bfloat16":
        raise ConfigError(f'config key "attention": "flash" on {platform} runs cuDNN\'s fused kernel, which needs '
                          f'"compute_dtype": "bfloat16" (got {compute_dtype!r}); use "attention": "xla" for float32.')
    return "cudnn"


@dataclass(frozen=True)
class MeshConfig:
    dp: int = -1
    fsdp: int = 1
    mp: int = 1


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    end_lr: float | None = None
    warmup_steps: int = 0
    anneal_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    z_loss: float = 0.0

    @property
    def final_lr(self) -> float:
        return self.lr if self.end_lr is None else self.end_lr


@dataclass(frozen=True)
class TrainConfig:
    per_replica_batch: int = 1
    gradient_accumulation_steps: int = 1
    total_steps: int = 1
    seed: int = 0
    ckpt_every: int = 500
    keep_every: int | None = None
    keep_last: int = 3
    val_every: int = 500
    val_batches: int = 100
    log_every: int = 1
    grad_accum_dtype: str = "float32"
    max_consecutive_bad_steps: int = 20
    skip_step_on_spikes: bool = False
    spike_window: int = 100
    spike_threshold: float = 6.0
    bad_records: str = "stop"  # a damaged tfrecord record: "stop" the run, or "skip" it (logged, counted)
    # Packed records hold several documents, each ended by EOS. true: each attends only to itself
    # (segment ids, positions from 0 per document); false: the original's attention across them.
    reset_attention_at_eos: bool = False
    eos_token_id: int | None = None  # the document separator; None: the tokenizer's EOS


@dataclass(frozen=True)
class RunConfig:
    """Where data comes from and where results go; identifiers for logging."""

    model_dir: str = ""
    bucket: str = ""
    # An index file, or a mixture: index file -> weight (positive; batches draw rows in proportion).
    train_set: str | dict[str, float] = ""
    val_set: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "gpt2"
    name: str = "mesh_transformer"
    wandb_project: str | None = None
    tensorboard_dir: str | None = None
    comment: str = ""
    eval_harness_tasks: tuple[str, ...] = ()
    tpu_size: int | None = None
    slice: str | None = None  # the hardware the config is meant for, e.g. "v3-8" (used by the planner)

    @property
    def checkpoint_dir(self) -> str:
        """``gs://{bucket}/{model_dir}`` when a bucket is set, as in the original; else model_dir."""
        if self.bucket:
            return f"gs://{self.bucket}/{self.model_dir}"
        return self.model_dir


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    mesh: MeshConfig | None
    optimizer: OptimizerConfig
    train: TrainConfig
    run: RunConfig
    cores_per_replica: int = 1
    source: str = "<dict>"
    lora: LoraConfig | None = None

    def mesh_request(self) -> MeshConfig:
        """The mesh asked for: the explicit ``mesh`` key, or the original's (dp=rest, mp=cores_per_replica)."""
        return self.mesh or MeshConfig(dp=-1, fsdp=1, mp=self.cores_per_replica)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# Keys that the original code read but that have no separate effect here, with the reason.
_LEGACY_NOTES = {
    "early_cast": "parameters are cast to compute_dtype inside each layer",
    "bf16_optimizer": "optimizer state follows param_dtype (float32 unless set)",
    "early_collect": "XLA schedules collectives itself",
    "eval_only": "use eval_harness.py for evaluation-only runs",
    "gen_length": "sampling takes the length per request",
    "val_batch_multiplier": "set val_batches instead",
    "noise_scale_alpha": "gradient noise scale is not tracked",
}

# Which top-level JSON key feeds which section and field.
_SECTION_OF = {
    **{f.name: ("model", f.name) for f in dataclasses.fields(ModelConfig) if f.name != "lora"},
    **{f.name: ("optimizer", f.name) for f in dataclasses.fields(OptimizerConfig)},
    **{f.name: ("train", f.name) for f in dataclasses.fields(TrainConfig)},
    **{f.name: ("run", f.name) for f in dataclasses.fields(RunConfig)},
}
_TOP_LEVEL_KEYS = {"mesh", "cores_per_replica", "lora"}
# Keys replaced by what they name before the sections are read: a base config file and a preset.
_EXPANDED_KEYS = {"extends", "model"}


def load_config(path: str) -> Config:
    """Read and validate a JSON config from a local path or URL."""
    return parse_config(read_config_dict(path), source=path)


def read_config_dict(path: str) -> dict[str, Any]:
    """A JSON config file's object as ``parse_config`` takes it, for callers that pass the config on
    unparsed (the pod launcher sends it to every host). ``"extends"`` is resolved here: the result
    holds the base files' keys, overridden by those of the files that extend them."""
    return _read_extending(path, ())


def _read_extending(path: str, extended_by: tuple[str, ...]) -> dict[str, Any]:
    raw = _read_json_object(path)
    if "extends" not in raw:
        return raw
    base = _base_config_path(path, _checked_value(path, "extends", raw.pop("extends"), str))
    chain = (*extended_by, _normalised(path))
    if _normalised(base) in chain:
        raise ConfigError(f'{path}: "extends" forms a cycle: {" -> ".join((*chain, _normalised(base)))}.')
    return {**_read_extending(base, chain), **raw}


def _base_config_path(path: str, base: str) -> str:
    """``base`` as named in ``path``'s "extends": a URL or absolute path as is, else relative to ``path``'s folder."""
    if not storage.is_local(base) or os.path.isabs(storage.local_path(base)):
        return base
    return storage.join(storage.dirname(path), base)


def _normalised(path: str) -> str:
    return os.path.normpath(storage.local_path(path)) if storage.is_local(path) else path


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        raw = json.loads(storage.read_text(path))
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(raw).__name__}")
    return raw


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a config dict (original or new keys) into typed sections.

    A ``"model"`` preset's keys, then a named architecture's defaults, fill in the keys ``raw`` does not set.
    """
    if "extends" in raw:
        raise ConfigError(f'{source}: "extends" names a file relative to the config file; read the config with '
                          "load_config (or read_config_dict) so that it is resolved.")
    raw = _with_architecture_defaults(_with_preset(raw, source), source)
    named = raw.get("architecture") is not None
    sections: dict[str, dict[str, Any]] = {"model": {}, "optimizer": {}, "train": {}, "run": {}}
    for key, value in raw.items():
        if key in _LEGACY_NOTES:
            log.info("config key %r accepted without separate effect: %s", key, _LEGACY_NOTES[key])
            continue
        if key in _TOP_LEVEL_KEYS:
            continue
        if key not in _SECTION_OF:
            raise ConfigError(_unknown_key_message(source, key))
        section, name = _SECTION_OF[key]
        sections[section][name] = value
    if "val_set" in sections["run"] and isinstance(sections["run"]["val_set"], str):
        sections["run"]["val_set"] = {"val": sections["run"]["val_set"]}
    for section, key in (("run", "eval_harness_tasks"), ("model", "attention_layers")):
        if isinstance(sections[section].get(key), list):
            sections[section][key] = tuple(sections[section][key])

    model = _build(ModelConfig, sections["model"], source)
    config = Config(
        model=model if named else dataclasses.replace(model, architecture=inferred_architecture(model).name),
        mesh=_build_mesh(raw.get("mesh"), source),
        optimizer=_build(OptimizerConfig, sections["optimizer"], source),
        train=_build(TrainConfig, sections["train"], source),
        run=_build(RunConfig, sections["run"], source),
        cores_per_replica=_checked_value(source, "cores_per_replica", raw.get("cores_per_replica", 1), int),
        source=source,
        lora=_build_lora(raw.get("lora"), source),
    )
    validate(config)
    if named:
        _check_architecture(config.model, source)
    return config


def _with_preset(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The preset's keys overridden by ``raw``'s own, when ``raw`` names a preset in "model"."""
    if "model" not in raw:
        return raw
    name = _checked_value(source, "model", raw["model"], str)
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"{source}: config key 'model' is {name!r}, which is not a preset.{hint} "
                          f"Presets: {', '.join(PRESETS)}.")
    return {**PRESETS[name], **{key: value for key, value in raw.items() if key != "model"}}


def _with_architecture_defaults(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The named architecture's defaults overridden by ``raw``'s own keys; ``raw`` itself when none is named."""
    if raw.get("architecture") is None:
        return raw
    architecture = get_architecture(_checked_value(source, "architecture", raw["architecture"], str), source)
    return {**architecture.model_defaults, **raw}


def _check_architecture(m: ModelConfig, source: str) -> None:
    """A config that names its architecture may not contradict what that architecture fixes."""
    problems = get_architecture(m.architecture, source).problems(m)
    if problems:
        raise ConfigError(f"{source}: architecture {m.architecture!r} does not allow this: {problems[0]}")


def _unknown_key_message(source: str, key: str) -> str:
    known = sorted(set(_SECTION_OF) | _TOP_LEVEL_KEYS | _EXPANDED_KEYS | set(_LEGACY_NOTES))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{source}: unknown config key {key!r}.{hint} Remove it or fix its spelling."


def _build(cls, values: dict[str, Any], source: str, prefix: str = ""):
    """``cls`` from ``values``, keyed by field name after ``prefix`` (which messages keep: "lora.rank")."""
    hints = typing.get_type_hints(cls)
    missing = [f.name for f in dataclasses.fields(cls) if _is_required(f) and prefix + f.name not in values]
    if missing:
        raise ConfigError(f"{source}: missing required config key {prefix + missing[0]!r} "
                          f"({_describe(hints[missing[0]])}).")
    checked = {name[len(prefix):]: _checked_value(source, name, value, hints[name[len(prefix):]])
               for name, value in values.items()}
    return cls(**checked)


def _build_mesh(raw_mesh: Any, source: str) -> MeshConfig | None:
    if raw_mesh is None:
        return None
    if not isinstance(raw_mesh, dict):
        raise ConfigError(f'{source}: config key "mesh" must be an object like {{"dp": 2, "fsdp": 1, "mp": 4}}.')
    unknown = set(raw_mesh) - {"dp", "fsdp", "mp"}
    if unknown:
        raise ConfigError(f'{source}: "mesh" has unknown axis {sorted(unknown)[0]!r}; the axes are dp, fsdp and mp.')
    sizes = {axis: _checked_value(source, f"mesh.{axis}", raw_mesh.get(axis, 1), int) for axis in ("dp", "fsdp", "mp")}
    if sum(1 for v in sizes.values() if v == -1) > 1:
        raise ConfigError(f'{source}: at most one "mesh" axis may be -1 (meaning: the remaining devices).')
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f'{source}: "mesh.{axis}" must be a positive integer or -1, got {size}.')
    return MeshConfig(**sizes)


def _build_lora(raw_lora: Any, source: str) -> LoraConfig | None:
    if raw_lora is None:
        return None
    example = '{"rank": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}'
    if not isinstance(raw_lora, dict):
        raise ConfigError(f'{source}: config key "lora" must be an object like {example}.')
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(raw_lora) - names)
    if unknown:
        raise ConfigError(f'{source}: "lora" has unknown key {unknown[0]!r}; its keys are {", ".join(sorted(names))}.')
    values = dict(raw_lora)
    if isinstance(values.get("targets"), list):
        values["targets"] = tuple(values["targets"])
    return _build(LoraConfig, {f"lora.{k}": v for k, v in values.items()}, source, prefix="lora.")


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is dict:
        return "an object mapping names to " + {str: "strings", float: "numbers"}[typing.get_args(tp)[1]]
    if origin is tuple:
        return "a list of strings"
    return str(tp)


def _checked_value(source: str, key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` if it matches type ``tp`` (ints accepted as floats), else raise a ConfigError."""
    if _matches(value, tp):
        if isinstance(value, dict) and _is_optional_of(tp, dict[str, float]):
            return {k: float(v) for k, v in value.items()}
        return float(value) if tp is float or (_is_optional_of(tp, float) and value is not None) else value
    raise ConfigError(f"{source}: config key {key!r} must be {_describe(tp)}, got {value!r} ({type(value).__name__}).")


def _is_optional_of(tp: Any, inner: type) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and inner in typing.get_args(tp)


def _matches(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else _matches(value, a) for a in typing.get_args(tp))
    if origin is dict:
        value_type = typing.get_args(tp)[1]
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, value_type) for k, v in value.items())
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    raise TypeError(f"unsupported config field type {tp}")


def _choice(source: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: config key {key!r} is {value!r}; supported values: {', '.join(allowed)}.")


def _positive(source: str, key: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{source}: config key {key!r} must be {bound}, got {value}.")


def validate(config: Config) -> None:
    """Cross-field checks that need no devices; mesh divisibility is checked in ``check_mesh_fits``."""
    src, m = config.source, config.model
    for key in ("layers", "d_model", "n_heads", "n_vocab", "seq"):
        _positive(src, key, getattr(m, key))
    _choice(src, "norm", m.norm, SUPPORTED_NORMS)
    _choice(src, "pe", m.pe, SUPPORTED_PE)
    _choice(src, "rotary_style", m.rotary_style, ROTARY_STYLES)
    _choice(src, "param_dtype", m.param_dtype, DTYPES)
    _choice(src, "compute_dtype", m.compute_dtype, COMPUTE_DTYPES)
    _choice(src, "remat", m.remat, REMAT_POLICIES)
    _positive(src, "scan_unroll", m.scan_unroll)
    _choice(src, "attention", m.attention, ATTENTION)
    if m.d_head is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"{src}: d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads}), or set d_head explicitly."
        )
    if m.pe == "rotary" and (m.rotary_dims % 2 or not 0 < m.rotary_dims <= m.head_dim):
        raise ConfigError(
            f"{src}: pe_rotary_dims ({m.rotary_dims}) must be even and between 2 and the head size ({m.head_dim})."
        )
    _choice(src, "activation", m.activation, ACTIVATIONS)
    _choice(src, "mlp", m.mlp, MLPS)
    if m.n_kv_heads is not None:
        _positive(src, "n_kv_heads", m.n_kv_heads)
        if m.n_heads % m.n_kv_heads:
            raise ConfigError(f"{src}: n_heads ({m.n_heads}) must be divisible by n_kv_heads ({m.n_kv_heads}); "
                              "each key/value head serves an equal group of query heads.")
    _choice(src, "residual", m.residual, RESIDUALS)
    if m.residual == "sequential" and not m.separate_mlp_norm:
        raise ConfigError(f'{src}: residual "sequential" needs separate_mlp_norm: true (a norm before each branch).')
    if m.attention_layers and len(m.attention_layers) != m.layers:
        raise ConfigError(f"{src}: attention_layers lists {len(m.attention_layers)} entries but layers is "
                          f"{m.layers}; give one of {', '.join(ATTENTION_KINDS)} per layer.")
    for kind in m.attention_layers:
        _choice(src, "attention_layers", kind, ATTENTION_KINDS)
    _positive(src, "window_size", m.window_size)
    if m.d_ff is not None:
        _positive(src, "d_ff", m.d_ff)
    if m.tie_embeddings and m.lm_head_bias:
        raise ConfigError(f"{src}: tie_embeddings: true reuses wte as the output layer, which has no bias; "
                          "set lm_head_bias: false.")
    t, o = config.train, config.optimizer
    _choice(src, "grad_accum_dtype", t.grad_accum_dtype, DTYPES)
    _choice(src, "bad_records", t.bad_records, BAD_RECORD_POLICIES)
    for key in ("per_replica_batch", "gradient_accumulation_steps", "total_steps", "ckpt_every", "val_every",
                "keep_last", "log_every", "max_consecutive_bad_steps", "spike_window", "spike_threshold"):
        _positive(src, key, getattr(t, key))
    _positive(src, "val_batches", t.val_batches, allow_zero=True)
    if t.eos_token_id is not None and not 0 <= t.eos_token_id < m.n_vocab:
        raise ConfigError(f"{src}: config key 'eos_token_id' ({t.eos_token_id}) must be a token id in "
                          f"[0, n_vocab={m.n_vocab}).")
    if t.keep_every is not None:
        _positive(src, "keep_every", t.keep_every)
    for key in ("warmup_steps", "anneal_steps"):
        _positive(src, key, getattr(o, key), allow_zero=True)
    _positive(src, "lr", o.lr, allow_zero=True)
    _positive(src, "weight_decay", o.weight_decay, allow_zero=True)
    _positive(src, "z_loss", o.z_loss, allow_zero=True)
    _positive(src, "cores_per_replica", config.cores_per_replica)
    _validate_train_set(config.run.train_set, src)
    if config.lora is not None:
        _validate_lora(config.lora, m, src)


def _validate_lora(lora: LoraConfig, m: ModelConfig, src: str) -> None:
    _positive(src, "lora.rank", lora.rank)
    _positive(src, "lora.alpha", lora.alpha)
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"{src}: config key 'lora.dropout' must be in [0, 1), got {lora.dropout}.")
    if lora.base_dtype is not None:
        _choice(src, "lora.base_dtype", lora.base_dtype, DTYPES)
    architecture = architecture_of(m)
    valid = tuple(architecture.lora_targets)
    if not lora.targets:
        raise ConfigError(f"{src}: config key 'lora.targets' is empty; name the projections to adapt, from: "
                          f"{', '.join(valid)}.")
    for target in lora.targets:
        if target not in valid:
            raise ConfigError(f"{src}: config key 'lora.targets' has {target!r}, which is not a projection of "
                              f"{architecture.title} ({architecture.name}); valid targets: {', '.join(valid)}.")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"{src}: config key 'lora.targets' names a projection twice: {list(lora.targets)}.")


def _validate_train_set(train_set: str | dict[str, float], src: str) -> None:
    """A mixture names at least one index file, each with a positive, finite weight."""
    if isinstance(train_set, str):
        return
    example = '{"pile.train.index": 0.9, "gs://bucket/code.index": 0.1}'
    if not train_set:
        raise ConfigError(f"{src}: config key 'train_set' is an empty object; map index files to weights, e.g. {example}.")
    for index, weight in train_set.items():
        if not index.strip():
            raise ConfigError(f"{src}: config key 'train_set' has an empty index file name; e.g. {example}.")
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{src}: config key 'train_set' gives {index!r} the weight {weight}; weights must be "
                              "positive finite numbers (they are normalised to proportions).")


def check_mesh_fits(config: Config, dp: int, fsdp: int, mp: int) -> None:
    """Raise a ConfigError if the model's sharded dimensions do not divide the mesh axes."""
    m, src = config.model, config.source
    fix = 'change "mesh" (or cores_per_replica) or the model shape'
    for key, size in (("n_heads", m.n_heads), ("n_kv_heads", m.kv_heads), ("n_vocab", m.n_vocab), ("d_ff", m.ff_dim)):
        if size % mp:
            raise ConfigError(f"{src}: {key} ({size}) must be divisible by the mp (tensor-parallel) size {mp}; {fix}.")
    if m.d_model % fsdp:
        raise ConfigError(f"{src}: d_model ({m.d_model}) must be divisible by the fsdp size {fsdp}; {fix}.")
    if m.sequence_parallel and m.seq % mp:
        raise ConfigError(f"{src}: sequence_parallel splits seq ({m.seq}) over the mp size {mp}, which must "
                          f"divide it; {fix}.")


def to_json_dict(config: Config) -> dict[str, Any]:
    """A flat JSON dict in the original key style (round-trips through ``parse_config``)."""
    flat: dict[str, Any] = {}
    for section in (config.model, config.optimizer, config.train, config.run):
        for f in dataclasses.fields(section):
            if f.name == "lora":  # the model's copy of Config.lora, written once below
                continue
            value = getattr(section, f.name)
            flat[f.name] = list(value) if isinstance(value, tuple) else value
    if architecture_of(config.model).problems(config.model):
        # Only an inferred architecture can be contradicted (a named one is checked when parsing).
        # Leave it out, so that reading the dict infers it again rather than refusing the config.
        del flat["architecture"]
    flat["cores_per_replica"] = config.cores_per_replica
    if config.mesh is not None:
        flat["mesh"] = dataclasses.asdict(config.mesh)
    if config.lora is not None:
        flat["lora"] = {**dataclasses.asdict(config.lora), "targets": list(config.lora.targets)}
    return flat
