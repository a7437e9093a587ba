"""Catalogue cross-entropy in Triton: the [M, V] logits never reach memory.

h [M, d] hidden states, W [V, d] item embeddings, bias [V] or None, target [M] (ignore_index rows
skipped); z = h W^T + bias (optionally relu'd); loss_m = logsumexp_v z_mv - z_m,target_m. With an exclusion
list EXCL [M, E] (column indices, -1 padded), z_mv = -inf for the listed columns v != target_m: a sampled
softmax drops accidental hits (a user's own earlier items among the candidates) this way.
The forward streams V in tiles with an online log-sum-exp; the backward recomputes the logit tiles.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

import triton
import triton.language as tl
from transrec.kernels.triton import common
from transrec.kernels.triton.common import dot_config, mm, next_pow2, sm_count
from transrec.kernels.triton.tuning import TILE_BYTES, TileConfig, bucket, dot_tile_bytes, launch_tuned, neighbourhood


@triton.jit
def _logits(h, W, BIAS, offs_v, v_ok, offs_d, D, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """(w tile [BLOCK_V, BLOCK_D], z = h w^T (+ bias, relu) [BLOCK_M, BLOCK_V] fp32, relu' mask)."""
    w = tl.load(W + offs_v[:, None] * D + offs_d[None, :], mask=v_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    z = mm(h, tl.trans(w), tl.zeros([BLOCK_M, BLOCK_V], tl.float32), CAST_FP32, PRECISION)
    if HAS_BIAS:
        z += tl.load(BIAS + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    active = z > 0.0
    if RELU:
        z = tl.maximum(z, 0.0)
    return w, z, active


@triton.jit
def _excluded(z, EXCL, E, offs_m, m_ok, offs_v, tgt):
    """z with -inf at the columns listed in EXCL[m, :E] other than the row's target (E comparisons per tile)."""
    for e in range(0, E):
        col = tl.load(EXCL + offs_m * E + e, mask=m_ok, other=-1)
        hit = (offs_v[None, :] == col[:, None]) & (col[:, None] != tgt[:, None]) & (col[:, None] >= 0)
        z = tl.where(hit, float("-inf"), z)
    return z


@triton.jit
def _ce_fwd_kernel(
    H, W, BIAS, TGT, EXCL, E, LSE_P, ZT_P, M, V, D, V_PER_SPLIT,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_EXCL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """For rows m of one M-tile and the columns of one V-split:
    LSE_P[split, m] = log sum_v exp(z_mv)   (online: running max r_m, running sum l_m = sum exp(z - r))
    ZT_P[split, m]  = z_m,target_m if the target lies in this split, else 0.
    The host combines splits: lse = logsumexp over splits, z_t = sum over splits."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    h = tl.load(H + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    tgt = tl.load(TGT + offs_m, mask=m_ok, other=-1)
    r = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    zt = tl.zeros([BLOCK_M], tl.float32)
    v_lo = split * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = offs_v < v_hi
        _, z, _ = _logits(h, W, BIAS, offs_v, v_ok, offs_d, D, HAS_BIAS, RELU, BLOCK_M, BLOCK_V,
                          CAST_FP32, PRECISION)
        if HAS_EXCL:
            z = _excluded(z, EXCL, E, offs_m, m_ok, offs_v, tgt)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        r_new = tl.maximum(r, tl.max(z, axis=1))
        r_safe = tl.where(r_new == float("-inf"), 0.0, r_new)  # a tile with every column excluded or off the end
        l = l * tl.exp(r - r_safe) + tl.sum(tl.exp(z - r_safe[:, None]), axis=1)
        r = r_new
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    tl.store(LSE_P + split * M + offs_m, r + tl.log(l), mask=m_ok)
    tl.store(ZT_P + split * M + offs_m, zt, mask=m_ok)


@triton.jit
def _dlogits(z, active, offs_v, v_ok, tgt, lse, gscale, RELU: tl.constexpr):
    """dL/dz_pre = g_m (softmax(z)_mv - [v == target_m]) (* [z_pre > 0] with relu), 0 off the catalogue."""
    dz = tl.exp(z - lse[:, None]) - tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    if RELU:
        dz = tl.where(active, dz, 0.0)
    return tl.where(v_ok[None, :], dz * gscale[:, None], 0.0)


@triton.jit
def _ce_bwd_h_kernel(
    H, W, BIAS, TGT, EXCL, E, LSE, GSCALE, GH_P, M, V, D, V_PER_SPLIT,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_EXCL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """GH_P[split, m] = sum_{v in split} dz_mv w_v: logit tiles recomputed, dz @ w by tl.dot (fp32 acc)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    tile_ok = m_ok[:, None] & (offs_d < D)[None, :]
    h = tl.load(H + offs_m[:, None] * D + offs_d[None, :], mask=tile_ok, other=0.0)
    tgt = tl.load(TGT + offs_m, mask=m_ok, other=-1)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    gscale = tl.load(GSCALE + offs_m, mask=m_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    v_lo = split * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = offs_v < v_hi
        w, z, active = _logits(h, W, BIAS, offs_v, v_ok, offs_d, D, HAS_BIAS, RELU, BLOCK_M, BLOCK_V,
                               CAST_FP32, PRECISION)
        if HAS_EXCL:
            z = _excluded(z, EXCL, E, offs_m, m_ok, offs_v, tgt)
        dz = _dlogits(z, active, offs_v, v_ok, tgt, lse, gscale, RELU)
        acc = mm(dz, w, acc, CAST_FP32, PRECISION)
    tl.store(GH_P + (split * M + offs_m)[:, None] * D + offs_d[None, :], acc, mask=tile_ok)


@triton.jit
def _ce_bwd_w_kernel(
    H, W, BIAS, TGT, EXCL, E, LSE, GSCALE, GW, GB, M, V, D, M_PER_SPLIT,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_EXCL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """GW[split, v] = sum_{m in split} dz_mv h_m (tl.dot of dz^T and h tiles), GB[split, v] = sum_{m in split}
    dz_mv: one program per V-tile and M-split (the host sums the splits when there are several)."""
    pid_v = tl.program_id(0)
    split = tl.program_id(1)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    v_ok = offs_v < V
    acc_w = tl.zeros([BLOCK_V, BLOCK_D], tl.float32)
    acc_b = tl.zeros([BLOCK_V], tl.float32)
    m_lo = split * M_PER_SPLIT
    m_hi = tl.minimum(m_lo + M_PER_SPLIT, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < m_hi
        h = tl.load(H + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & (offs_d < D)[None, :],
                    other=0.0)
        tgt = tl.load(TGT + offs_m, mask=m_ok, other=-1)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        gscale = tl.load(GSCALE + offs_m, mask=m_ok, other=0.0)
        _, z, active = _logits(h, W, BIAS, offs_v, v_ok, offs_d, D, HAS_BIAS, RELU, BLOCK_M, BLOCK_V,
                               CAST_FP32, PRECISION)
        if HAS_EXCL:
            z = _excluded(z, EXCL, E, offs_m, m_ok, offs_v, tgt)
        dz = _dlogits(z, active, offs_v, v_ok, tgt, lse, gscale, RELU)
        dz = tl.where(m_ok[:, None], dz, 0.0)
        acc_w = mm(tl.trans(dz), h, acc_w, CAST_FP32, PRECISION)
        acc_b += tl.sum(dz, axis=0)
    w_ok = v_ok[:, None] & (offs_d < D)[None, :]
    tl.store(GW + (split * V + offs_v)[:, None] * D + offs_d[None, :], acc_w.to(GW.dtype.element_ty), mask=w_ok)
    if HAS_BIAS:
        tl.store(GB + split * V + offs_v, acc_b, mask=v_ok)


# The weight gradient's M-splits keep at most this many bytes of fp32 partial sums.
SPLIT_PARTIAL_BYTES = 256 << 20


def heuristic_tiles(block_d: int, elem_bytes: int, interpret: bool) -> TileConfig:
    """The untimed tiling: full-d tiles of h and w; fp32 inputs get half the rows and columns of bf16's."""
    if interpret:
        return TileConfig.of(1, BLOCK_M=32, BLOCK_V=128)
    if block_d <= 128:
        bm, bv, warps = 64, 128, 4
    elif block_d <= 256:
        bm, bv, warps = 64, 64, 8
    elif block_d <= 512:
        bm, bv, warps = 32, 32, 8
    else:
        bm, bv, warps = 16, 16, 8
    if elem_bytes >= 4:
        bm, bv = max(16, bm // 2), max(16, bv // 2)
    return TileConfig.of(warps, BLOCK_M=bm, BLOCK_V=bv)


def tile_bytes(kernel: str, cfg: TileConfig, block_d: int, elem_bytes: int) -> int:
    """Bytes of the live tiles of one program of ``kernel`` (fwd, bwd_h or bwd_w) with tiling ``cfg``."""
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    return dot_tile_bytes(bm, bv, block_d, elem_bytes, {"fwd": 0, "bwd_h": bm, "bwd_w": bv}[kernel])


def candidates(kernel: str, block_d: int, elem_bytes: int, interpret: bool) -> list[TileConfig]:
    """The heuristic tiling first, then its neighbours whose live tiles fit TILE_BYTES; one in the interpreter."""
    base = heuristic_tiles(block_d, elem_bytes, interpret)
    if interpret:
        return [base]
    return neighbourhood(base, lambda c: tile_bytes(kernel, c, block_d, elem_bytes) <= TILE_BYTES,
                         halve=("BLOCK_M", "BLOCK_V"), double=("BLOCK_V",))


def _v_split(m_blocks: int, V: int, block_v: int, device: torch.device, n_split: int | None) -> tuple[int, int]:
    """(number of V-splits, columns per split, a multiple of BLOCK_V) so the grid fills the device."""
    v_blocks = triton.cdiv(V, block_v)
    if n_split is None:
        n_split = triton.cdiv(4 * sm_count(device), m_blocks) if device.type == "cuda" else 1
    n_split = max(1, min(n_split, v_blocks))
    per_split = triton.cdiv(v_blocks, n_split) * block_v
    return triton.cdiv(V, per_split), per_split


def _m_split(v_blocks: int, M: int, V: int, D: int, block_m: int, device: torch.device,
             w_split: int | None) -> tuple[int, int]:
    """(number of M-splits of the weight gradient, rows per split, a multiple of BLOCK_M): few V-tiles (a sampled
    softmax's candidates) would leave most of the device idle with one program per V-tile looping over all of M."""
    m_blocks = triton.cdiv(max(M, 1), block_m)
    if w_split is None:
        w_split = triton.cdiv(2 * sm_count(device), v_blocks) if device.type == "cuda" else 1
        w_split = min(w_split, max(1, SPLIT_PARTIAL_BYTES // (4 * V * D)))
    w_split = max(1, min(w_split, m_blocks))
    per_split = triton.cdiv(m_blocks, w_split) * block_m
    return triton.cdiv(max(M, 1), per_split), per_split


def _sum_splits(parts: torch.Tensor) -> torch.Tensor:
    """The splits' partial results [splits, ...] added up (the one split itself when there is one)."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def _key(h: torch.Tensor, V: int, meta: dict) -> tuple:
    return (h.dtype, meta["BLOCK_D"], bucket(h.shape[0]), bucket(V), meta["HAS_BIAS"], meta["RELU"], meta["HAS_EXCL"])


class CatalogCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        target: torch.Tensor, ignore_index: int, reduction: str, relu: bool, n_split: int | None,
        exclude: torch.Tensor | None, w_split: int | None,
    ) -> torch.Tensor:
        interpret = common.INTERPRET  # read per call: the tests switch the interpreter's tilings off and on
        M, D = h.shape
        V = weight.shape[0]
        h, weight, target = h.contiguous(), weight.contiguous(), target.contiguous()
        bias_arg = weight if bias is None else bias.contiguous()
        excl = target if exclude is None else exclude.contiguous()
        n_excl = 0 if exclude is None else exclude.shape[1]
        block_d = max(16, next_pow2(D))
        cast, precision = dot_config(h.dtype)
        meta = {
            "HAS_BIAS": bias is not None, "RELU": relu, "HAS_EXCL": exclude is not None,
            "BLOCK_D": block_d, "CAST_FP32": cast, "PRECISION": precision,
        }

        def launch(cfg: TileConfig) -> tuple[torch.Tensor, torch.Tensor]:
            m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
            splits, per_split = _v_split(max(m_blocks, 1), V, cfg["BLOCK_V"], h.device, n_split)
            lse_p = torch.empty(splits, M, device=h.device, dtype=torch.float32)
            zt_p = torch.empty(splits, M, device=h.device, dtype=torch.float32)
            if M > 0:
                _ce_fwd_kernel[(m_blocks, splits)](h, weight, bias_arg, target, excl, n_excl, lse_p, zt_p, M, V, D,
                                                    per_split, **meta, **cfg.launch_args())
            return lse_p, zt_p

        tiles = candidates("fwd", block_d, h.element_size(), interpret)
        lse_p, zt_p = launch_tuned("catalog_ce_fwd", _key(h, V, meta), tiles, launch, h.device) if M > 0 \
            else launch(tiles[0])
        lse = lse_p[0] if lse_p.shape[0] == 1 else torch.logsumexp(lse_p, dim=0)
        valid = target != ignore_index
        losses = torch.where(valid, lse - zt_p.sum(0), 0.0)  # [M] fp32
        n_valid = valid.sum()
        if reduction == "mean":
            loss = losses.sum() / n_valid  # NaN when every row is ignored, as F.cross_entropy
        elif reduction == "sum":
            loss = losses.sum()
        else:
            loss = losses
        ctx.save_for_backward(h, weight, bias, target, lse, valid, n_valid, exclude)
        ctx.meta, ctx.reduction, ctx.n_split, ctx.w_split = meta, reduction, n_split, w_split
        return loss.to(h.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        interpret = common.INTERPRET  # read per call: the tests switch the interpreter's tilings off and on
        h, weight, bias, target, lse, valid, n_valid, exclude = ctx.saved_tensors
        meta = ctx.meta
        excl = target if exclude is None else exclude
        n_excl = 0 if exclude is None else exclude.shape[1]
        M, D = h.shape
        V = weight.shape[0]
        g = grad_out.float()
        if ctx.reduction == "mean":
            g = g / n_valid.clamp(min=1)
        gscale = torch.where(valid, g.expand(M), 0.0).contiguous()  # dL/dloss_m, 0 on ignored rows
        bias_arg = weight if bias is None else bias
        args = (h, weight, bias_arg, target, excl, n_excl, lse, gscale)
        key, elem = _key(h, V, meta), h.element_size()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = gw = gb = None
        if need_h and M > 0:
            def launch_h(cfg: TileConfig) -> torch.Tensor:
                m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
                splits, per_split = _v_split(m_blocks, V, cfg["BLOCK_V"], h.device, ctx.n_split)
                gh_p = torch.empty(splits, M, D, device=h.device, dtype=torch.float32)
                _ce_bwd_h_kernel[(m_blocks, splits)](*args, gh_p, M, V, D, per_split, **meta, **cfg.launch_args())
                return gh_p

            tiles = candidates("bwd_h", meta["BLOCK_D"], elem, interpret)
            gh = _sum_splits(launch_tuned("catalog_ce_bwd_h", key, tiles, launch_h, h.device)).to(h.dtype)
        elif need_h:
            gh = torch.zeros_like(h)
        if (need_w or need_b) and M > 0:
            def launch_w(cfg: TileConfig) -> tuple[torch.Tensor, torch.Tensor]:
                v_blocks = triton.cdiv(V, cfg["BLOCK_V"])
                splits, per_split = _m_split(v_blocks, M, V, D, cfg["BLOCK_M"], h.device, ctx.w_split)
                # one split writes the gradient in the weight's dtype; several write fp32 partials, summed below
                gw_p = torch.empty(splits, V, D, device=h.device, dtype=weight.dtype if splits == 1 else torch.float32)
                gb_p = torch.empty(splits, V, device=h.device, dtype=torch.float32)
                _ce_bwd_w_kernel[(v_blocks, splits)](*args, gw_p, gb_p, M, V, D, per_split, **meta,
                                                     **cfg.launch_args())
                return gw_p, gb_p

            tiles = candidates("bwd_w", meta["BLOCK_D"], elem, interpret)
            gw_p, gb_p = launch_tuned("catalog_ce_bwd_w", key, tiles, launch_w, h.device)
            gw, gb = _sum_splits(gw_p).to(weight.dtype), _sum_splits(gb_p)
        elif need_w or need_b:
            gw = torch.zeros_like(weight)
            gb = torch.zeros(V, device=h.device, dtype=torch.float32)
        gw = gw if need_w else None
        gb = gb.to(bias.dtype) if need_b else None
        return gh, gw, gb, None, None, None, None, None, None, None


def triton_catalog_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    ignore_index: int = -100, reduction: str = "mean", relu: bool = False, n_split: int | None = None,
    exclude: torch.Tensor | None = None, w_split: int | None = None,
) -> torch.Tensor:
    """Triton catalogue cross-entropy; ``n_split`` (default: fill the device) splits V across programs in the
    forward and the hidden-state gradient, ``w_split`` splits M across programs in the weight gradient;
    ``exclude`` [M, E] int64 column indices (-1 padded) left out of each row's softmax unless the target."""
    return CatalogCrossEntropyFunction.apply(h, weight, bias, target, ignore_index, reduction, relu, n_split,
                                             exclude, w_split)
