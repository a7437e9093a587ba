"""cpc_loss: Triton kernels (compiled on CUDA, interpreted on CPU) against the PyTorch reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from transrec.kernels import dispatch
from transrec.kernels import ops as kernels
from transrec.kernels.ops import cpc_loss
from transrec.kernels.pytorch.pt_cpc_loss import pt_cpc_loss
from transrec.kernels.testing import (
    assert_close,
    compare,
    every_tiling,
    gpu_tilings_on,
    sweep,
    sweep_id,
    triton_devices,
)
from transrec.kernels.triton import common, tuning
from transrec.kernels.triton import triton_cpc_loss as tcpc
from transrec.kernels.triton.triton_cpc_loss import triton_cpc_loss

DEVICES = triton_devices()
DTYPES = [torch.float32, torch.bfloat16]
NAMES = ["user", "pos", "neg"]
# (B, l, j_or_N, d); shared negatives use N = j_or_N rows (interpreter tiles: 16 users x 64 items)
SHAPES = [(5, 3, 7, 37), (1, 1, 1, 16), (19, 2, 130, 20)]
if torch.cuda.is_available():
    SHAPES += [(512, 5, 4096, 256), (77, 4, 333, 100)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def make_inputs(
    B: int, L: int, J: int, d: int, shared: bool, dtype: torch.dtype, device: str, seed: int = 0,
    scale: float = 1.0, masks: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(B, d, generator=g) * scale / d**0.25
    pos = torch.randn(B, L, d, generator=g) * scale / d**0.25
    neg = torch.randn(*((J, d) if shared else (B, J, d)), generator=g) * scale / d**0.25
    pm = nm = None
    if masks:
        pm = (torch.rand(B, L, generator=g) > 0.2).to(device)
        nm = (torch.rand(B, J, generator=g) > 0.2).to(device)
    ts = [t.to(device=device, dtype=dtype).requires_grad_() for t in (user, pos, neg)]
    return ts, pm, nm


def fn(impl: str, pm: torch.Tensor | None, nm: torch.Tensor | None, reduction: str = "mean"):
    return lambda u, p, n: cpc_loss(u, p, n, pos_mask=pm, neg_mask=nm, reduction=reduction, impl=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shared", [False, True], ids=["per_user", "shared"])
def test_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...], shared: bool) -> None:
    inputs, pm, nm = make_inputs(*shape, shared=shared, dtype=dtype, device=device)
    grad_out = torch.tensor(1.7, dtype=dtype, device=device)
    compare(fn("triton", pm, nm), fn("torch", pm, nm), inputs, grad_out, dtype, NAMES)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masks", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_user", "shared"])
def test_reductions_and_masks(device: str, reduction: str, masks: bool, shared: bool) -> None:
    inputs, pm, nm = make_inputs(6, 3, 70, 24, shared, torch.float32, device, seed=4, masks=masks)
    grad_out = torch.tensor(-0.6, device=device)
    compare(fn("triton", pm, nm, reduction), fn("torch", pm, nm, reduction), inputs, grad_out, torch.float32, NAMES)


@pytest.mark.parametrize("n_split", [1, 2, 5])
def test_shared_user_grad_splits(device: str, n_split: int) -> None:
    """Splitting N across programs for grad_user (partial sums added on the host) changes nothing."""
    inputs, pm, nm = make_inputs(5, 2, 300, 20, True, torch.float32, device, seed=5)
    grad_out = torch.tensor(1.0, device=device)

    def tri(u: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return triton_cpc_loss(u, p, n, pm, nm, "mean", n_split=n_split)

    compare(tri, fn("torch", pm, nm), inputs, grad_out, torch.float32, NAMES)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_user", "shared"])
def test_nothing_kept_gives_zero(device: str, impl: str, shared: bool) -> None:
    inputs, pm, nm = make_inputs(4, 3, 5, 16, shared, torch.float32, device)
    loss = cpc_loss(*inputs, pos_mask=torch.zeros_like(pm), neg_mask=torch.zeros_like(nm), impl=impl)
    assert loss.item() == 0.0
    for name, g in zip(NAMES, torch.autograd.grad(loss, inputs)):
        assert torch.isfinite(g).all() and not g.any(), name


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_user", "shared"])
def test_negative_equal_to_positive_is_masked_out(device: str, impl: str, shared: bool) -> None:
    """A sampled negative that is the user's positive is masked: no term, no gradient for it."""
    (user, pos, neg), pm, _ = make_inputs(3, 2, 6, 16, shared, torch.float32, device, seed=7)
    pm = torch.ones_like(pm)
    nm = torch.ones(3, 6, dtype=torch.bool, device=device)
    with torch.no_grad():
        if shared:
            neg[4] = pos[1, 0]  # item 4 of the shared pool is user 1's positive
        else:
            neg[1, 4] = pos[1, 0]
    nm[1, 4] = False
    loss = cpc_loss(user, pos, neg, pos_mask=pm, neg_mask=nm, reduction="sum", impl=impl)
    # the same loss by hand with the clashing term left out
    u = user.detach().double()
    s_pos = torch.einsum("bd,bld->bl", u, pos.detach().double())
    s_neg = u @ neg.detach().double().t() if shared else torch.einsum("bd,bjd->bj", u, neg.detach().double())
    terms = torch.cat([torch.nn.functional.logsigmoid(s_pos).flatten(),
                       torch.nn.functional.logsigmoid(-s_neg)[nm].flatten()])
    assert abs(loss.item() + terms.sum().item()) < 1e-4
    g_neg = torch.autograd.grad(loss, neg)[0]
    if shared:  # item 4 still is a negative for users 0 and 2
        assert g_neg[4].abs().sum() > 0
    else:
        assert not g_neg[1, 4].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_user", "shared"])
