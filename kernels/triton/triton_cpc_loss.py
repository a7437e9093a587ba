"""CPC (binary contrastive) loss in Triton: per-user rows and shared negatives, forward and backward.

user [B, d]; pos [B, l, d]; neg per-user [B, j, d] or shared [N, d]; masks True = keep.
loss = -(sum_kept log sigmoid(u.p) + sum_kept log sigmoid(-u.n)) [/ number of kept terms].
Only scores are ever formed, tile by tile; nothing of size [B, N] is written to memory.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

import triton
import triton.language as tl
from transrec.kernels.triton import common
from transrec.kernels.triton.common import dot_config, log_sigmoid, mm, next_pow2, sm_count
from transrec.kernels.triton.tuning import TILE_BYTES, TileConfig, bucket, dot_tile_bytes, launch_tuned, neighbourhood


@triton.jit
def _rows_loss(u, P, M, b, K, D, SIGN: tl.constexpr, HAS_MASK: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_k keep_bk * -log sigmoid(SIGN * u_b . P_bk) over the K rows of P[b] (P is [B, K, D])."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    total = tl.sum(tl.zeros([BLOCK_K], tl.float32), axis=0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        p = tl.load(P + (b * K + offs_k)[:, None] * D + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(p * u[None, :], axis=1)  # [BLOCK_K] scores
        keep = k_ok
        if HAS_MASK:
            keep = keep & (tl.load(M + b * K + offs_k, mask=k_ok, other=0) != 0)
        total += tl.sum(tl.where(keep, -log_sigmoid(SIGN * s), 0.0), axis=0)
    return total


@triton.jit
def _rows_grad(u, gu, P, M, GP, b, K, D, scale, SIGN: tl.constexpr, HAS_MASK: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes dL/dP[b] = c_bk u_b and returns gu + sum_k c_bk P_bk, c = -SIGN sigmoid(-SIGN s) keep scale."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        ptrs = (b * K + offs_k)[:, None] * D + offs_d[None, :]
        tile_ok = k_ok[:, None] & d_ok[None, :]
        p = tl.load(P + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.sum(p * u[None, :], axis=1)
        keep = k_ok
        if HAS_MASK:
            keep = keep & (tl.load(M + b * K + offs_k, mask=k_ok, other=0) != 0)
        c = tl.where(keep, -SIGN * tl.sigmoid(-SIGN * s), 0.0) * scale  # dL/ds
        tl.store(GP + ptrs, (c[:, None] * u[None, :]).to(GP.dtype.element_ty), mask=tile_ok)
        gu += tl.sum(c[:, None] * p, axis=0)
    return gu


@triton.jit
def _cpc_rows_fwd_kernel(
    U, P, PM, NR, NRM, LOSS, L, J, D,
    HAS_PM: tl.constexpr, HAS_NR: tl.constexpr, HAS_NRM: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """LOSS[b] = -sum_i pm_bi log sigmoid(u_b.p_bi) - sum_k nm_bk log sigmoid(-u_b.n_bk) (per-user rows)."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    u = tl.load(U + b * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    total = _rows_loss(u, P, PM, b, L, D, 1.0, HAS_PM, BLOCK_L, BLOCK_D)
    if HAS_NR:
        total += _rows_loss(u, NR, NRM, b, J, D, -1.0, HAS_NRM, BLOCK_J, BLOCK_D)
    tl.store(LOSS + b, total)


