"""The config schema: typed, frozen dataclasses read from the original mesh-transformer-jax JSON keys.

Every key of the original configs is accepted with its original meaning; new keys (``mesh``,
``tokenizer``, ``seed``, dtypes, remat...) are optional. The rest of the code receives the frozen
dataclasses defined here, never raw dicts.

A key is one dataclass field, and its declared type is its check: ``Literal[...]`` for a
choice, ``Annotated[..., Check]`` for a range (``PositiveInt``...), and every number must be finite.
A file may give a key once per object (``read_config_dict``). ``build_config`` reads a flat
dict into the sections, checking each value against its field's type, then runs the few checks
that relate several keys (``validate``). This module knows no kernel, mesh, data loader or
architecture: ``models/registry.py`` expands presets and architectures (``load_config``,
``parse_config``) before calling ``build_config``, and resolves "extends" through
``read_config_dict`` here.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from mesh_transformer import storage
from mesh_transformer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """A condition on a field's value, declared with its type (``Annotated[int, POSITIVE]``) and
    checked when a config sets the field; ``text`` is how messages state it ("> 0")."""

    text: str
    holds: Callable[[Any], bool]


POSITIVE = Check("> 0", lambda value: value > 0)
NON_NEGATIVE = Check(">= 0", lambda value: value >= 0)
FRACTION = Check("in [0, 1)", lambda value: 0 <= value < 1)
PositiveInt = Annotated[int, POSITIVE]
PositiveFloat = Annotated[float, POSITIVE]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]

# The choices more than one field (or module) names; a choice of one field is declared in place.
Dtype = Literal["float32", "bfloat16"]
AttentionKind = Literal["global", "local"]
BadRecordPolicy = Literal["stop", "skip"]  # what the data loader does with a damaged record


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (the config's ``"lora"`` object, docs/lora.md): ``W x + (alpha / rank) B A dropout(x)``
    on each targeted projection of every layer; the base weights stay frozen."""

    rank: PositiveInt
    alpha: PositiveFloat
    targets: tuple[str, ...]  # peft's target_modules names for the architecture (Architecture.lora_targets)
    dropout: Annotated[float, FRACTION] = 0.0
    base_dtype: Dtype | None = None  # the frozen base's storage dtype; None: param_dtype

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModelConfig:
    layers: PositiveInt
    d_model: PositiveInt
    n_heads: PositiveInt
    n_vocab: PositiveInt
    seq: PositiveInt
    # "gptj", "gpt_neo", ...: named in the config, else inferred from the flat keys when parsing
    # (None only in ModelConfigs built directly; ``registry.architecture_of`` resolves those).
    architecture: str | None = None
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    pe: Literal["rotary", "fixed"] = "rotary"
    pe_rotary_dims: int | None = None
    rotary_style: Literal["gptj", "neox"] = "gptj"
    rotary_base: PositiveFloat = 10000.0
    layer_norm_eps: PositiveFloat = 1e-5
    d_head: int | None = None
    n_kv_heads: PositiveInt | None = None  # grouped-query attention: fewer key/value heads than query heads
    param_dtype: Dtype = "float32"
    # "auto": bfloat16 matmuls on accelerators (float32 master weights and optimizer state, as the original
    # trained), float32 on CPUs, which have no fast bfloat16 and where the tests compare against float32.
    compute_dtype: Literal["auto", Dtype] = "auto"
    remat: Literal["none", "full", "dots", "dots_with_no_batch_dims"] = "full"
    scan_unroll: PositiveInt = 1
    # "flash": the platform's fused kernel; "auto": flash where it is the faster choice, else "xla".
    # ``models.attention.for_platform`` replaces it by the kernel that runs (``attention.KERNELS``).
    attention: Literal["auto", "xla", "flash"] = "auto"
    sequence_parallel: bool = False  # split the residual stream's length over mp between layers
    # Architecture variants (GPT-J defaults; a named architecture sets its own, see models/<architecture>.py).
    d_ff: PositiveInt | None = None
    activation: Literal["gelu_new", "gelu", "silu"] = "gelu_new"
    mlp: Literal["dense", "gated"] = "dense"
    mlp_bias: bool = True
    residual: Literal["parallel", "sequential"] = "parallel"
    separate_mlp_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    scale_attention: bool = True
    attention_layers: tuple[AttentionKind, ...] = ()
    window_size: PositiveInt = 256
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


