"""Packed documents kept apart (``reset_attention_at_eos``): segment ids and per-document positions,
in every attention kernel, checked against running each document on its own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from mesh_transformer.config import ConfigError, MeshConfig
from mesh_transformer.models import attention
from mesh_transformer.models.attention import GLOBAL_WINDOW, self_attention
from mesh_transformer.models.transformer import Transformer, document_layout
from mesh_transformer.sharding import divisible_spec, make_mesh, mesh_from_shape, traced_on
from mesh_transformer.training.steps import Trainer
from tests.helpers import tiny_config

EOS = 7
BATCH, LENGTH, HEAD_DIM = 2, 256, 16
# Document starts (EOS positions) per row; not on tile boundaries, so a segment straddles the kernel's tiles.
STARTS = [(37, 150, 151), (200,)]


def packed_row_tokens(vocab: int, seed: int = 0) -> np.ndarray:
    tokens = np.random.RandomState(seed).randint(EOS + 1, vocab, (BATCH, LENGTH)).astype(np.int32)
    for row, starts in enumerate(STARTS):
        tokens[row, list(starts)] = EOS
    return tokens


def documents_of(row: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each document of a row: a new one at every EOS."""
    cuts = [0, *np.flatnonzero(row == EOS).tolist(), len(row)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def test_document_layout_counts_segments_and_restarts_positions():
    tokens = jnp.asarray([[3, 4, EOS, 5, EOS, EOS, 6, 8]])
    positions, segments = document_layout(tokens, EOS)
    assert positions.tolist() == [[0, 1, 0, 1, 0, 0, 1, 2]]
    assert segments.tolist() == [[0, 0, 1, 1, 2, 3, 3, 3]]


def qkv(heads: int, kv_heads: int):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (BATCH, LENGTH, heads, HEAD_DIM))
    k, v = (jax.random.normal(key, (BATCH, LENGTH, kv_heads, HEAD_DIM)) for key in keys[1:])
    return q, k, v


def segmented(kernel: str, q, k, v, window: int, local: int | None):
    positions, segments = document_layout(jnp.asarray(packed_row_tokens(100)), EOS)
    return self_attention(q, k, v, positions, jnp.asarray(window), None, kernel, local, segments)


CASES = [
    pytest.param(4, 4, GLOBAL_WINDOW, None, id="causal"),
    pytest.param(4, 1, GLOBAL_WINDOW, None, id="multi-query"),
    pytest.param(4, 2, 40, 40, id="local-layer"),
]


@pytest.mark.parametrize("heads, kv_heads, window, local", CASES)
def test_xla_path_equals_each_document_attending_alone(heads, kv_heads, window, local):
    q, k, v = qkv(heads, kv_heads)
    got = segmented("xla", q, k, v, window, local)
    tokens = packed_row_tokens(100)
    for row in range(BATCH):
        for a, b in documents_of(tokens[row]):
            n = b - a
            alone = self_attention(q[row:row + 1, a:b], k[row:row + 1, a:b], v[row:row + 1, a:b],
                                   jnp.arange(n)[None], jnp.asarray(window), None, "xla", local)
            np.testing.assert_allclose(got[row:row + 1, a:b], alone, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, window, local", CASES)
def test_splash_kernel_with_segments_equals_the_xla_path_forward_and_backward(heads, kv_heads, window, local):
    q, k, v = qkv(heads, kv_heads)
    ct = jax.random.normal(jax.random.key(9), q.shape)

    def loss(kernel):
        return lambda q, k, v: jnp.sum(segmented(kernel, q, k, v, window, local) * ct)

    want, want_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got, got_grads = jax.jit(jax.value_and_grad(loss("splash_interpret"), argnums=(0, 1, 2)))(q, k, v)
    assert float(got) == pytest.approx(float(want), abs=1e-3)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-4)


def test_segments_change_the_result():
    """The comparisons above are not vacuous: keeping documents apart changes what a token sees."""
    q, k, v = qkv(4, 4)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
    across = self_attention(q, k, v, positions, jnp.asarray(GLOBAL_WINDOW), None, "xla", None)
    apart = segmented("xla", q, k, v, GLOBAL_WINDOW, None)
    assert float(jnp.abs(across[0, 40:] - apart[0, 40:]).max()) > 0.1
    np.testing.assert_allclose(across[0, :37], apart[0, :37], atol=1e-6)  # the first document sees nothing new


def test_splash_kernel_with_segments_runs_per_shard():
    mesh = mesh_from_shape((2, 1, 2))
    q, k, v = qkv(4, 2)
    want = segmented("xla", q, k, v, GLOBAL_WINDOW, None)
    names = ("batch", "length", "act_heads", "head_dim")
    sharded = jax.jit(traced_on(mesh, lambda q, k, v: segmented("splash_interpret", q, k, v, GLOBAL_WINDOW, None)),
                      in_shardings=NamedSharding(mesh, divisible_spec(q.shape, names, mesh)))
    np.testing.assert_allclose(sharded(q, k, v), want, atol=2e-5)