@triton.jit
def _cpc_rows_bwd_kernel(
    U, P, PM, NR, NRM, SCALE, GU, GP, GNR, L, J, D,
    HAS_PM: tl.constexpr, HAS_NR: tl.constexpr, HAS_NRM: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """With c = dL/ds (pos: (sigmoid(s) - 1) scale, neg: sigmoid(s) scale, 0 where masked):
    dL/dp_bi = c_bi u_b, dL/dn_bk = c_bk u_b, GU[b] = sum_i c_bi p_bi + sum_k c_bk n_bk (fp32)."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    scale = tl.load(SCALE)
    u = tl.load(U + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    gu = tl.zeros([BLOCK_D], tl.float32)
    gu = _rows_grad(u, gu, P, PM, GP, b, L, D, scale, 1.0, HAS_PM, BLOCK_L, BLOCK_D)
    if HAS_NR:
        gu = _rows_grad(u, gu, NR, NRM, GNR, b, J, D, scale, -1.0, HAS_NRM, BLOCK_J, BLOCK_D)
    tl.store(GU + b * D + offs_d, gu, mask=d_ok)


@triton.jit
def _shared_scores(U, NS, NM, offs_b, offs_n, B, N, D, HAS_MASK: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """(u tile [BB, D], n tile [BN, D], S = u n^T [BB, BN] fp32, keep [BB, BN]) for shared negatives."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b_ok = offs_b < B
    n_ok = offs_n < N
    u = tl.load(U + offs_b[:, None] * D + offs_d[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0)
    n = tl.load(NS + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    s = mm(u, tl.trans(n), tl.zeros([BLOCK_B, BLOCK_N], tl.float32), CAST_FP32, PRECISION)
    keep = b_ok[:, None] & n_ok[None, :]
    if HAS_MASK:
        keep = keep & (tl.load(NM + offs_b[:, None] * N + offs_n[None, :], mask=keep, other=0) != 0)
    return u, n, s, keep


@triton.jit
def _cpc_shared_fwd_kernel(
    U, NS, NM, LOSSP, B, N, D,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """LOSSP[pid] = -sum over the tile of keep_bn log sigmoid(-u_b.n_n), S tile by tl.dot (fp32 acc)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    _, _, s, keep = _shared_scores(U, NS, NM, offs_b, offs_n, B, N, D, HAS_MASK,
                                   BLOCK_B, BLOCK_N, BLOCK_D, CAST_FP32, PRECISION)
    part = tl.sum(tl.sum(tl.where(keep, -log_sigmoid(-s), 0.0), axis=1), axis=0)
    tl.store(LOSSP + pid_b * tl.num_programs(1) + pid_n, part)


@triton.jit
def _cpc_shared_bwd_user_kernel(
    U, NS, NM, SCALE, GUP, B, N, D, N_PER_SPLIT,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """GUP[split, b] = sum_{n in split} g_bn n_n with g_bn = scale sigmoid(u_b.n_n) keep_bn (tl.dot tiles)."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(SCALE)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    n_lo = split * N_PER_SPLIT
    for n0 in range(n_lo, tl.minimum(n_lo + N_PER_SPLIT, N), BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        _, n, s, keep = _shared_scores(U, NS, NM, offs_b, offs_n, B, N, D, HAS_MASK,
                                       BLOCK_B, BLOCK_N, BLOCK_D, CAST_FP32, PRECISION)
        g = tl.where(keep, tl.sigmoid(s), 0.0) * scale  # [BB, BN]
        acc = mm(g, n, acc, CAST_FP32, PRECISION)
    ok = (offs_b < B)[:, None] & (offs_d < D)[None, :]
    tl.store(GUP + (split * B + offs_b)[:, None] * D + offs_d[None, :], acc, mask=ok)


@triton.jit
def _cpc_shared_bwd_neg_kernel(
    U, NS, NM, SCALE, GN, B, N, D,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """GN[n] = sum_b g_bn u_b with g_bn = scale sigmoid(u_b.n_n) keep_bn (tl.dot of g^T and u tiles)."""
    pid_n = tl.program_id(0)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(SCALE)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        u, _, s, keep = _shared_scores(U, NS, NM, offs_b, offs_n, B, N, D, HAS_MASK,
                                       BLOCK_B, BLOCK_N, BLOCK_D, CAST_FP32, PRECISION)
        g = tl.where(keep, tl.sigmoid(s), 0.0) * scale  # [BB, BN]
        acc = mm(tl.trans(g), u, acc, CAST_FP32, PRECISION)
    ok = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    tl.store(GN + offs_n[:, None] * D + offs_d[None, :], acc.to(GN.dtype.element_ty), mask=ok)


def _row_block(k: int, block_d: int, interpret: bool) -> int:
    cap = 64 if interpret else max(1, 8192 // block_d)  # keep a [BLOCK_K, D] tile register-sized
    return max(1, min(next_pow2(k), cap))


def _shared_blocks(block_d: int, interpret: bool) -> tuple[int, int]:
    if interpret:
        return 16, 64
    return (32, 64) if block_d <= 256 else (16, 32)


def shared_tile_bytes(kernel: str, cfg: TileConfig, block_d: int, elem_bytes: int) -> int:
    """Bytes of the live tiles of one program of a shared-negative kernel (fwd, bwd_user or bwd_neg)."""
    bb, bn = cfg["BLOCK_B"], cfg["BLOCK_N"]
    return dot_tile_bytes(bb, bn, block_d, elem_bytes, {"fwd": 0, "bwd_user": bb, "bwd_neg": bn}[kernel])


def shared_candidates(kernel: str, block_d: int, elem_bytes: int, interpret: bool) -> list[TileConfig]:
    """The heuristic tiling of a shared-negative kernel first, then its neighbours that fit TILE_BYTES (CUDA)."""
    bb, bn = _shared_blocks(block_d, interpret)
    base = TileConfig.of(4, BLOCK_B=bb, BLOCK_N=bn)
    if interpret:
        return [base]
    return neighbourhood(base, lambda c: shared_tile_bytes(kernel, c, block_d, elem_bytes) <= TILE_BYTES,
                         halve=("BLOCK_B", "BLOCK_N"), double=("BLOCK_B", "BLOCK_N"))


def _shared_key(user: torch.Tensor, N: int, shared_args: dict) -> tuple:
    return (user.dtype, shared_args["BLOCK_D"], bucket(user.shape[0]), bucket(N), shared_args["HAS_MASK"])


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if mask is None else mask.contiguous().view(torch.uint8)


class CPCLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
        pos_mask: torch.Tensor | None, neg_mask: torch.Tensor | None, reduction: str, n_split: int | None,
    ) -> torch.Tensor:
        interpret = common.INTERPRET  # read per call: the tests switch the interpreter's tilings off and on
        B, D = user.shape
        L = pos.shape[1]
        shared = neg.dim() == 2
        user, pos, neg = user.contiguous(), pos.contiguous(), neg.contiguous()
        pm = _mask_arg(pos_mask, user)
        nm = _mask_arg(neg_mask, user)
        block_d = max(16, next_pow2(D))
        J = 0 if shared else neg.shape[1]
        row_args = {
            "HAS_PM": pos_mask is not None, "HAS_NR": not shared, "HAS_NRM": neg_mask is not None and not shared,
            "BLOCK_L": _row_block(L, block_d, interpret), "BLOCK_J": _row_block(J, block_d, interpret),
            "BLOCK_D": block_d,
        }
        loss_rows = torch.zeros(B, device=user.device, dtype=torch.float32)
        if B > 0:
            _cpc_rows_fwd_kernel[(B,)](user, pos, pm, neg, nm, loss_rows, L, J, D, **row_args)
        total = loss_rows.sum()
        cast, precision = dot_config(user.dtype)
        shared_args = {"HAS_MASK": neg_mask is not None, "BLOCK_D": block_d, "CAST_FP32": cast, "PRECISION": precision}
        if shared and B > 0 and neg.shape[0] > 0:
            N = neg.shape[0]

            def launch(cfg: TileConfig) -> torch.Tensor:
                grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(N, cfg["BLOCK_N"]))
                loss_parts = torch.empty(grid[0] * grid[1], device=user.device, dtype=torch.float32)
                _cpc_shared_fwd_kernel[grid](user, neg, nm, loss_parts, B, N, D, **shared_args, **cfg.launch_args())
                return loss_parts

            tiles = shared_candidates("fwd", block_d, user.element_size(), interpret)
            total = total + launch_tuned("cpc_shared_fwd", _shared_key(user, N, shared_args), tiles, launch,
                                         user.device).sum()

        if reduction == "mean":
            n_pos = B * L if pos_mask is None else pos_mask.sum()
            n_neg = (B * neg.shape[0] if shared else B * J) if neg_mask is None else neg_mask.sum()
            denom = torch.clamp(torch.as_tensor(n_pos + n_neg, device=user.device).float(), min=1.0)
        else:
            denom = torch.ones((), device=user.device, dtype=torch.float32)
        ctx.save_for_backward(user, pos, neg, pm, nm, denom)
        ctx.args = (shared, row_args, shared_args, J, n_split)
        return (total / denom).to(user.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        interpret = common.INTERPRET  # read per call: the tests switch the interpreter's tilings off and on
        user, pos, neg, pm, nm, denom = ctx.saved_tensors
        shared, row_args, shared_args, J, n_split = ctx.args
        B, D = user.shape
        L = pos.shape[1]
        scale = (grad_out.float() / denom).reshape(1)
        gu = torch.zeros(B, D, device=user.device, dtype=torch.float32)
        gp = torch.empty_like(pos)
        gn = torch.zeros_like(neg) if shared else torch.empty_like(neg)
        if B > 0:
            _cpc_rows_bwd_kernel[(B,)](user, pos, pm, neg, nm, scale, gu, gp, gn, L, J, D, **row_args)
        if shared and B > 0 and neg.shape[0] > 0:
            N = neg.shape[0]
            key, elem = _shared_key(user, N, shared_args), user.element_size()

            def launch_user(cfg: TileConfig) -> torch.Tensor:
                bb, bn = cfg["BLOCK_B"], cfg["BLOCK_N"]
                n_blocks, b_blocks = triton.cdiv(N, bn), triton.cdiv(B, bb)
                splits = n_split
                if splits is None:  # enough programs to fill the device, each with >= 4 tiles of N
                    splits = max(1, min(n_blocks // 4, (2 * sm_count(user.device)) // b_blocks))
                splits = max(1, min(splits, n_blocks))
                n_per_split = triton.cdiv(n_blocks, splits) * bn
                splits = triton.cdiv(N, n_per_split)
                gup = torch.empty(splits, B, D, device=user.device, dtype=torch.float32)
                _cpc_shared_bwd_user_kernel[(b_blocks, splits)](
                    user, neg, nm, scale, gup, B, N, D, n_per_split, **shared_args, **cfg.launch_args()
                )
                return gup

            def launch_neg(cfg: TileConfig) -> None:
                grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
                _cpc_shared_bwd_neg_kernel[grid](user, neg, nm, scale, gn, B, N, D, **shared_args, **cfg.launch_args())

            tiles = shared_candidates("bwd_user", shared_args["BLOCK_D"], elem, interpret)
            gu += launch_tuned("cpc_shared_bwd_user", key, tiles, launch_user, user.device).sum(0)
            tiles = shared_candidates("bwd_neg", shared_args["BLOCK_D"], elem, interpret)
            launch_tuned("cpc_shared_bwd_neg", key, tiles, launch_neg, user.device)
        return gu.to(user.dtype), gp, gn, None, None, None, None


def triton_cpc_loss(
    user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None, reduction: str = "mean", n_split: int | None = None,
) -> torch.Tensor:
    """Triton CPC loss (see the module docstring). ``n_split`` splits N in the user-gradient kernel."""
    return CPCLossFunction.apply(user, pos, neg, pos_mask, neg_mask, reduction, n_split)
