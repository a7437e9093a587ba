"""Helpers shared by the kernel tests: devices, per-dtype tolerances, value-and-gradient comparison."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from transrec.kernels import dispatch

# (atol, rtol) per dtype; atol is scaled by the reference tensor's largest magnitude (at least 1).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
}


def triton_devices() -> list[str]:
    """Where the Triton kernels are tested: CUDA (compiled) when present, else CPU (interpreter)."""
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def gpu_tilings_on(monkeypatch) -> str:
    """The device a test of the CUDA tile configurations runs on: CUDA (compiled) when present; else the CPU,
    through the interpreter with the CUDA tilings switched on (``monkeypatch``: pytest's, undone after the test).
    fp32 only on the CPU: the interpreter cannot run bf16 tiles through tl.dot."""
    if torch.cuda.is_available():
        return "cuda"
    from transrec.kernels.triton import common

    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: True)
    return "cpu"


def every_tiling(tiles: dict[str, list], prefix: str) -> list[dict]:
    """Tilings to force (kernels.triton.tuning.forced), one set per round, so that every candidate of every kernel
    (``tiles``: kernel suffix -> its candidates, named ``prefix + suffix``) runs at least once in as few rounds as
    the longest list."""
    rounds = max(len(t) for t in tiles.values())
    return [{prefix + k: t[i % len(t)] for k, t in tiles.items()} for i in range(rounds)]


def describe_devices() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, compiled Triton)"
    return "cpu (Triton interpreter, TRITON_INTERPRET=1)"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    expected = expected.detach().float()
    actual = actual.detach().float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


def value_and_grads(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor
) -> list[torch.Tensor]:
    """[fn(*inputs), d<fn, grad_out>/d input for every input that requires grad]."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=False)
    return [out.detach(), *grads]


def _labels(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> list[str]:
    """Names of value_and_grads' results: the output, then the gradient of each input that requires grad."""
    return ["out", *(f"grad_{n}" for n, t in zip(names, inputs) if t.requires_grad)]


def compare(
    fn_test: Callable[..., torch.Tensor],
    fn_ref: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    dtype: torch.dtype,
    names: Sequence[str],
) -> None:
    """Output and every gradient of fn_test match fn_ref for the same inputs and upstream gradient."""
    got = value_and_grads(fn_test, inputs, grad_out)
    want = value_and_grads(fn_ref, inputs, grad_out)
    labels = _labels(names, inputs)
    assert len(got) == len(want) == len(labels)
    for label, g, w in zip(labels, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{label}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        assert_close(g, w, dtype, label)


def sweep(n: int, rng_seed: int, /, **ranges: tuple[int, int]) -> list[dict[str, int]]:
    """n seeded random size sets, each value uniform in its inclusive (low, high) range."""
    rng = random.Random(rng_seed)
    return [{k: rng.randint(lo, hi) for k, (lo, hi) in ranges.items()} for _ in range(n)]


def sweep_id(case: dict[str, int]) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items())


def compare_against_exact(
    fn_test: Callable[..., torch.Tensor],
    fn_ref: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    names: Sequence[str],
    slack: float = 4.0,
) -> None:
    """For ill-conditioned fp32 inputs: fn_test's error against the fp64 ground truth (fn_ref on fp64 copies of the
    inputs) must stay within ``slack`` times the fp32 reference's own error (or the fp32 tolerance).

    Two fp32 computations that sum in different orders can both sit far from the exact value; comparing them
    to each other would then blame the kernel for the reference's rounding."""
    exact_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    exact = value_and_grads(fn_ref, exact_inputs, grad_out.double())
    got = value_and_grads(fn_test, inputs, grad_out)
    ref = value_and_grads(fn_ref, inputs, grad_out)
    labels = _labels(names, inputs)
    atol, _ = TOLERANCES[torch.float32]
    for label, g, r, e in zip(labels, got, ref, exact):
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        err_test = (g.double() - e).abs().max().item() if e.numel() else 0.0
        err_ref = (r.double() - e).abs().max().item() if e.numel() else 0.0
        bound = max(slack * err_ref, atol * scale)
        assert err_test <= bound, (f"{label}: max error {err_test:.3g} against fp64, bound {bound:.3g} "
                                   f"(fp32 reference error {err_ref:.3g}, scale {scale:.3g})")
