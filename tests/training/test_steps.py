import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.config import OptimizerConfig
from mesh_transformer.models.attention import for_platform
from mesh_transformer.sharding import make_mesh
from mesh_transformer.training.steps import StepGuard, Trainer, cross_entropy, decay_mask, gpt3_schedule, judged
from tests.helpers import counting_batch, random_batch, tiny_config

MESHES = [(1, 1, 1), (8, 1, 1), (2, 1, 4), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def run_steps(config, mesh_shape, batches):
    dp, fsdp, mp = mesh_shape
    config = config.replace(mesh=type(config.mesh_request())(dp=dp, fsdp=fsdp, mp=mp))
    mesh = make_mesh(config, jax.devices()[: dp * fsdp * mp])
    trainer = Trainer(config, mesh)
    state = trainer.init_state(seed=0)
    step = trainer.jit_train_step()
    losses = []
    for tokens, mask in batches:
        state, metrics = step(state, tokens, mask)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference_run():
    config = tiny_config(d_model=64)
    batches = [random_batch(i, 2, 8, config.model.seq, config.model.n_vocab) for i in range(3)]
    return config, batches, run_steps(config, (1, 1, 1), batches)


@pytest.mark.parametrize("mesh_shape", MESHES[1:], ids=lambda s: "x".join(map(str, s)))
def test_mesh_shape_does_not_change_the_math(reference_run, mesh_shape):
    config, batches, (ref_losses, ref_params) = reference_run
    losses, params = run_steps(config, mesh_shape, batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
    assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
    # The parameters actually moved, so equality is not vacuous.
    assert ref_losses[0] != ref_losses[-1]


def train_on_counting_data(config, n_devices: int, steps: int, seed: int):
    """Train from scratch on counting sequences; returns the final state and the per-step losses."""
    trainer = Trainer(config, make_mesh(config, jax.devices()[:n_devices]))
    state = trainer.init_state(seed=seed)
    step = trainer.jit_train_step()
    losses = []
    for i in range(steps):
        state, metrics = step(state, *counting_batch(i, 8, config.model.seq, config.model.n_vocab))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_training_reduces_loss_on_a_learnable_sequence():
    _, losses = train_on_counting_data(tiny_config(lr=3e-3, warmup_steps=5, anneal_steps=0), 1, 80, seed=1)
    assert losses[0] > 3.5
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_schedule_values_at_key_steps():
    cfg = OptimizerConfig(lr=1.0, end_lr=0.1, warmup_steps=10, anneal_steps=100)
    lr = gpt3_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    assert float(lr(110)) == pytest.approx(0.1)
    assert float(lr(10_000)) == pytest.approx(0.1)


def test_schedule_without_warmup_starts_at_peak():
    lr = gpt3_schedule(OptimizerConfig(lr=2.0, end_lr=0.0, warmup_steps=0, anneal_steps=10))
    assert float(lr(0)) == pytest.approx(2.0)
    assert np.isfinite(float(lr(0)))
    assert float(lr(10)) == pytest.approx(0.0, abs=1e-7)
    constant = gpt3_schedule(OptimizerConfig(lr=2.0, warmup_steps=0, anneal_steps=0))
    assert float(constant(7)) == pytest.approx(2.0)


def test_weight_decay_mask_skips_biases_and_norms():
    config = tiny_config()
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    mask = decay_mask(trainer.abstract_state().params)
    assert mask["blocks"]["attn"]["q_proj"]["kernel"] is True
    assert mask["blocks"]["mlp"]["fc_in"]["kernel"] is True
    assert mask["wte"]["embedding"] is True and mask["lm_head"]["kernel"] is True
    assert mask["blocks"]["mlp"]["fc_in"]["bias"] is False
    assert mask["blocks"]["ln_1"]["scale"] is False and mask["blocks"]["ln_1"]["bias"] is False
    assert mask["ln_f"]["scale"] is False and mask["lm_head"]["bias"] is False


def test_weight_decay_only_moves_matrices_when_gradients_vanish():
    config = tiny_config(lr=0.1, warmup_steps=0, anneal_steps=0, weight_decay=0.5)
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    state = trainer.init_state(seed=0)
    tokens, mask = random_batch(0, 1, 2, config.model.seq, config.model.n_vocab)
    new_state, _ = trainer.jit_train_step()(state, tokens, np.zeros_like(mask))  # no tokens -> zero grads
    old = jax.device_get(trainer.init_state(seed=0).params)
    new = jax.device_get(new_state.params)
    np.testing.assert_allclose(new["blocks"]["attn"]["q_proj"]["kernel"],
                               old["blocks"]["attn"]["q_proj"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["blocks"]["ln_1"]["scale"], old["blocks"]["ln_1"]["scale"])
    np.testing.assert_array_equal(new["lm_head"]["bias"], old["lm_head"]["bias"])


def test_gradient_accumulation_equals_one_big_batch():
    tokens, mask = random_batch(3, 4, 2, 16, 64)
    mask[1, 0, 10:] = 0.0  # uneven token counts must still average over all tokens
    big = tiny_config(gradient_accumulation_steps=1, per_replica_batch=8)
    acc = tiny_config(gradient_accumulation_steps=4, per_replica_batch=2)
    results = []
    for config, shape in ((big, (1, 8)), (acc, (4, 2))):
        trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
        state, metrics = trainer.jit_train_step()(trainer.init_state(0), tokens.reshape(*shape, -1),
                                                  mask.reshape(*shape, -1))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[0][1], results[1][1])
    assert max(jax.tree.leaves(diffs)) < 1e-6


def test_cross_entropy_masks_padding_and_padded_vocab():
    logits = jnp.array([[[0.0, 1.0, 2.0, 50.0], [1.0, 1.0, 1.0, 1.0]]])
    targets = jnp.array([[2, 0]])
    loss, count = cross_entropy(logits, targets, jnp.array([[1.0, 0.0]]), real_vocab=3)
    expected = float(jax.nn.logsumexp(jnp.array([0.0, 1.0, 2.0])) - 2.0)
    assert float(count) == 1.0
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_z_loss_adds_squared_log_partition():
    logits = jnp.array([[[0.5, 1.5]]])
    base, _ = cross_entropy(logits, jnp.array([[1]]), jnp.ones((1, 1)))
    with_z, _ = cross_entropy(logits, jnp.array([[1]]), jnp.ones((1, 1)), z_loss=1e-2)
    lse = float(jax.nn.logsumexp(logits))
    assert float(with_z - base) == pytest.approx(1e-2 * lse**2, rel=1e-5)


def test_bfloat16_parameters_train_and_keep_their_dtype():
    config = tiny_config(param_dtype="bfloat16", compute_dtype="bfloat16", lr=3e-3, warmup_steps=0)
    state, losses = train_on_counting_data(config, 2, 20, seed=0)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state.params))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("arch", [{}, dict(pe="fixed", residual="sequential", separate_mlp_norm=True,
                                           attention_layers=["global", "local"], window_size=4,
                                           tie_embeddings=True, lm_head_bias=False)],
                         ids=["gptj", "gpt_neo_style"])
