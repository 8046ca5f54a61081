"""Model FLOPs per token: 6N (4N for LoRA) plus attention."""

from mesh_transformer.models.flops import model_flops_per_token


def test_model_flops_per_token():
    assert model_flops_per_token(1000, 2, 64, 128) == 6 * 1000 + 12 * 2 * 64 * 128
    assert model_flops_per_token(10**6, 4, 256, 1024) == 18_582_912.0


def test_lora_computes_no_weight_gradients_of_the_frozen_base():
    assert model_flops_per_token(1000, 2, 64, 128, lora=True) == 4 * 1000 + 12 * 2 * 64 * 128