def test_cudnn_with_segments_takes_the_xla_path():
    assert attention._fused_kernel("cudnn", 2048, 128, segmented=True) is None


ARCHITECTURES = [
    pytest.param({}, id="gptj"),
    pytest.param(dict(architecture="gpt_neo", attention_layers=["global", "local"], window_size=16), id="gpt_neo"),
    pytest.param(dict(architecture="llama", n_kv_heads=2, pe_rotary_dims=None), id="llama"),
    pytest.param(dict(architecture="gpt_neox", pe_rotary_dims=2), id="gpt_neox"),
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", ["xla", "flash"])
def test_packed_model_logits_equal_each_document_run_alone(arch, kind):
    """Learned positions (GPT-Neo) included: each document's positions start at 0, as when run alone."""
    cfg = tiny_config(seq=LENGTH, attention=kind, **arch).model
    model = Transformer(cfg)
    tokens = jnp.asarray(packed_row_tokens(cfg.n_vocab))
    params = model.init(jax.random.key(0), tokens)
    positions, segments = document_layout(tokens, EOS)
    packed = jax.jit(lambda p, t: model.apply(p, t, positions, segment_ids=segments))(params, tokens)
    for row in range(BATCH):
        for a, b in documents_of(np.asarray(tokens[row])):
            alone = model.apply(params, tokens[row:row + 1, a:b])
            np.testing.assert_allclose(packed[row:row + 1, a:b], alone, atol=1e-4)


def test_train_step_keeps_documents_apart_and_is_mesh_invariant():
    """The loss with reset_attention_at_eos is the loss of the documents run one by one, on two meshes."""
    config = tiny_config(seq=LENGTH, reset_attention_at_eos=True, eos_token_id=EOS)
    tokens = np.concatenate([packed_row_tokens(config.model.n_vocab), np.full((BATCH, 1), 9, np.int32)], axis=1)
    batch = (tokens[None], np.ones((1, *tokens.shape), np.float32))
    losses = []
    for shape in ((2, 1, 1), (1, 2, 2)):
        mesh_config = config.replace(mesh=MeshConfig(*shape))
        trainer = Trainer(mesh_config, make_mesh(mesh_config, jax.devices()[:int(np.prod(shape))]), document_eos=EOS)
        # Larger than initial weights, so that what a token attends to moves the loss visibly.
        params = jax.tree.map(lambda p: p * 4, trainer.init_state(0).params)
        loss_sum, count = trainer.jit_eval_step()(params, *batch)
        losses.append(float(loss_sum) / float(count))
        packed_default = Trainer(mesh_config, trainer.mesh).jit_eval_step()(params, *batch)
        assert abs(float(packed_default[0]) / float(count) - losses[-1]) > 5e-4  # the option moves the loss, by 5x the tolerance below
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    model, host_params = Transformer(config.model), jax.device_get(params)
    total, n = 0.0, 0
    for row in range(BATCH):
        for a, b in documents_of(tokens[row, :-1]):
            logits = model.apply({"params": host_params}, jnp.asarray(tokens[row:row + 1, a:b]))
            logprobs = jax.nn.log_softmax(logits[0], axis=-1)
            total -= float(jnp.take_along_axis(logprobs, jnp.asarray(tokens[row, a + 1:b + 1])[:, None], 1).sum())
            n += b - a
    assert losses[0] == pytest.approx(total / n, abs=1e-4)


def test_eos_token_id_outside_the_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="eos_token_id"):
        tiny_config(reset_attention_at_eos=True, eos_token_id=10**6)


def test_layer_by_layer_training_step_keeps_documents_apart_as_autodiff_does():
    """remat full trains through the hand-written layer-by-layer backward pass; it takes the segments too."""
    metrics = {}
    for remat in ("full", "none"):
        config = tiny_config(seq=LENGTH, remat=remat)
        tokens = np.concatenate([packed_row_tokens(config.model.n_vocab), np.full((BATCH, 1), 9, np.int32)], axis=1)
        batch = (tokens[None], np.ones((1, *tokens.shape), np.float32))
        for eos in (EOS, None):
            trainer = Trainer(config, make_mesh(config, jax.devices()[:1]), document_eos=eos)
            _, step_metrics = trainer.jit_train_step()(trainer.init_state(0), *batch)
            metrics[remat, eos] = np.array([float(step_metrics["loss"]), float(step_metrics["grad_norm"])])
    np.testing.assert_allclose(metrics["full", EOS], metrics["none", EOS], rtol=2e-6)
    assert np.abs(metrics["full", EOS] - metrics["full", None]).min() > 1e-4