def test_layerwise_gradients_equal_autodiff(arch):
    """remat full takes the layer-by-layer step with in-place accumulation; remat none goes through
    jax.value_and_grad of the whole model. Same loss, same updated parameters."""
    tokens, mask = random_batch(5, 3, 2, 16, 64)
    mask[2, 1, 7:] = 0.0
    results = []
    for remat in ("full", "none"):
        config = tiny_config(gradient_accumulation_steps=3, remat=remat, z_loss=1e-3, **arch)
        trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
        state, metrics = trainer.jit_train_step()(trainer.init_state(0), tokens, mask)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params)))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert norm_a == pytest.approx(norm_b, rel=1e-5) and norm_a > 0
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_a, params_b)
    assert max(jax.tree.leaves(diffs)) < 1e-6, diffs


def test_auto_compute_dtype_is_bfloat16_on_accelerators_only():
    config = tiny_config()
    assert config.model.compute_dtype == "auto"
    assert for_platform(config.model, "tpu").compute_dtype == "bfloat16"
    assert for_platform(config.model, "gpu").compute_dtype == "bfloat16"
    assert for_platform(config.model, "cpu").compute_dtype == "float32"
    assert for_platform(tiny_config(compute_dtype="float32").model, "tpu").compute_dtype == "float32"
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    assert trainer.model_config.compute_dtype == "float32"
    assert "float32 parameters and optimizer state, float32 compute" in trainer.precision_policy()


def test_bfloat16_gradient_accumulation_stays_close_to_float32():
    tokens, mask = random_batch(6, 4, 2, 16, 64)
    norms = []
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(gradient_accumulation_steps=4, grad_accum_dtype=dtype)
        trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
        _, metrics = trainer.jit_train_step()(trainer.init_state(0), tokens, mask)
        norms.append(float(metrics["grad_norm"]))
    # Rounded to bfloat16 after each micro-batch: different, but within bfloat16's precision.
    assert norms[0] != norms[1] and norms[1] == pytest.approx(norms[0], rel=1e-2)


