"""Reference CPC loss (the specification of the Triton kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pt_cpc_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """-(sum_kept log sigmoid(u.p) + sum_kept log sigmoid(-u.n)), divided by the kept count for "mean".

    user [B, d]; pos [B, l, d]; neg [B, j, d] (per user) or [N, d] (shared by the batch);
    pos_mask [B, l], neg_mask [B, j] or [B, N], bool, True = keep. With no kept term, "mean" gives 0
    (and zero gradients). Computed in fp32, returned in user's dtype.
    """
    u = user.float()
    s_pos = torch.einsum("bd,bld->bl", u, pos.float())  # [B, l]
    s_neg = u @ neg.float().t() if neg.dim() == 2 else torch.einsum("bd,bjd->bj", u, neg.float())
    t_pos = -F.logsigmoid(s_pos)
    t_neg = -F.logsigmoid(-s_neg)
    if pos_mask is not None:
        t_pos = t_pos * pos_mask
    if neg_mask is not None:
        t_neg = t_neg * neg_mask
    total = t_pos.sum() + t_neg.sum()
    if reduction == "mean":
        n_pos = t_pos.numel() if pos_mask is None else pos_mask.sum()
        n_neg = t_neg.numel() if neg_mask is None else neg_mask.sum()
        total = total / torch.clamp(torch.as_tensor(n_pos + n_neg, device=u.device).float(), min=1.0)
    return total.to(user.dtype)
