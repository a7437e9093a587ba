"""Reference additive attention pooling (the specification of the Triton kernel)."""

from __future__ import annotations

import torch


def pt_attention_pool(
    x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """out_b = sum_t alpha_bt x_bt with alpha_b = softmax over kept tokens of tanh(x_bt W1 + b1) w2 + b2.

    x [B, T, H], mask [B, T] bool (True = real token), w1 [H, A], b1 [A], w2 [A], b2 [] -> [B, H].
    Computed in fp32 (fp64 inputs: in fp64, the ground truth of the precision tests) and cast back to x's
    dtype. Rows without any real token give zeros and zero gradients (no NaN).
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    s = torch.tanh(xf @ w1.to(ct) + b1.to(ct)) @ w2.to(ct) + b2.to(ct)  # [B, T]
    mask = mask.bool()
    has_token = mask.any(dim=-1, keepdim=True)  # [B, 1]
    s = s.masked_fill(~mask, float("-inf"))
    s = torch.where(has_token, s, torch.zeros_like(s))  # all-padded rows: finite, then zeroed below
    alpha = torch.softmax(s, dim=-1) * has_token  # [B, T]
    out = torch.einsum("bt,bth->bh", alpha, xf)
    return out.to(x.dtype)
