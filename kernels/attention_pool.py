"""Public attention pooling op: dispatches to the Triton kernel or the PyTorch reference."""

from __future__ import annotations

import torch

from transrec.kernels.dispatch import resolve_impl
from transrec.kernels.pytorch.pt_attention_pool import pt_attention_pool


def _check_shapes(
    x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor,
) -> None:
    if x.dim() != 3:
        raise ValueError(f"attention_pool: x must be [B, T, H], got {tuple(x.shape)}")
    B, T, H = x.shape
    if tuple(mask.shape) != (B, T) or mask.dtype != torch.bool:
        raise ValueError(f"attention_pool: mask must be bool [{B}, {T}], got {mask.dtype} {tuple(mask.shape)}")
    if w1.dim() != 2 or w1.shape[0] != H:
        raise ValueError(f"attention_pool: w1 must be [{H}, A], got {tuple(w1.shape)}")
    A = w1.shape[1]
    if tuple(b1.shape) != (A,) or tuple(w2.shape) != (A,) or b2.numel() != 1:
        raise ValueError(
            f"attention_pool: need b1 [{A}], w2 [{A}], b2 [] ; got {tuple(b1.shape)}, "
            f"{tuple(w2.shape)}, {tuple(b2.shape)}"
        )


def attention_pool(
    x: torch.Tensor,
    mask: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Additive attention pooling of token states into one vector per row.

    s = tanh(x @ w1 + b1) @ w2 + b2 ([B, T]); alpha = softmax over T of s where mask is True;
    out = sum_t alpha_t x_t ([B, H]). Rows with no True in mask give zeros and zero gradients.
    x [B, T, H] (fp32 or bf16), mask bool [B, T], w1 [H, A], b1 [A], w2 [A], b2 0-dim.
    impl: "auto" (Triton on CUDA, reference otherwise, unless the default says otherwise),
    "triton" or "torch".
    """
    _check_shapes(x, mask, w1, b1, w2, b2)
    if resolve_impl(impl, x, w1, op="attention_pool") == "torch":
        return pt_attention_pool(x, mask, w1, b1, w2, b2)
    from transrec.kernels.triton.triton_attention_pool import triton_attention_pool

    return triton_attention_pool(x, mask, w1, b1, w2, b2)