def test_a_non_finite_step_changes_nothing_but_the_step_and_the_counts():
    config = tiny_config()
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    step = trainer.jit_train_step()
    tokens, mask = random_batch(0, 1, 4, config.model.seq, config.model.n_vocab)
    state, _ = step(trainer.init_state(seed=0), tokens, mask)  # one good step: Adam's moments are non-zero
    before = jax.device_get(state)
    poisoned = mask.astype(np.float32).copy()
    poisoned[0, 0, 3] = np.nan  # as a NaN loss from an overflow would
    state, metrics = step(state, tokens, poisoned)
    after = jax.device_get(state)
    assert not np.isfinite(float(metrics["loss"]))
    for x, y in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params, after.opt_state)),
                    strict=True):
        assert x.tobytes() == y.tobytes()  # bit for bit
    assert int(after.step) == 2
    assert (int(metrics["skipped"]), int(metrics["bad_streak"])) == (1, 1)
    state, metrics = step(state, tokens, mask)
    assert (int(metrics["skipped"]), int(metrics["bad_streak"])) == (1, 0)
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), jax.device_get(state.params),
                                         after.params))
    assert any(moved)  # a good step after a bad one trains again


def judge_losses(losses, **train_overrides):
    """Run ``judged`` over a sequence of losses; returns which were accepted and the final guard."""
    cfg = tiny_config(**train_overrides).train
    guard, accepted = StepGuard.fresh(), []
    for loss in losses:
        accept, guard = judged(guard, jnp.float32(loss), jnp.float32(1.0), cfg)
        accepted.append(bool(accept))
    return accepted, guard


def test_spike_detection_skips_a_loss_far_above_the_running_average_and_is_off_by_default():
    normal = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0]
    accepted, guard = judge_losses([*normal, 40.0, 3.0], skip_step_on_spikes=True, spike_window=5)
    assert accepted == [True] * 6 + [False, True]
    assert int(guard.skipped) == 1 and int(guard.bad_streak) == 0 and int(guard.accepted) == 7
    assert float(guard.loss_mean) == pytest.approx(3.0, abs=0.1)  # the spike did not enter the average
    # Not before spike_window accepted steps, and not at all unless asked.
    assert judge_losses([3.0, 40.0], skip_step_on_spikes=True, spike_window=5)[0] == [True, True]
    assert judge_losses([*normal, 40.0])[0] == [True] * 7


def test_non_finite_losses_and_gradients_are_bad_and_counted_in_a_row():
    cfg = tiny_config().train
    guard = StepGuard.fresh()
    for loss, norm, streak in ((np.nan, 1.0, 1), (2.0, np.inf, 2), (np.inf, 1.0, 3), (2.0, 1.0, 0)):
        accept, guard = judged(guard, jnp.float32(loss), jnp.float32(norm), cfg)
        assert bool(accept) == (streak == 0) and int(guard.bad_streak) == streak
    assert int(guard.skipped) == 3


@pytest.mark.parametrize("arch", [{}, dict(architecture="gpt_neo", attention_layers=["local", "global"], window_size=32)],
                         ids=["gptj", "gpt_neo"])
def test_fused_attention_trains_like_the_xla_path_on_a_mesh(arch):
    """The splash kernel (interpreted on CPU), per shard on a (2, 2, 2) mesh, against XLA's attention
    on one device: the same losses and parameters after three steps of the layer-by-layer step."""
    batches = [random_batch(i, 1, 4, 128, 64) for i in range(3)]
    runs = [run_steps(tiny_config(seq=128, attention=kind, **arch), mesh, batches)
            for kind, mesh in (("xla", (1, 1, 1)), ("flash", (2, 2, 2)))]
    (ref_losses, ref_params), (losses, params) = runs
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
    assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
    assert ref_losses[0] != ref_losses[-1]


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 2, 4)], ids=["2x1x4", "1x2x4"])
def test_sequence_parallel_does_not_change_the_math(reference_run, mesh_shape):
    config, batches, (ref_losses, ref_params) = reference_run
    losses, params = run_steps(config.replace(model=dataclasses.replace(config.model, sequence_parallel=True)),
                               mesh_shape, batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
    assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs


def test_sequence_parallel_splits_the_kept_layer_inputs_over_mp():
    """XLA's own figure for the compiled step: the per-device temporaries shrink."""
    temps = []
    for sp in (False, True):
        config = tiny_config(d_model=64, seq=64, per_replica_batch=8, sequence_parallel=sp, layers=4,
                             mesh={"dp": 2, "fsdp": 1, "mp": 4})
        trainer = Trainer(config, make_mesh(config, jax.devices()))
        tokens = jax.ShapeDtypeStruct((1, 16, 65), jnp.int32, sharding=trainer.batch_sharding())
        mask = jax.ShapeDtypeStruct((1, 16, 65), jnp.float32, sharding=trainer.batch_sharding())
        compiled = trainer.jit_train_step().lower(trainer.abstract_state(), tokens, mask).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temps[1] < temps[0], temps