def test_large_scores_are_stable(device: str, dtype: torch.dtype, shared: bool) -> None:
    """Scores of order +-80: log-sigmoid and its gradient must stay finite and exact."""
    inputs, pm, nm = make_inputs(5, 3, 20, 16, shared, dtype, device, seed=8, scale=4.5)
    s = inputs[0].float() @ inputs[1].float()[:, 0].t()
    assert s.abs().max() > 40
    grad_out = torch.tensor(1.0, dtype=dtype, device=device)
    compare(fn("triton", pm, nm, "sum"), fn("torch", pm, nm, "sum"), inputs, grad_out, dtype, NAMES)


SWEEP = sweep(6, 201, B=(1, 20), L=(1, 6), J=(1, 150), d=(1, 48), shared=(0, 1), bf16=(0, 1),
              seed=(0, 2**16))
if torch.cuda.is_available():
    SWEEP += sweep(2, 202, B=(1, 700), L=(1, 9), J=(1, 5000), d=(1, 400), shared=(1, 1), bf16=(0, 1),
                   seed=(0, 2**16))


@pytest.mark.parametrize("case", SWEEP, ids=sweep_id)
def test_sweep_sizes(case: dict[str, int]) -> None:
    """Seeded random sizes against the reference."""
    B, L, J, d, shared, seed = case["B"], case["L"], case["J"], case["d"], bool(case["shared"]), case["seed"]
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    inputs, pm, nm = make_inputs(B, L, J, d, shared, dtype, DEVICES[0], seed=seed)
    grad_out = torch.tensor(0.9, dtype=dtype, device=DEVICES[0])
    compare(fn("triton", pm, nm), fn("torch", pm, nm), inputs, grad_out, dtype, NAMES)


@pytest.mark.skipif(not dispatch.interpreter_enabled(), reason="CPU run only: the interpreter runs the GPU tiles")
@pytest.mark.parametrize("shared", [False, True], ids=["per_user", "shared"])
def test_gpu_tile_sizes_in_interpreter(monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    """The CUDA tile configuration through the interpreter, in fp32 (bf16 tiles go to tl.dot natively
    on CUDA, which the interpreter cannot run)."""
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: True)
    inputs, pm, nm = make_inputs(40, 3, 100, 37, shared, torch.float32, "cpu", seed=9)
    compare(fn("triton", pm, nm), fn("torch", pm, nm), inputs, torch.tensor(1.1), torch.float32, NAMES)