@dataclass(frozen=True)
class MeshConfig:
    dp: int = -1
    fsdp: int = 1
    mp: int = 1


@dataclass(frozen=True)
class OptimizerConfig:
    lr: NonNegativeFloat
    end_lr: NonNegativeFloat | None = None
    warmup_steps: NonNegativeInt = 0
    anneal_steps: NonNegativeInt = 0
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat = 1.0  # the global norm gradients are clipped at (0 would zero every update)
    b1: Annotated[float, FRACTION] = 0.9
    b2: Annotated[float, FRACTION] = 0.999
    eps: PositiveFloat = 1e-8
    z_loss: NonNegativeFloat = 0.0

    @property
    def final_lr(self) -> float:
        return self.lr if self.end_lr is None else self.end_lr


@dataclass(frozen=True)
class TrainConfig:
    per_replica_batch: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    total_steps: PositiveInt = 1
    seed: int = 0
    ckpt_every: PositiveInt = 500
    keep_every: PositiveInt | None = None
    keep_last: PositiveInt = 3
    val_every: PositiveInt = 500
    val_batches: NonNegativeInt = 100
    log_every: PositiveInt = 1
    grad_accum_dtype: Dtype = "float32"
    max_consecutive_bad_steps: PositiveInt = 20
    skip_step_on_spikes: bool = False
    spike_window: PositiveInt = 100
    spike_threshold: PositiveFloat = 6.0
    bad_records: BadRecordPolicy = "stop"  # a damaged tfrecord record: "stop" the run, or "skip" it (logged, counted)
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
    cores_per_replica: PositiveInt = 1
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
# Keys replaced by what they name before the build: a base config file (``read_config_dict``) and a
# preset (``models.registry.parse_config``).
EXPANDED_KEYS = ("extends", "model")


def config_keys() -> set[str]:
    """Every top-level key a JSON config may set (each one row of docs/config.md)."""
    return set(_SECTION_OF) | _TOP_LEVEL_KEYS | set(EXPANDED_KEYS) | set(_LEGACY_NOTES)


def read_config_dict(path: str) -> dict[str, Any]:
    """A JSON config file's object as ``models.registry.parse_config`` takes it, for callers that pass the
    config on unparsed (the pod launcher sends it to every host). ``"extends"`` is resolved here: the
    result holds the base files' keys, overridden by those of the files that extend them."""
    return _read_extending(path, ())


def _read_extending(path: str, extended_by: tuple[str, ...]) -> dict[str, Any]:
    raw = _read_json_object(path)
    if "extends" not in raw:
        return raw
    base = _base_config_path(path, checked_value(path, "extends", raw.pop("extends"), str))
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
        raw = _without_repeated_keys(json.loads(storage.read_text(path), object_pairs_hook=_JsonObject), "", path)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text, so not a JSON config ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON: nested too deeply to be read") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(raw).__name__}")
    return raw


class _JsonObject(list):
    """A JSON object's (key, value) pairs in the file's order, kept so that a repeated key is seen: ``json``
    itself keeps the last value of a key silently."""


def _without_repeated_keys(value: Any, path: str, source: str) -> Any:
    """``value`` with its ``_JsonObject``s as dicts; ConfigError naming a key (as "mesh.dp" inside an
    object) that one object gives twice, and both values."""
    if isinstance(value, _JsonObject):
        unique: dict[str, Any] = {}
        for key, item in value:
            name = f"{path}.{key}" if path else key
            item = _without_repeated_keys(item, name, source)
            if key in unique:
                raise ConfigError(f"{source}: config key {name!r} is given twice, as {unique[key]!r} and {item!r}; "
                                  "keep one.")
            unique[key] = item
        return unique
    if isinstance(value, list):
        return [_without_repeated_keys(item, path, source) for item in value]
    return value


