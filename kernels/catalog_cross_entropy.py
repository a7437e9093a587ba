"""Public catalogue cross-entropy op: dispatches to the Triton kernels or the PyTorch reference."""

from __future__ import annotations

import torch

from transrec.kernels.dispatch import resolve_impl
from transrec.kernels.pytorch.pt_catalog_cross_entropy import (
    pt_catalog_cross_entropy,
    pt_catalog_cross_entropy_chunked,
)

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
# The torch path switches to the V-chunked reference above this many logits (M * V): 2^24 fp32
# logits are 64 MiB, and the plain reference keeps several [M, V] tensors for its backward.
CHUNKED_MIN_LOGITS: int = 1 << 24


def _check(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
           reduction: str, exclude: torch.Tensor | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"catalog_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"catalog_cross_entropy: need h [M, d] and weight [V>0, d], got {tuple(h.shape)}, {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"catalog_cross_entropy: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if tuple(target.shape) != (h.shape[0],) or target.dtype != torch.int64:
        raise ValueError(f"catalog_cross_entropy: target must be int64 [{h.shape[0]}], got "
                         f"{target.dtype} {tuple(target.shape)}")
    if exclude is not None and (exclude.dim() != 2 or exclude.shape[0] != h.shape[0] or exclude.dtype != torch.int64):
        raise ValueError(f"catalog_cross_entropy: exclude must be int64 [{h.shape[0]}, E] column indices (-1 = none), "
                         f"got {exclude.dtype} {tuple(exclude.shape)}")


def catalog_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    relu: bool = False,
    exclude: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy of hidden states against the whole item catalogue.

    Equals F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction) with
    z = h @ weight.T + bias (relu(z) when ``relu``). h [M, d], weight [V, d], bias [V] or None,
    target int64 [M]; reduction "mean" | "sum" | "none". ``exclude`` [M, E] int64 lists columns (-1 padded)
    left out of row m's softmax unless equal to target[m] (a sampled softmax's accidental hits); a sampled
    softmax passes its candidates' vectors as ``weight`` and -log q as ``bias``. The Triton path never forms
    [M, V] logits; the torch path does for small M * V and runs V-chunked above CHUNKED_MIN_LOGITS.
    """
    _check(h, weight, bias, target, reduction, exclude)
    if resolve_impl(impl, h, weight, bias, op="catalog_cross_entropy") == "torch":
        fn = pt_catalog_cross_entropy
        if h.shape[0] * weight.shape[0] > CHUNKED_MIN_LOGITS:
            fn = pt_catalog_cross_entropy_chunked
        return fn(h, weight, bias, target, ignore_index, reduction, relu, exclude)
    from transrec.kernels.triton.triton_catalog_cross_entropy import triton_catalog_cross_entropy

    return triton_catalog_cross_entropy(h, weight, bias, target, ignore_index, reduction, relu, exclude=exclude)
