"""Additive attention pooling in Triton: one program per sequence, one pass over x in the forward.

Shapes: x [B, T, H], mask [B, T] (True = real token), w1 [H, A], b1 [A], w2 [A], b2 [] (0-dim).
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

import triton
import triton.language as tl
from transrec.kernels.triton import common
from transrec.kernels.triton.common import dot_config, mm, next_pow2, tanh
from transrec.kernels.triton.tuning import TILE_BYTES, TileConfig, bucket, launch_tuned, neighbourhood


@triton.jit
def _attention_pool_fwd_kernel(
    X, MASK, W1, B1, W2, B2,  # inputs
    OUT, S, LSE,  # outputs: OUT [B, H] fp32, S [B, T] fp32 scores, LSE [B] fp32
    T, H, A,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_A: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fused scores, masked online softmax and weighted sum for one sequence b.

    s_t   = sum_a tanh((x_t W1)_a + b1_a) w2_a + b2                       (scores, stored for backward)
    alpha = softmax_t(s_t over tokens with mask_t)                         (online: running max m, sum l)
    out   = sum_t alpha_t x_t,  lse = m + log l                            (out = 0, lse = +inf if no token)

    Per T-block of x [BLOCK_T, H] (loaded once): scores via tl.dot against W1 in A-chunks, then the
    running max/sum are rescaled and the block's exp-weighted rows are added to the accumulator.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, BLOCK_A)
    offs_tb = tl.arange(0, BLOCK_T)
    h_ok = offs_h < H
    b2 = tl.load(B2).to(tl.float32)

    m = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)  # running max (scalar)
    l = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)  # running sum of exp (scalar)
    acc = tl.zeros([BLOCK_H], tl.float32)  # running sum_t exp(s_t - m) x_t
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + offs_tb
        t_ok = offs_t < T
        x = tl.load(
            X + b * T * H + offs_t[:, None] * H + offs_h[None, :],
            mask=t_ok[:, None] & h_ok[None, :], other=0.0,
        )  # [BLOCK_T, BLOCK_H]
        keep = (tl.load(MASK + b * T + offs_t, mask=t_ok, other=0) != 0) & t_ok
        s = tl.zeros([BLOCK_T], tl.float32)
        for a0 in range(0, A, BLOCK_A):
            a_ok = a0 + offs_a < A
            w1 = tl.load(
                W1 + offs_h[:, None] * A + (a0 + offs_a)[None, :],
                mask=h_ok[:, None] & a_ok[None, :], other=0.0,
            )  # [BLOCK_H, BLOCK_A]
            pre = mm(x, w1, tl.zeros([BLOCK_T, BLOCK_A], tl.float32), CAST_FP32, PRECISION)
            pre += tl.load(B1 + a0 + offs_a, mask=a_ok, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(W2 + a0 + offs_a, mask=a_ok, other=0.0).to(tl.float32)
            s += tl.sum(tanh(pre) * w2[None, :], axis=1)
        s = s + b2
        tl.store(S + b * T + offs_t, s, mask=t_ok)

        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid inf - inf
        p = tl.exp(s - m_ref)  # [BLOCK_T], 0 where masked
        corr = tl.exp(m - m_ref)
        l = l * corr + tl.sum(p, axis=0)
        acc = acc * corr + tl.sum(p[:, None] * x.to(tl.float32), axis=0)
        m = m_new

    l_safe = tl.where(l > 0, l, 1.0)  # no token at all: out = 0, lse = +inf (alpha = 0 in backward)
    tl.store(OUT + b * H + offs_h, tl.where(l > 0, acc / l_safe, 0.0), mask=h_ok)
    tl.store(LSE + b, tl.where(l > 0, m + tl.log(l_safe), float("inf")))


@triton.jit
def _attention_pool_bwd_kernel(
    X, MASK, W1, B1, W2, S, LSE, OUT, DOUT,  # inputs (OUT is the fp32 forward output)
    DX, DPRE, DS, DW2P,  # outputs: DX [B,T,H], DPRE [B,T,A] fp32, DS [B,T] fp32, DW2P [B,NTB,A] fp32
    T, H, A, NTB,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_A: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward for one sequence b, recomputing tanh(x W1 + b1) tile by tile.

    g = dL/dout [H], alpha_t = exp(s_t - lse) on kept tokens (0 elsewhere), out = sum_t alpha_t x_t:
    ds_t       = alpha_t (g.x_t - g.out)                                  (softmax backward)
    dpre_ta    = ds_t w2_a (1 - tanh(pre_ta)^2)
    dx_t       = alpha_t g + sum_a dpre_ta W1[:, a]                       (tl.dot with W1^T)
    dw2 partial[b, tb, a] = sum_{t in block tb} ds_t tanh(pre_ta)
    The host finishes db2 = sum ds, db1 = sum dpre and dW1 = x^T dpre (one GEMM).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, BLOCK_A)
    offs_tb = tl.arange(0, BLOCK_T)
    h_ok = offs_h < H
    g = tl.load(DOUT + b * H + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    out = tl.load(OUT + b * H + offs_h, mask=h_ok, other=0.0)
    g_dot_out = tl.sum(g * out, axis=0)
    lse = tl.load(LSE + b)
    for tb in range(NTB):
        offs_t = tb * BLOCK_T + offs_tb
        t_ok = offs_t < T
        x = tl.load(
            X + b * T * H + offs_t[:, None] * H + offs_h[None, :],
            mask=t_ok[:, None] & h_ok[None, :], other=0.0,
        )
        keep = (tl.load(MASK + b * T + offs_t, mask=t_ok, other=0) != 0) & t_ok
        s = tl.load(S + b * T + offs_t, mask=t_ok, other=0.0)
        alpha = tl.where(keep, tl.exp(s - lse), 0.0)
        ds = alpha * (tl.sum(x.to(tl.float32) * g[None, :], axis=1) - g_dot_out)
        tl.store(DS + b * T + offs_t, ds, mask=t_ok)
        dx = alpha[:, None] * g[None, :]  # [BLOCK_T, BLOCK_H]
        for a0 in range(0, A, BLOCK_A):
            a_ok = a0 + offs_a < A
            w1 = tl.load(
                W1 + offs_h[:, None] * A + (a0 + offs_a)[None, :],
                mask=h_ok[:, None] & a_ok[None, :], other=0.0,
            )
            pre = mm(x, w1, tl.zeros([BLOCK_T, BLOCK_A], tl.float32), CAST_FP32, PRECISION)
            pre += tl.load(B1 + a0 + offs_a, mask=a_ok, other=0.0).to(tl.float32)[None, :]
            th = tanh(pre)
            w2 = tl.load(W2 + a0 + offs_a, mask=a_ok, other=0.0).to(tl.float32)
            tl.store(DW2P + (b * NTB + tb) * A + a0 + offs_a, tl.sum(ds[:, None] * th, axis=0), mask=a_ok)
            dpre = ds[:, None] * w2[None, :] * (1.0 - th * th)  # [BLOCK_T, BLOCK_A]
            tl.store(
                DPRE + b * T * A + offs_t[:, None] * A + (a0 + offs_a)[None, :], dpre,
                mask=t_ok[:, None] & a_ok[None, :],
            )
            dx = mm(dpre, tl.trans(w1), dx, CAST_FP32, PRECISION)
        tl.store(
            DX + b * T * H + offs_t[:, None] * H + offs_h[None, :],
            dx.to(DX.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :],
        )


def _tile_blocks(T: int, H: int, A: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_A, num_warps): the whole hidden row per tile, >= 16 for tl.dot."""
    block_h = max(16, next_pow2(H))
    if interpret:  # few, large tiles: the interpreter pays per op, not per element
        return max(16, min(64, next_pow2(T))), block_h, max(16, min(128, next_pow2(A))), 1
    block_a = 32 if block_h <= 512 else 16
    return 16, block_h, max(16, min(block_a, next_pow2(A))), 4 if block_h <= 256 else 8


