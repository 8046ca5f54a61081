"""Model FLOPs per training token, the one count behind the training MFU and the planner's estimate."""

from __future__ import annotations


def model_flops_per_token(n_params: int, layers: int, d_model: int, seq: int, lora: bool = False) -> float:
    """Training FLOPs per token: ``6*N + 12*layers*d_model*seq``, or ``4*N + ...`` for LoRA.

    ``N`` counts the non-embedding parameters, the lm_head included (the input embedding is a
    lookup, the lm_head a matmul). Each such parameter costs 2 FLOPs in the forward pass and 4 in
    the backward pass; a LoRA step computes no weight gradients of its frozen base, which halves the
    backward pass (the adapters' own matmuls are left out, as small). Attention adds, per layer and
    token, the QK^T scores and the weighted sum of V: 2 matmuls of 2*seq*d_model FLOPs forward, times
    3 for forward+backward; the causal mask is not discounted. This is the accounting of the PaLM paper
    (Chowdhery et al. 2022, appendix B), so rematerialisation is not counted: it is model FLOPs, not
    hardware FLOPs.
    """
    return (4.0 if lora else 6.0) * n_params + 12.0 * layers * d_model * seq
