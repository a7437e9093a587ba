"""attention_pool: Triton kernels (compiled on CUDA, interpreted on CPU) against the PyTorch reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from transrec.kernels import dispatch
from transrec.kernels import ops as kernels
from transrec.kernels.ops import attention_pool
from transrec.kernels.pytorch.pt_attention_pool import pt_attention_pool
from transrec.kernels.testing import (
    assert_close,
    compare,
    compare_against_exact,
    every_tiling,
    gpu_tilings_on,
    sweep,
    sweep_id,
    triton_devices,
)
from transrec.kernels.triton import common, tuning
from transrec.kernels.triton import triton_attention_pool as tap

DEVICES = triton_devices()
DTYPES = [torch.float32, torch.bfloat16]
NAMES = ["x", "w1", "b1", "w2", "b2"]
# (B, T, H, A): odd sizes, a single token, several T tiles (interpreter BLOCK_T = 64)
SHAPES = [(5, 37, 123, 20), (2, 1, 16, 16), (3, 70, 40, 33)]
if torch.cuda.is_available():
    SHAPES += [(64, 50, 768, 256), (33, 32, 300, 130)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def make_inputs(
    B: int, T: int, H: int, A: int, dtype: torch.dtype, device: str, seed: int = 0, score_scale: float = 1.0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    w1 = torch.randn(H, A, generator=g) / H**0.5
    b1 = torch.randn(A, generator=g) * 0.1
    w2 = torch.randn(A, generator=g) * score_scale / A**0.5
    b2 = torch.tensor(0.25)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    if B > 1:
        mask[1] = False  # a fully padded row
    if B > 2:
        mask[2] = False
        mask[2, -1] = True  # a single real token, at the end
    ts = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
    return ts, mask.to(device)


def run(impl: str, mask: torch.Tensor):
    return lambda x, w1, b1, w2, b2: attention_pool(x, mask, w1, b1, w2, b2, impl=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    inputs, mask = make_inputs(*shape, dtype=dtype, device=device)
    grad_out = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    compare(run("triton", mask), run("torch", mask), inputs, grad_out, dtype, NAMES)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fully_padded_rows_give_zeros(device: str, impl: str) -> None:
    inputs, mask = make_inputs(4, 9, 24, 16, torch.float32, device)
    mask[:] = False
    out = attention_pool(inputs[0], mask, *inputs[1:], impl=impl)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out), allow_unused=True)
    for name, g in zip(NAMES, grads):
        assert g is None or (torch.isfinite(g).all() and not g.any()), name


def test_padded_rows_do_not_leak(device: str) -> None:
    """Values at padded positions change neither the output nor the other rows' gradients."""
    inputs, mask = make_inputs(5, 37, 123, 20, torch.float32, device)
    x2 = inputs[0].detach().clone()
    x2[~mask] = 1e4
    a = attention_pool(inputs[0], mask, *inputs[1:], impl="triton")
    b = attention_pool(x2, mask, *inputs[1:], impl="triton")
    assert_close(b, a, torch.float32, "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_scores_are_stable(device: str, dtype: torch.dtype) -> None:
    """Scores around +-80 (w2 large): the online softmax must neither overflow nor lose the row."""
    inputs, mask = make_inputs(5, 37, 64, 16, dtype, device, seed=3, score_scale=80.0)
    s = torch.tanh(inputs[0].float() @ inputs[1].float() + inputs[2].float()) @ inputs[3].float()
    assert s.abs().max() > 40
    grad_out = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    if dtype == torch.float32:  # ill-conditioned: judge both fp32 results against the fp64 ground truth
        compare_against_exact(run("triton", mask), run("torch", mask), inputs, grad_out, NAMES)
    else:
        compare(run("triton", mask), run("torch", mask), inputs, grad_out, dtype, NAMES)


def test_exact_comparison_catches_a_wrong_gradient() -> None:
    """The fp64 check is not vacuous: a kernel whose gradient is off by 1e-3 fails it."""
    inputs, mask = make_inputs(5, 37, 64, 16, torch.float32, "cpu", seed=3, score_scale=80.0)
    grad_out = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))

    class Skewed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g * (1 + 1e-3)

    def skewed(x, w1, b1, w2, b2):
        return attention_pool(Skewed.apply(x), mask, w1, b1, w2, b2, impl="torch")

    with pytest.raises(AssertionError, match="grad_x"):
        compare_against_exact(skewed, run("torch", mask), inputs, grad_out, NAMES)


SWEEP = sweep(6, 101, B=(1, 4), T=(1, 40), H=(1, 70), A=(1, 40), bf16=(0, 1), seed=(0, 2**16))
if torch.cuda.is_available():
    SWEEP += sweep(2, 102, B=(1, 300), T=(1, 80), H=(1, 1000), A=(1, 300), bf16=(0, 1), seed=(0, 2**16))