def tile_bytes(kernel: str, cfg: TileConfig, block_h: int, elem_bytes: int) -> int:
    """Bytes of the live tiles of one program: the x tile, a W1 chunk, the score chunk, the output row (and the
    x-gradient tile in the backward)."""
    bt, ba = cfg["BLOCK_T"], cfg["BLOCK_A"]
    grad = bt * block_h * 4 if kernel == "bwd" else 0
    return (bt * block_h + block_h * ba) * elem_bytes + bt * ba * 4 + block_h * 4 + grad


def candidates(kernel: str, T: int, H: int, A: int, elem_bytes: int, interpret: bool) -> list[TileConfig]:
    """The heuristic tiling first, then its neighbours that fit TILE_BYTES and do not exceed T and A (CUDA)."""
    bt, bh, ba, warps = _tile_blocks(T, H, A, interpret)
    base = TileConfig.of(warps, BLOCK_T=bt, BLOCK_A=ba)
    if interpret:
        return [base]
    t_cap, a_cap = max(16, next_pow2(T)), max(16, next_pow2(A))

    def fits(c: TileConfig) -> bool:
        return c["BLOCK_T"] <= t_cap and c["BLOCK_A"] <= a_cap and tile_bytes(kernel, c, bh, elem_bytes) <= TILE_BYTES

    return neighbourhood(base, fits, halve=("BLOCK_A",), double=("BLOCK_T", "BLOCK_A"))


class AttentionPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
        w2: torch.Tensor, b2: torch.Tensor,
    ) -> torch.Tensor:
        interpret = common.INTERPRET  # read per call: the tests switch the interpreter's tilings off and on
        B, T, H = x.shape
        A = w1.shape[1]
        x = x.contiguous()
        mask_u8 = mask.contiguous().view(torch.uint8)
        w1, b1, w2, b2 = w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.reshape(())
        out = torch.empty(B, H, device=x.device, dtype=torch.float32)
        scores = torch.empty(B, T, device=x.device, dtype=torch.float32)
        lse = torch.empty(B, device=x.device, dtype=torch.float32)
        block_h = max(16, next_pow2(H))
        cast, precision = dot_config(x.dtype)

        def launch(cfg: TileConfig) -> None:
            _attention_pool_fwd_kernel[(B,)](
                x, mask_u8, w1, b1, w2, b2, out, scores, lse, T, H, A,
                BLOCK_H=block_h, CAST_FP32=cast, PRECISION=precision, **cfg.launch_args(),
            )

        if B > 0:
            tiles = candidates("fwd", T, H, A, x.element_size(), interpret)
            launch_tuned("attention_pool_fwd", _key(x, A), tiles, launch, x.device)
        ctx.save_for_backward(x, mask_u8, w1, b1, w2, b2, scores, lse, out)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        interpret = common.INTERPRET  # read per call: the tests switch the interpreter's tilings off and on
        x, mask_u8, w1, b1, w2, b2, scores, lse, out = ctx.saved_tensors
        B, T, H = x.shape
        A = w1.shape[1]
        block_h = max(16, next_pow2(H))
        dx = torch.empty_like(x)
        dpre = torch.empty(B, T, A, device=x.device, dtype=torch.float32)
        ds = torch.empty(B, T, device=x.device, dtype=torch.float32)
        cast, precision = dot_config(x.dtype)
        dout = dout.contiguous()

        def launch(cfg: TileConfig) -> torch.Tensor:
            ntb = triton.cdiv(T, cfg["BLOCK_T"])
            dw2p = torch.empty(B, ntb, A, device=x.device, dtype=torch.float32)
            _attention_pool_bwd_kernel[(B,)](
                x, mask_u8, w1, b1, w2, scores, lse, out, dout,
                dx, dpre, ds, dw2p, T, H, A, ntb,
                BLOCK_H=block_h, CAST_FP32=cast, PRECISION=precision, **cfg.launch_args(),
            )
            return dw2p

        dw2p = torch.zeros(B, 1, A, device=x.device, dtype=torch.float32)
        if B > 0:
            tiles = candidates("bwd", T, H, A, x.element_size(), interpret)
            dw2p = launch_tuned("attention_pool_bwd", _key(x, A), tiles, launch, x.device)
        dpre2d = dpre.view(B * T, A)
        dw1 = x.view(B * T, H).t().to(torch.float32) @ dpre2d  # [H, A]
        return (
            dx, None, dw1.to(w1.dtype), dpre2d.sum(0).to(b1.dtype),
            dw2p.sum((0, 1)).to(w2.dtype), ds.sum().to(b2.dtype),
        )


def _key(x: torch.Tensor, A: int) -> tuple:
    B, T, H = x.shape
    return (x.dtype, max(16, next_pow2(H)), bucket(B), bucket(T), bucket(A))


def triton_attention_pool(
    x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """Triton attention pooling: [B, T, H] -> [B, H] (see the kernel docstrings for the math)."""
    return AttentionPoolFunction.apply(x, mask, w1, b1, w2, b2)
