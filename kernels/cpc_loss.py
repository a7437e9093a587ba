"""Public CPC loss op: dispatches to the Triton kernels or the PyTorch reference."""

from __future__ import annotations

import torch

from transrec.kernels.dispatch import resolve_impl
from transrec.kernels.pytorch.pt_cpc_loss import pt_cpc_loss

REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def _check(
    user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, pos_mask: torch.Tensor | None,
    neg_mask: torch.Tensor | None, reduction: str,
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"cpc_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if user.dim() != 2:
        raise ValueError(f"cpc_loss: user must be [B, d], got {tuple(user.shape)}")
    B, d = user.shape
    if pos.dim() != 3 or pos.shape[0] != B or pos.shape[2] != d:
        raise ValueError(f"cpc_loss: pos must be [{B}, l, {d}], got {tuple(pos.shape)}")
    if neg.dim() == 3:
        if neg.shape[0] != B or neg.shape[2] != d:
            raise ValueError(f"cpc_loss: per-user neg must be [{B}, j, {d}], got {tuple(neg.shape)}")
    elif neg.dim() != 2 or neg.shape[1] != d:
        raise ValueError(f"cpc_loss: neg must be [{B}, j, {d}] or shared [N, {d}], got {tuple(neg.shape)}")
    for name, m, shape in (
        ("pos_mask", pos_mask, (B, pos.shape[1])),
        ("neg_mask", neg_mask, (B, neg.shape[-2])),
    ):
        if m is not None and (m.dtype != torch.bool or tuple(m.shape) != shape):
            raise ValueError(f"cpc_loss: {name} must be bool {list(shape)}, got {m.dtype} {tuple(m.shape)}")


def cpc_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """Binary contrastive (CPC) loss of user vectors against positive and negative item vectors.

    loss = -(sum over kept positives of log sigmoid(u.p) + sum over kept negatives of log sigmoid(-u.n)).
    user [B, d]; pos [B, l, d]; neg per-user [B, j, d] or shared [N, d]; pos_mask [B, l] and
    neg_mask [B, j] / [B, N] bool, True = keep (mask out, e.g., a negative equal to the positive).
    reduction: "mean" (divide by the number of kept terms; 0 when there is none) or "sum".
    impl: "auto" | "triton" | "torch" (see kernels.dispatch).
    """
    _check(user, pos, neg, pos_mask, neg_mask, reduction)
    if resolve_impl(impl, user, pos, neg, op="cpc_loss") == "torch":
        return pt_cpc_loss(user, pos, neg, pos_mask, neg_mask, reduction)
    from transrec.kernels.triton.triton_cpc_loss import triton_cpc_loss

    return triton_cpc_loss(user, pos, neg, pos_mask, neg_mask, reduction)
