"""Reference catalogue cross-entropy: the plain specification and a V-chunked, memory-bounded variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx


def exclusion_mask(exclude: torch.Tensor, target: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """[M, v1 - v0] bool, True where column v of row m is excluded: v in exclude[m] and v != target[m].

    exclude [M, E] int64 column indices, -1 = none; the target column is never excluded."""
    cols = torch.arange(v0, v1, device=exclude.device)
    hit = (exclude[:, :, None] == cols[None, None, :]).any(1)
    return hit & (cols[None, :] != target[:, None])


def pt_catalog_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    relu: bool = False,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T + bias, target) (relu'd logits if ``relu``), in fp32, cast back.

    With ``exclude`` [M, E] (column indices, -1 padded), the listed columns other than the row's target are
    left out of the row's softmax (their logit is -inf). Materialises the [M, V] logits: the specification,
    for tests and small catalogues.
    """
    z = h.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    if relu:
        z = torch.relu(z)
    if exclude is not None:
        z = z.masked_fill(exclusion_mask(exclude, target, 0, weight.shape[0]), float("-inf"))
    return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction).to(h.dtype)


def _chunk_logits(
    hf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int, relu: bool,
    exclude: torch.Tensor | None, target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z [M, v1 - v0] fp32 with excluded columns at -inf, relu' mask or None) for catalogue columns v0..v1."""
    z = hf @ weight[v0:v1].float().t()
    if bias is not None:
        z = z + bias[v0:v1].float()
    active = None
    if relu:
        active = z > 0
        z = z.clamp_min(0)
    if exclude is not None:
        z = z.masked_fill(exclusion_mask(exclude, target, v0, v1), float("-inf"))
    return z, active


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy over V in chunks: forward keeps a running logsumexp, backward recomputes chunks.

    Memory O(M d + V d + M chunk) instead of O(M V).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        target: torch.Tensor, ignore_index: int, reduction: str, relu: bool, chunk: int,
        exclude: torch.Tensor | None,
    ) -> torch.Tensor:
        M, V = h.shape[0], weight.shape[0]
        hf = h.float()
        lse = torch.full((M,), float("-inf"), device=h.device)
        z_t = torch.zeros(M, device=h.device)
        for v0 in range(0, V, chunk):
            v1 = min(v0 + chunk, V)
            z, _ = _chunk_logits(hf, weight, bias, v0, v1, relu, exclude, target)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            in_chunk = (target >= v0) & (target < v1)
            col = (target - v0).clamp(0, v1 - v0 - 1)
            z_t = z_t + torch.where(in_chunk, z.gather(1, col[:, None]).squeeze(1), 0.0)
        valid = target != ignore_index
        losses = torch.where(valid, lse - z_t, 0.0)
        n_valid = valid.sum()
        if reduction == "mean":
            loss = losses.sum() / n_valid
        elif reduction == "sum":
            loss = losses.sum()
        else:
            loss = losses
        ctx.save_for_backward(h, weight, bias, target, lse, valid, n_valid, exclude)
        ctx.reduction, ctx.relu, ctx.chunk = reduction, relu, chunk
        return loss.to(h.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, bias, target, lse, valid, n_valid, exclude = ctx.saved_tensors
        M, V = h.shape[0], weight.shape[0]
        g = grad_out.float()
        if ctx.reduction == "mean":
            g = g / n_valid.clamp(min=1)
        gscale = torch.where(valid, g.expand(M), 0.0)[:, None]  # [M, 1]
        hf = h.float()
        gh = torch.zeros_like(hf)
        gw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32)
        gb = torch.zeros(V, device=h.device) if bias is not None else None
        rows = torch.arange(M, device=h.device)
        for v0 in range(0, V, ctx.chunk):
            v1 = min(v0 + ctx.chunk, V)
            z, active = _chunk_logits(hf, weight, bias, v0, v1, ctx.relu, exclude, target)
            dz = torch.exp(z - lse[:, None])
            in_chunk = (target >= v0) & (target < v1)
            dz[rows[in_chunk], target[in_chunk] - v0] -= 1.0
            if active is not None:
                dz = dz * active
            dz = dz * gscale
            gh += dz @ weight[v0:v1].float()
            gw[v0:v1] = dz.t() @ hf
            if gb is not None:
                gb[v0:v1] = dz.sum(0)
        return (
            gh.to(h.dtype), gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype),
            None, None, None, None, None, None,
        )


def pt_catalog_cross_entropy_chunked(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    relu: bool = False,
    exclude: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Same value and gradients as ``pt_catalog_cross_entropy`` without forming [M, V] logits.

    ``chunk_size`` columns of the catalogue at a time (default: about 2^22 logits per chunk).
    """
    M = max(h.shape[0], 1)
    chunk = chunk_size or max(256, (1 << 22) // M)
    return _ChunkedCrossEntropy.apply(h, weight, bias, target, ignore_index, reduction, relu, int(chunk), exclude)
