"""Planning a LoRA fine-tune (docs/lora.md): the frozen base in its base_dtype, optimizer state and the
gradient accumulator for the adapters only, checked against the real shardings and against XLA's TPU
compiler; GPT-J-6B LoRA fits a v2-8 and a 24 GiB GPU where the full fine-tune does not."""

import dataclasses
import os

import jax
import numpy as np
import pytest

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from mesh_transformer.config import MeshConfig  # noqa: E402
from mesh_transformer.hardware import GIB  # noqa: E402
from mesh_transformer.models.registry import load_config  # noqa: E402
from mesh_transformer.plan import make_plan, parse_gpu, parse_tpu  # noqa: E402
from mesh_transformer.plan.memory import compile_step, state_shards  # noqa: E402
from mesh_transformer.plan.targets import tpu_devices, usable_hbm_bytes  # noqa: E402
from mesh_transformer.sharding import make_mesh  # noqa: E402
from mesh_transformer.training.steps import Trainer  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402
from tests.plan.test_plan import run_cli  # noqa: E402

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "fc_in", "fc_out"], "base_dtype": "bfloat16"}


def lora_config(**overrides):
    return tiny_config(d_model=64, n_heads=8, n_vocab=128, lora=LORA, **overrides)


def shard_elements(tree) -> int:
    return sum(int(np.prod(p.sharding.shard_shape(p.shape))) for p in jax.tree.leaves(tree))


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2), (1, 8, 1)])
def test_lora_state_shards_equal_the_real_shardings_of_base_and_adapters(shape):
    dp, fsdp, mp = shape
    config = lora_config(mesh={"dp": dp, "fsdp": fsdp, "mp": mp})
    state = Trainer(config, make_mesh(config, jax.devices()[:8])).abstract_state()
    shards = state_shards(config, {"dp": dp, "fsdp": fsdp, "mp": mp})
    assert shards.lora and shards.param_bytes == 2  # bfloat16 base
    assert shards.params == shard_elements(state.frozen) and shards.adapters == shard_elements(state.params)
    assert {p.dtype.name for p in jax.tree.leaves(state.frozen)} == {"bfloat16"}


def test_analytic_lora_memory_keeps_optimizer_state_and_gradients_for_adapters_only():
    config = lora_config()
    full = make_plan(config.replace(lora=None), parse_gpu("h100-80gb")).memory
    lora = make_plan(config, parse_gpu("h100-80gb")).memory
    shards = state_shards(config, {"dp": 1, "fsdp": 1, "mp": 1})
    assert lora.frozen == shards.params * 2 == full.parameters / 2  # the same model, in bfloat16
    assert lora.parameters == lora.frozen + shards.adapters * 4
    assert lora.optimizer_state == 2 * shards.adapters * 4 and lora.gradients == shards.adapters * 4
    assert full.optimizer_state == 2 * full.parameters and full.frozen == 0
    assert lora.optimizer_state < full.optimizer_state / 4
    assert lora.total < full.total


def test_lora_model_flops_leave_out_the_bases_weight_gradients():
    config = lora_config()
    full = make_plan(config.replace(lora=None), parse_gpu("h100-80gb")).estimate
    lora = make_plan(config, parse_gpu("h100-80gb")).estimate
    n = state_shards(config, {"dp": 1, "fsdp": 1, "mp": 1}).non_embedding_params
    tokens = config.train.per_replica_batch * config.train.gradient_accumulation_steps * config.model.seq
    assert full.model_flops_per_step - lora.model_flops_per_step == pytest.approx(2 * n * tokens)
    assert lora.step_seconds < full.step_seconds and 0 < lora.mfu < 1


def mid_sized():
    """Big enough that the state, not XLA's fixed overheads, dominates: 4 layers of d_model 512."""
    return tiny_config(layers=4, d_model=512, n_heads=8, n_vocab=4096, seq=256, pe_rotary_dims=32,
                       per_replica_batch=1, gradient_accumulation_steps=4, mesh={"dp": 2, "fsdp": 2, "mp": 2},
                       lora=LORA)


