"""LoRA adapters (models/lora.py): targets per architecture, step 0 is the base exactly, merging,
sharding names, and parity with peft's own PyTorch implementation (loss and adapter gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.config import ConfigError
from mesh_transformer.convert.hf_config import config_to_hf
from mesh_transformer.convert.tensor_table import flatten_params, hf_tensors
from mesh_transformer.models import lora
from mesh_transformer.models.registry import get_architecture, parse_config
from mesh_transformer.models.transformer import Transformer, abstract_adapters
from mesh_transformer.sharding import make_mesh
from mesh_transformer.training.steps import Trainer
from tests.helpers import random_batch

SHAPE = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16, lr=1e-3, tokenizer="bytes")
# Each architecture with the options that make it itself (local layers, partial rotary, GQA).
ARCH_KEYS = {
    "gptj": dict(pe_rotary_dims=4),
    "gpt_neo": dict(attention_layers=["global", "local"], window_size=4),
    "gpt_neox": dict(pe_rotary_dims=4),
    "llama": dict(n_kv_heads=2),
}
PEFT_TARGETS = {
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_config(arch: str, targets=None, **lora_keys):
    spec = dict(rank=4, alpha=8, targets=targets or PEFT_TARGETS[arch], **lora_keys)
    return parse_config(dict(SHAPE, architecture=arch, lora=spec, **ARCH_KEYS[arch]), source=f"{arch}.json")


def init_variables(cfg, seed=0):
    rngs = {"params": jax.random.key(seed), lora.COLLECTION: jax.random.key(seed + 1)}
    variables = Transformer(cfg).init(rngs, jnp.zeros((1, 4), jnp.int32))
    return nn.unbox(variables["params"]), nn.unbox(variables[lora.COLLECTION])


def with_random_b(adapters, seed=3, scale=0.1):
    leaves, tree = jax.tree.flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) if path[-1].key == lora.B else x
                                     for (path, x), k in zip(leaves, keys)])


@pytest.mark.parametrize("arch", PEFT_TARGETS)
def test_targets_are_peft_names_and_a_wrong_one_is_one_line_listing_the_valid_ones(arch):
    assert list(get_architecture(arch).lora_targets) == PEFT_TARGETS[arch]
    with pytest.raises(ConfigError) as error:
        lora_config(arch, targets=[PEFT_TARGETS[arch][0], "c_attn"])
    message = str(error.value)
    assert message.startswith(f"{arch}.json: config key 'lora.targets' has 'c_attn'") and "\n" not in message
    assert all(name in message for name in PEFT_TARGETS[arch])


@pytest.mark.parametrize("arch", PEFT_TARGETS)
def test_step_zero_is_the_base_model_exactly_and_merging_equals_applying(arch):
    config = lora_config(arch)
    adapted = lora.adapted_model(config)
    params, adapters = init_variables(adapted)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 16)))
    base = Transformer(config.model).apply({"params": params}, tokens)
    start = Transformer(adapted).apply({"params": params, lora.COLLECTION: adapters}, tokens)
    assert bool(jnp.all(start == base))
    factors = {path[-1].key: x for path, x in jax.tree.flatten_with_path(adapters)[0]}
    assert float(jnp.abs(factors[lora.A]).max()) > 0 and float(jnp.abs(factors[lora.B]).max()) == 0
    trained = with_random_b(adapters)
    applied = Transformer(adapted).apply({"params": params, lora.COLLECTION: trained}, tokens)
    merged = Transformer(config.model).apply({"params": lora.merge(params, trained, adapted)}, tokens)
    assert float(jnp.abs(applied - base).max()) > 0.1  # the adapters change the model...
    np.testing.assert_allclose(merged, applied, atol=2e-5, rtol=0)  # ...and merging keeps the change


def test_adapters_carry_the_kernels_axis_names_and_an_unsharded_rank():
    specs = nn.get_partition_spec(abstract_adapters(lora.adapted_model(lora_config("gpt_neox"))))
    attn, mlp = specs["blocks"]["attn"], specs["blocks"]["mlp"]
    assert tuple(attn["query_key_value"][lora.A]) == ("layers", "embed", None)
    assert tuple(attn["query_key_value"][lora.B]) == ("layers", None, "heads")
    assert tuple(mlp["fc_out"][lora.A]) == ("layers", "mlp", None)
    assert tuple(mlp["fc_out"][lora.B]) == ("layers", None, "embed")


def torch_model(config, params):
    """The Hugging Face model of ``config`` holding ``params`` (through our exporter's table), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = get_architecture(config.model.architecture)
    flat = flatten_params(jax.device_get(params))
    state = {name: torch.from_numpy(np.array(array, np.float32))
             for name, array in hf_tensors(arch, config.model, lambda path: np.asarray(flat[path]))}
    model = AutoModelForCausalLM.from_config(config_to_hf(config.model, dtype="float32"))
    own_names = set(model.state_dict())
    for rule in arch.rules(config.model):  # names that transformers' classes spell differently from checkpoints
        for alias in rule.aliases:
            if rule.hf in state and rule.hf not in own_names and alias in own_names:
                state[alias] = state.pop(rule.hf)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.model.tie_embeddings else set()
    buffers = {name for name, _ in model.named_buffers()}
    assert not unexpected and set(missing) <= buffers | tied, missing
    model.tie_weights()
    return model.float().eval()


def peft_model(config, base, adapters):
    """peft's LoRA of the same rank, alpha and targets on ``base``, holding our adapter values."""
    import peft
    import torch

    spec = config.lora
    model = peft.get_peft_model(base, peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                      target_modules=list(spec.targets)))
    ours = lora.peft_tensors(lora.adapted_model(config), jax.device_get(adapters))
    named = dict(model.named_parameters())
    for name, array in ours.items():
        parameter = named[name.replace(".weight", ".default.weight")]
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(array))
    return model


@pytest.mark.parametrize("arch", PEFT_TARGETS)
def test_peft_gives_the_same_loss_and_adapter_gradients(arch):
    import torch

    config = lora_config(arch).replace(mesh=None)
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    params, _ = init_variables(lora.adapted_model(config))
    state = trainer.state_from_params(params, seed=0)
    adapters = with_random_b(state.params)  # B = 0 would make every A gradient zero
    tokens, mask = random_batch(1, 1, 3, 16, 64)
    loss, grads = jax.jit(trainer._accumulated_grads)(adapters, jnp.asarray(tokens), jnp.asarray(mask), state.frozen)

    model = peft_model(config, torch_model(config, params), adapters)
    batch = torch.from_numpy(tokens[0]).long()
    logits = model(input_ids=batch[:, :-1]).logits
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), abs=1e-5)
    expected = lora.peft_tensors(lora.adapted_model(config), jax.device_get(grads))
    named = dict(model.named_parameters())
    for name, grad in expected.items():
        torch_grad = named[name.replace(".weight", ".default.weight")].grad.numpy()
        np.testing.assert_allclose(grad, torch_grad, atol=1e-4, rtol=0, err_msg=name)
    assert max(float(np.abs(g).max()) for g in expected.values()) > 1e-3  # the gradients are not all zero