@pytest.mark.parametrize("case", SWEEP, ids=sweep_id)
def test_sweep_sizes(case: dict[str, int]) -> None:
    """Seeded random sizes (odd, tiny, single-token) against the reference."""
    B, T, H, A, seed = case["B"], case["T"], case["H"], case["A"], case["seed"]
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    inputs, mask = make_inputs(B, T, H, A, dtype, DEVICES[0], seed=seed)
    grad_out = torch.randn(B, H, generator=torch.Generator().manual_seed(seed)).to(DEVICES[0], dtype)
    compare(run("triton", mask), run("torch", mask), inputs, grad_out, dtype, NAMES)


@pytest.mark.skipif(not dispatch.interpreter_enabled(), reason="CPU run only: the interpreter runs the GPU tiles")
def test_gpu_tile_sizes_in_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA tile configuration (BLOCK_T=16, A in chunks) through the interpreter, in fp32 (bf16 tiles
    go to tl.dot natively on CUDA, which the interpreter cannot run)."""
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: True)
    inputs, mask = make_inputs(3, 37, 40, 40, torch.float32, "cpu", seed=9)
    grad_out = torch.randn(3, 40, generator=torch.Generator().manual_seed(9))
    compare(run("triton", mask), run("torch", mask), inputs, grad_out, torch.float32, NAMES)


def test_every_gpu_tiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate tiling the CUDA autotuner may pick (T-blocks, A-chunks, warps), forward and backward, gives
    the reference's values and gradients (fp32: compiled on CUDA, through the interpreter elsewhere; T and A cross
    tile edges)."""
    dev = gpu_tilings_on(monkeypatch)
    B, T, H, A = 3, 37, 40, 70
    tiles = {k: tap.candidates(k, T, H, A, 4, interpret=False) for k in ("fwd", "bwd")}
    assert min(len(t) for t in tiles.values()) >= 3
    inputs, mask = make_inputs(B, T, H, A, torch.float32, dev, seed=12)
    grad_out = torch.randn(B, H, generator=torch.Generator().manual_seed(12)).to(dev)
    for chosen in every_tiling(tiles, "attention_pool_"):

        def tri(*args: torch.Tensor) -> torch.Tensor:
            with tuning.forced(chosen):
                return run("triton", mask)(*args)

        compare(tri, run("torch", mask), inputs, grad_out, torch.float32, NAMES)


# ---- dispatcher -------------------------------------------------------------------------------------


@pytest.fixture
def clean_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    kernels.set_default_impl(None)
    yield
    kernels.set_default_impl(None)


def _spy(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    mod = importlib.import_module("transrec.kernels.attention_pool")  # the module, not the re-exported function
    tmod = importlib.import_module("transrec.kernels.triton.triton_attention_pool")

    def ref(*a: torch.Tensor) -> torch.Tensor:
        calls.append("torch")
        return pt_attention_pool(*a)

    def tri(*a: torch.Tensor) -> torch.Tensor:
        calls.append("triton")
        return pt_attention_pool(*a)

    monkeypatch.setattr(mod, "pt_attention_pool", ref)
    monkeypatch.setattr(tmod, "triton_attention_pool", tri)


def test_auto_picks_by_device(clean_default: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _spy(monkeypatch, calls)
    inputs, mask = make_inputs(2, 3, 16, 16, torch.float32, "cpu")
    attention_pool(inputs[0], mask, *inputs[1:])
    assert calls == ["torch"]
    assert kernels.get_default_impl() == "auto"
    if torch.cuda.is_available():
        inputs, mask = make_inputs(2, 3, 16, 16, torch.float32, "cuda")
        attention_pool(inputs[0], mask, *inputs[1:])
        assert calls == ["torch", "triton"]


def test_env_and_setter_force_impl(clean_default: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _spy(monkeypatch, calls)
    inputs, mask = make_inputs(2, 3, 16, 16, torch.float32, DEVICES[0])
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert kernels.get_default_impl() == "triton"
    attention_pool(inputs[0], mask, *inputs[1:])
    kernels.set_default_impl("torch")  # the setter wins over the environment
    attention_pool(inputs[0], mask, *inputs[1:])
    attention_pool(inputs[0], mask, *inputs[1:], impl="triton")  # an explicit impl wins over both
    assert calls == ["triton", "torch", "triton"]


def test_bad_impl_values(clean_default: None, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, mask = make_inputs(2, 3, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="auto"):
        attention_pool(inputs[0], mask, *inputs[1:], impl="cuda")
    with pytest.raises(ValueError, match="triton"):
        kernels.set_default_impl("fast")
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="TRANSREC_KERNELS"):
        attention_pool(inputs[0], mask, *inputs[1:])


def test_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    inputs, mask = make_inputs(2, 3, 16, 16, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention_pool(inputs[0], mask, *inputs[1:], impl="triton")


def test_bad_shapes() -> None:
    inputs, mask = make_inputs(2, 3, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="mask"):
        attention_pool(inputs[0], mask[:, :2], *inputs[1:])