@pytest.mark.parametrize("d", [37, 300])
def test_every_gpu_tiling(monkeypatch: pytest.MonkeyPatch, d: int) -> None:
    """Each candidate tiling the CUDA autotuner may pick for the shared-negative kernels gives the reference's
    values and gradients (fp32: compiled on CUDA, through the interpreter elsewhere; two N-splits of the user
    gradient)."""
    dev = gpu_tilings_on(monkeypatch)
    block_d = common.next_pow2(max(d, 16))
    tiles = {k: tcpc.shared_candidates(k, block_d, 4, interpret=False) for k in ("fwd", "bwd_user", "bwd_neg")}
    assert min(len(t) for t in tiles.values()) >= 2
    for kernel, ts in tiles.items():
        assert all(tcpc.shared_tile_bytes(kernel, c, block_d, 4) <= tuning.TILE_BYTES for c in ts[1:])
    inputs, pm, nm = make_inputs(40, 3, 100, d, True, torch.float32, dev, seed=10)
    for chosen in every_tiling(tiles, "cpc_shared_"):

        def tri(u: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            with tuning.forced(chosen):
                return triton_cpc_loss(u, p, n, pm, nm, "mean", n_split=2)

        compare(tri, fn("torch", pm, nm), inputs, torch.tensor(0.9, device=dev), torch.float32, NAMES)


# ---- dispatcher -------------------------------------------------------------------------------------


@pytest.fixture
def clean_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    kernels.set_default_impl(None)
    yield
    kernels.set_default_impl(None)


def test_dispatch(clean_default: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    mod = importlib.import_module("transrec.kernels.cpc_loss")
    tmod = importlib.import_module("transrec.kernels.triton.triton_cpc_loss")
    monkeypatch.setattr(mod, "pt_cpc_loss", lambda *a: calls.append("torch") or pt_cpc_loss(*a))
    monkeypatch.setattr(tmod, "triton_cpc_loss", lambda *a: calls.append("triton") or pt_cpc_loss(*a))
    on_cpu, _, _ = make_inputs(2, 2, 3, 16, False, torch.float32, "cpu")
    on_dev, _, _ = make_inputs(2, 2, 3, 16, False, torch.float32, DEVICES[0])  # where Triton can run
    cpc_loss(*on_cpu)  # auto on CPU -> reference
    kernels.set_default_impl("triton")
    cpc_loss(*on_dev)
    kernels.set_default_impl("auto")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # the setter's "auto" still wins over the env
    cpc_loss(*on_cpu)
    kernels.set_default_impl(None)
    cpc_loss(*on_dev)
    cpc_loss(*on_dev, impl="torch")
    assert calls == ["torch", "triton", "torch", "triton", "torch"]


def test_bad_arguments(clean_default: None) -> None:
    inputs, _, nm = make_inputs(2, 2, 3, 16, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        cpc_loss(*inputs, impl="gpu")
    with pytest.raises(ValueError, match="reduction"):
        cpc_loss(*inputs, reduction="none")
    with pytest.raises(ValueError, match="neg_mask"):
        cpc_loss(*inputs, neg_mask=nm[:, :2])


def test_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    inputs, _, _ = make_inputs(2, 2, 3, 16, True, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cpc_loss(*inputs, impl="triton")


def test_reference_value_by_hand() -> None:
    u = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[[2.0, 0.0]]])
    n = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    want = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.sigmoid(torch.tensor(0.0)))
             + torch.log(torch.sigmoid(torch.tensor(1.0)))) / 3
    assert_close(pt_cpc_loss(u, p, n), want, torch.float32, "loss")


def test_auto_is_dtype_aware() -> None:
    """'auto' picks Triton only for CUDA tensors in a dtype where the op's kernel was measured faster (bf16 / fp16
    for the three fused ops), the reference in fp32 and on CPU; an op without measurements runs Triton on CUDA."""
    for op in ("catalog_cross_entropy", "attention_pool", "cpc_loss"):
        assert dispatch.auto_choice(op, on_cuda=True, dtype=torch.bfloat16) == "triton"
        assert dispatch.auto_choice(op, on_cuda=True, dtype=torch.float16) == "triton"
        assert dispatch.auto_choice(op, on_cuda=True, dtype=torch.float32) == "torch"
        assert dispatch.auto_choice(op, on_cuda=False, dtype=torch.bfloat16) == "torch"
    assert dispatch.auto_choice("a_new_op", on_cuda=True, dtype=torch.float32) == "triton"
    cpu = torch.zeros(2, dtype=torch.bfloat16)
    assert dispatch.resolve_impl("auto", cpu, op="cpc_loss") == "torch"
    assert dispatch.resolve_impl("torch", cpu, op="cpc_loss") == "torch"