def build_config(flat: dict[str, Any], source: str = "<dict>") -> Config:
    """The typed sections of a flat config dict (original or new keys, presets and architecture
    defaults already expanded), each value checked against its field's type, then ``validate``d."""
    sections: dict[str, dict[str, Any]] = {"model": {}, "optimizer": {}, "train": {}, "run": {}}
    for key, value in flat.items():
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

    config = Config(
        model=_build(ModelConfig, sections["model"], source),
        mesh=_build_mesh(flat.get("mesh"), source),
        optimizer=_build(OptimizerConfig, sections["optimizer"], source),
        train=_build(TrainConfig, sections["train"], source),
        run=_build(RunConfig, sections["run"], source),
        cores_per_replica=checked_value(source, "cores_per_replica", flat.get("cores_per_replica", 1),
                                        _field_types(Config)["cores_per_replica"]),
        source=source,
        lora=_build_lora(flat.get("lora"), source),
    )
    validate(config)
    return config


def _unknown_key_message(source: str, key: str) -> str:
    close = difflib.get_close_matches(key, sorted(config_keys()), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{source}: unknown config key {key!r}.{hint} Remove it or fix its spelling."


def _field_types(cls) -> dict[str, Any]:
    """Each field's declared type, ``Annotated`` checks included."""
    return typing.get_type_hints(cls, include_extras=True)


def _build(cls, values: dict[str, Any], source: str, prefix: str = ""):
    """``cls`` from ``values``, keyed by field name after ``prefix`` (which messages keep: "lora.rank")."""
    hints = _field_types(cls)
    missing = [f.name for f in dataclasses.fields(cls) if _is_required(f) and prefix + f.name not in values]
    if missing:
        raise ConfigError(f"{source}: missing required config key {prefix + missing[0]!r} "
                          f"({_describe(hints[missing[0]])}).")
    checked = {name[len(prefix):]: checked_value(source, name, value, hints[name[len(prefix):]])
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
    sizes = {axis: checked_value(source, f"mesh.{axis}", raw_mesh.get(axis, 1), int) for axis in ("dp", "fsdp", "mp")}
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


# ----------------------------------------------------------------------------------------------
# Checking a value against a declared type: str, bool, int, float (ints accepted), Literal choices
# (of strings), tuples of either, dicts of str to str or float, unions with None, and Annotated
# checks on any of them.
# ----------------------------------------------------------------------------------------------

def checked_value(source: str, key: str, value: Any, tp: Any) -> Any:
    """``value`` as the field declared ``tp`` holds it (an integer given for a float becomes a float),
    if it has that type and meets its choices and checks; else a one-line ConfigError naming ``key``."""
    declared = _alternative_matched(value, tp)
    if declared is None:
        raise ConfigError(f"{source}: config key {key!r} must be {_describe(tp)}, "
                          f"got {value!r} ({type(value).__name__}).")
    declared, checks = _unannotated(declared)
    value = _as_declared(value, declared)
    problem = _choice_problem(value, declared) or _non_finite_problem(value, declared) or next(
        (f"must be {check.text}, got {value}" for check in checks if not check.holds(value)), None)
    if problem:
        raise ConfigError(f"{source}: config key {key!r} {problem}.")
    return value


def _choice_problem(value: Any, tp: Any) -> str | None:
    """The message ending when ``value`` (or, for a tuple, an item) is not one of ``tp``'s Literal choices."""
    if typing.get_origin(tp) is tuple:
        return next((problem for item in value if (problem := _choice_problem(item, typing.get_args(tp)[0]))), None)
    if typing.get_origin(tp) is not Literal or value in typing.get_args(tp):
        return None
    return f"is {value!r}; supported values: {', '.join(typing.get_args(tp))}"


def _non_finite_problem(value: Any, tp: Any) -> str | None:
    """No number of a config means anything as NaN or infinity, which Python's json reads (``NaN``,
    ``Infinity``, ``1e999``) although JSON has no such values."""
    if tp is float and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return None


def _alternative_matched(value: Any, tp: Any) -> Any:
    """The member of union ``tp`` that ``value`` has the type of (``tp`` itself when it is no union), or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if _matches(value, a)), None)
    return tp if _matches(value, tp) else None


def _unannotated(tp: Any) -> tuple[Any, tuple[Check, ...]]:
    """``Annotated[T, *checks]`` -> (T, checks); any other type -> (it, ())."""
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, tp.__metadata__
    return tp, ()


def _as_declared(value: Any, tp: Any) -> Any:
    """JSON's numbers as the declared type holds them: an integer given for a float becomes a float."""
    if tp is float:
        return float(value)
    if typing.get_origin(tp) is dict and typing.get_args(tp)[1] is float:
        return {k: float(v) for k, v in value.items()}
    return value


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    tp = _unannotated(tp)[0]
    if tp in names:
        return names[tp]
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "a string"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is dict:
        return "an object mapping names to " + {str: "strings", float: "numbers"}[args[1]]
    if origin is tuple:
        return "a list of strings"
    return str(tp)


def _matches(value: Any, tp: Any) -> bool:
    tp = _unannotated(tp)[0]
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    origin = typing.get_origin(tp)
    if origin is Literal:  # the choice itself is checked after the type (``checked_value``)
        return isinstance(value, str)
    if origin is dict:
        value_type = typing.get_args(tp)[1]
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, value_type) for k, v in value.items())
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    raise TypeError(f"unsupported config field type {tp}")