@pytest.fixture(scope="module")
def compiled_v3_8():
    """XLA's TPU compiler on compile-only v3-8 devices: the LoRA step and the full step of one model."""
    devices, hbm = tpu_devices("v3:2x2"), usable_hbm_bytes("v3:2x2")
    config = mid_sized()
    return config, compile_step(config, devices, hbm), compile_step(config.replace(lora=None), devices, hbm)


def test_xla_holds_the_bfloat16_base_and_adapter_state_the_analytic_model_counts(compiled_v3_8):
    config, lora, full = compiled_v3_8
    analytic = make_plan(config, parse_tpu("v3-8"), compile=False).memory
    # The step's inputs are the state and the batch: XLA's figure, against the analytic parts (which
    # leave out the step counter, key and guard: a few bytes).
    state = analytic.parameters + analytic.optimizer_state + analytic.batch
    assert lora.argument_bytes == pytest.approx(state, rel=0.01)
    # Had the base been float32, or optimizer state kept for it, the inputs would be twice its size or more.
    assert lora.argument_bytes < 1.25 * analytic.frozen
    # The whole step: within the analytic model's usual tolerance (as for the shipped configs, test_plan.py).
    assert lora.memory.total * 0.9 <= analytic.total <= 2 * lora.memory.total
    assert lora.memory.total < full.memory.total / 2


@pytest.mark.slow
def test_gptj_6b_lora_fits_a_v2_8_where_the_full_fine_tune_does_not(capsys):
    from mesh_transformer.cli.plan import report

    plan = make_plan(load_config("configs/6B_lora.json"), parse_tpu("v2-8"))  # one compile, about 30 s
    assert plan.memory.source == "compiled" and plan.fits and plan.memory.total < 4 * GIB
    assert plan.memory.frozen / GIB == pytest.approx(1.41, abs=0.01)  # 6.05e9 bfloat16 / 8
    text = report(plan, "plan")
    assert "FITS" in text and "bfloat16 frozen base" in text and "of which the frozen base" in text
    code, out, _ = run_cli(capsys, "--config", "configs/example_config.json", "--topology", "v2-8")
    assert code == 1 and "DOES NOT FIT" in out  # the compiler refuses it: a few seconds


def one_gpu(config):
    return config.replace(mesh=MeshConfig(dp=1, fsdp=1, mp=1))


def test_gptj_6b_lora_fits_one_24_gib_gpu_and_the_full_fine_tune_needs_more_than_80_gb():
    lora, full = (one_gpu(load_config(f"configs/{name}.json")) for name in ("6B_lora", "example_config"))
    gpu = parse_gpu("rtx-4090")
    assert gpu.accelerator.hbm_bytes == 24 * GIB
    lora_plan, full_plan = make_plan(lora, gpu), make_plan(full, gpu)
    assert lora_plan.fits and lora_plan.memory.total < 16 * GIB
    assert not full_plan.fits and full_plan.memory.total > 90 * GIB
    assert not make_plan(full, parse_gpu("h100-80gb")).fits and make_plan(lora, parse_gpu("h100-80gb")).fits


def test_the_cli_finds_the_single_gpu_split_for_lora_and_none_for_full(capsys):
    code, out, _ = run_cli(capsys, "--config", "configs/6B_lora.json", "--gpu", "rtx-4090", "--suggest")
    assert code == 0 and "suggested" in out and "dp=1 fsdp=1 mp=1" in out and "4N + 12" in out
    code, _, err = run_cli(capsys, "--config", "configs/example_config.json", "--gpu", "rtx-4090", "--suggest")
    assert code == 1 and "fits rtx-4090" in err


def test_the_json_plan_names_the_adapters_and_the_frozen_base(capsys):
    import json

    code, out, _ = run_cli(capsys, "--config", "configs/6B_lora.json", "--gpu", "8xh100-80gb", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["lora"]["rank"] == 16 and plan["lora"]["base_dtype"] == "bfloat16"
    breakdown = plan["per_device_breakdown_bytes"]
    assert 0 < breakdown["frozen_base"] < breakdown["parameters"]
    assert dataclasses.asdict(load_config("configs/6B_lora.json").lora)["targets"] == \
        ("q_proj", "v_proj", "fc_in", "fc_out")
