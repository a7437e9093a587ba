"""Implementation switch shared by every op in ``kernels``.

Each public op takes ``impl`` in {"auto", "triton", "torch"}:

- "torch": the PyTorch reference (``kernels/pytorch/pt_<op>.py``), runs anywhere;
- "triton": the Triton kernels (``kernels/triton/triton_<op>.py``); needs CUDA tensors, or CPU tensors
  with ``TRITON_INTERPRET=1`` set before the kernel modules are imported (the Triton interpreter);
- "auto": defer to the process-wide default, and if that is "auto" too, pick Triton for CUDA tensors in a
  dtype where that op's kernel was measured faster than the reference (``TRITON_WINS``), and the reference
  otherwise (CPU tensors; fp32 where the kernel loses, e.g. the catalogue cross-entropy's fp32 backward).

The process-wide default comes from ``set_default_impl`` if it was called, else the environment variable
``TRANSREC_KERNELS``, else "auto". One setting flips a whole model between the two implementations.
"""

from __future__ import annotations

import os

import torch

ALLOWED_IMPLS: tuple[str, ...] = ("auto", "triton", "torch")
ENV_VAR = "TRANSREC_KERNELS"

_default_impl: str | None = None  # set by set_default_impl; None = fall back to the environment

# The input dtypes in which each op's Triton kernel beat the PyTorch reference on a GPU (bench/results/
# kernels_gpu.md, one H100: catalogue cross-entropy 2.9x in bf16 but 0.03x in fp32; attention pooling 1.23x in bf16,
# slower in fp32; CPC 1.25x in bf16). "auto" runs the reference in the other dtypes until a kernel is re-measured
# (the catalogue cross-entropy's fp32 tiling and the autotuned tilings have not run on a GPU yet).
TRITON_WINS: dict[str, frozenset[torch.dtype]] = {
    "catalog_cross_entropy": frozenset({torch.bfloat16, torch.float16}),
    "attention_pool": frozenset({torch.bfloat16, torch.float16}),
    "cpc_loss": frozenset({torch.bfloat16, torch.float16}),
}


def _check(impl: object, where: str) -> str:
    if not isinstance(impl, str) or impl not in ALLOWED_IMPLS:
        raise ValueError(f"{where}: impl must be one of {ALLOWED_IMPLS}, got {impl!r}")
    return impl


def set_default_impl(impl: str | None) -> None:
    """Set the process-wide default implementation ("auto" | "triton" | "torch"); None clears it."""
    global _default_impl
    _default_impl = None if impl is None else _check(impl, "set_default_impl")


def get_default_impl() -> str:
    """The process-wide default: set_default_impl's value, else $TRANSREC_KERNELS, else "auto"."""
    if _default_impl is not None:
        return _default_impl
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check(env, f"${ENV_VAR}") if env else "auto"


def interpreter_enabled() -> bool:
    """Whether Triton kernels run through the interpreter (CPU tensors allowed).

    The interpreter is chosen when ``triton.jit`` decorates a kernel, i.e. when the kernel modules are
    imported; once imported, their recorded mode wins over the current environment.
    """
    try:  # importing kernels.triton.common records the mode the kernel modules get
        from transrec.kernels.triton.common import INTERPRET
    except ImportError:  # Triton is missing
        return False
    return INTERPRET


def resolve_impl(impl: str, *tensors: torch.Tensor | None, op: str = "kernels") -> str:
    """Resolve ``impl`` to "triton" or "torch" for these input tensors (None entries are ignored)."""
    impl = _check(impl, op)
    if impl == "auto":
        impl = get_default_impl()
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if impl == "auto":
        return auto_choice(op, on_cuda, present[0].dtype if present else None)
    if impl == "triton" and not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in present})
        raise RuntimeError(
            f"{op}: impl='triton' got tensors on {devices}; Triton kernels need CUDA tensors, or CPU "
            "tensors with TRITON_INTERPRET=1 set in the environment before kernels are imported "
            "(the Triton interpreter). Use impl='torch' or 'auto' for the PyTorch reference."
        )
    return impl


def auto_choice(op: str, on_cuda: bool, dtype: torch.dtype | None) -> str:
    """What "auto" runs: Triton for CUDA tensors in a dtype where the op's kernel wins (TRITON_WINS; an op not
    listed wins in every dtype), the PyTorch reference otherwise."""
    if not on_cuda:
        return "torch"
    wins = TRITON_WINS.get(op)
    return "triton" if wins is None or dtype in wins else "torch"