# ----------------------------------------------------------------------------------------------
# The checks that relate several keys (the value of one key is checked by its type).
# ----------------------------------------------------------------------------------------------

def validate(config: Config) -> None:
    """Cross-field checks that need neither devices nor the architecture: mesh divisibility is
    ``sharding.check_mesh_fits``'s, an architecture's choices and LoRA targets the registry's."""
    _validate_model(config.model, config.source)
    t, src = config.train, config.source
    if t.eos_token_id is not None and not 0 <= t.eos_token_id < config.model.n_vocab:
        raise ConfigError(f"{src}: config key 'eos_token_id' ({t.eos_token_id}) must be a token id in "
                          f"[0, n_vocab={config.model.n_vocab}).")
    _validate_train_set(config.run.train_set, src)


def _validate_model(m: ModelConfig, src: str) -> None:
    if m.d_head is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"{src}: d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads}), or set d_head explicitly."
        )
    if m.pe == "rotary" and (m.rotary_dims % 2 or not 0 < m.rotary_dims <= m.head_dim):
        raise ConfigError(
            f"{src}: pe_rotary_dims ({m.rotary_dims}) must be even and between 2 and the head size ({m.head_dim})."
        )
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"{src}: n_heads ({m.n_heads}) must be divisible by n_kv_heads ({m.n_kv_heads}); "
                          "each key/value head serves an equal group of query heads.")
    if m.residual == "sequential" and not m.separate_mlp_norm:
        raise ConfigError(f'{src}: residual "sequential" needs separate_mlp_norm: true (a norm before each branch).')
    if m.attention_layers and len(m.attention_layers) != m.layers:
        raise ConfigError(f"{src}: attention_layers lists {len(m.attention_layers)} entries but layers is "
                          f"{m.layers}; give one of {', '.join(typing.get_args(AttentionKind))} per layer.")
    if m.tie_embeddings and m.lm_head_bias:
        raise ConfigError(f"{src}: tie_embeddings: true reuses wte as the output layer, which has no bias; "
                          "set lm_head_bias: false.")


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
