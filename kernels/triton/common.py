"""Host and device helpers shared by the Triton kernels.

Matmul tiles: fp32 inputs use ``input_precision="ieee"`` (no TF32 rounding, so results match the fp32
reference); bf16/fp16 inputs use the tensor cores natively with fp32 accumulation. In the interpreter
every tile is cast to fp32 before ``tl.dot`` (bf16 ``tl.dot`` returns garbage there); bf16 values are
exact in fp32, so this changes nothing but speed.
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

# Triton decides at ``@triton.jit`` time (module import) whether kernels run in the interpreter.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_config(dtype: torch.dtype) -> tuple[bool, str]:
    """(cast tiles to fp32 before tl.dot, input_precision) for inputs of ``dtype``."""
    if dtype == torch.float32:
        return True, "ieee"
    return INTERPRET, "tf32"  # "tf32" is ignored for bf16/fp16 operands; for cast bf16 it is exact


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def mm(a, b, acc, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (a: [M, K], b: [K, N]); see the module docstring.

    Without CAST_FP32, ``a`` (often an fp32 coefficient tile) is cast to ``b``'s dtype (the input's),
    so bf16 inputs run on the tensor cores.
    """
    if CAST_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    else:
        a = a.to(b.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tanh(x):
    """tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}), overflow-free for any x."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def log_sigmoid(x):
    """log sigmoid(x) = min(x, 0) - log(1 + e^{-|x|}), stable for any x."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))
