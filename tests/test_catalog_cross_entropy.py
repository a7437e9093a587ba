"""catalog_cross_entropy: Triton kernels and the chunked reference against F.cross_entropy."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from transrec.kernels import dispatch
from transrec.kernels import ops as kernels
from transrec.kernels.ops import catalog_cross_entropy
from transrec.kernels.pytorch.pt_catalog_cross_entropy import (
    pt_catalog_cross_entropy,
    pt_catalog_cross_entropy_chunked,
)
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
from transrec.kernels.triton import triton_catalog_cross_entropy as tce
from transrec.kernels.triton.triton_catalog_cross_entropy import triton_catalog_cross_entropy

DEVICES = triton_devices()
DTYPES = [torch.float32, torch.bfloat16]
# (M, V, d): odd sizes, tiny, several interpreter tiles (32 rows x 128 items)
SHAPES = [(37, 1000, 45), (5, 123, 16), (70, 300, 8)]
if torch.cuda.is_available():
    SHAPES += [(4096, 32768, 256), (1000, 50001, 100)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def make_inputs(
    M: int, V: int, d: int, dtype: torch.dtype, device: str, bias: bool = True, seed: int = 0,
    scale: float = 1.0, ignore_index: int = -100,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, d, generator=g) * scale
    w = torch.randn(V, d, generator=g) / d**0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    target = torch.randint(0, V, (M,), generator=g)
    target[torch.rand(M, generator=g) < 0.15] = ignore_index
    ts = [t.to(device=device, dtype=dtype).requires_grad_() for t in (h, w)]
    b = None if b is None else b.to(device=device, dtype=dtype).requires_grad_()
    return ts, b, target.to(device)


def fn(impl: str, target: torch.Tensor, reduction: str = "mean", relu: bool = False, has_bias: bool = True,
       ignore_index: int = -100):
    def call(h: torch.Tensor, w: torch.Tensor, *b: torch.Tensor) -> torch.Tensor:
        bias = b[0] if has_bias else None
        return catalog_cross_entropy(h, w, bias, target, ignore_index=ignore_index, reduction=reduction,
                                     relu=relu, impl=impl)

    return call


def upstream(reduction: str, M: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return (torch.randn(M, generator=g) if reduction == "none" else torch.tensor(1.3)).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    (h, w), b, target = make_inputs(*shape, dtype=dtype, device=device)
    compare(fn("triton", target), fn("torch", target), [h, w, b], upstream("mean", shape[0], dtype, device),
            dtype, ["h", "weight", "bias"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_options(device: str, reduction: str, relu: bool, has_bias: bool) -> None:
    (h, w), b, target = make_inputs(37, 300, 20, torch.float32, device, bias=has_bias, seed=2)
    inputs = [h, w] + ([b] if has_bias else [])
    compare(fn("triton", target, reduction, relu, has_bias), fn("torch", target, reduction, relu, has_bias),
            inputs, upstream(reduction, 37, torch.float32, device), torch.float32, ["h", "weight", "bias"])


def test_spec_is_f_cross_entropy() -> None:
    (h, w), b, target = make_inputs(9, 50, 8, torch.float32, "cpu")
    want = F.cross_entropy(h @ w.t() + b, target, reduction="none")
    torch.testing.assert_close(pt_catalog_cross_entropy(h, w, b, target, reduction="none"), want)


@pytest.mark.parametrize("n_split", [1, 2, 3])
def test_v_splits(device: str, n_split: int) -> None:
    """Splitting V across programs (partial log-sum-exps combined on the host) and M across the weight gradient's
    programs (fp32 partial sums) changes nothing."""
    (h, w), b, target = make_inputs(70, 1000, 20, torch.float32, device, seed=3)

    def tri(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return triton_catalog_cross_entropy(h, w, b, target, n_split=n_split, w_split=n_split)

    compare(tri, fn("torch", target), [h, w, b], upstream("mean", 70, torch.float32, device), torch.float32,
            ["h", "weight", "bias"])


def test_weight_gradient_splits_in_bf16(device: str) -> None:
    """With several M-splits the weight gradient sums fp32 partials and is cast once: bf16 within bf16 tolerance."""
    (h, w), b, target = make_inputs(70, 300, 24, torch.bfloat16, device, seed=31)

    def tri(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return triton_catalog_cross_entropy(h, w, b, target, w_split=3)

    compare(tri, fn("torch", target), [h, w, b], upstream("mean", 70, torch.bfloat16, device), torch.bfloat16,
            ["h", "weight", "bias"])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_large_logits_are_stable(device: str, impl: str) -> None:
    """Logits of order 1e3: the online log-sum-exp must not overflow."""
    (h, w), b, target = make_inputs(20, 300, 16, torch.float32, device, seed=4, scale=400.0)
    assert (h @ w.t()).abs().max() > 1000
    compare(fn(impl, target, "none"), pt_ref(target, "none"), [h, w, b], upstream("none", 20, torch.float32, device),
            torch.float32, ["h", "weight", "bias"])


def pt_ref(target: torch.Tensor, reduction: str):
    """The specification computed in float64 (for stability checks with huge logits)."""
    def call(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = h.double() @ w.double().t() + b.double()
        return F.cross_entropy(z, target, reduction=reduction).to(h.dtype)

    return call


def test_frozen_inputs(device: str) -> None:
    """Only the inputs that require grad get one (e.g. a frozen catalogue or fixed hidden states)."""
    (h, w), b, target = make_inputs(20, 300, 16, torch.float32, device, seed=12)
    h.requires_grad_(False)
    b.requires_grad_(False)
    got = torch.autograd.grad(fn("triton", target)(h, w, b), [w])[0]
    want = torch.autograd.grad(fn("torch", target)(h, w, b), [w])[0]
    assert_close(got, want, torch.float32, "grad_weight")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_custom_ignore_index_and_all_ignored(device: str, impl: str) -> None:
    (h, w), b, target = make_inputs(12, 40, 16, torch.float32, device, ignore_index=7, seed=5)
    compare(fn(impl, target, "mean", ignore_index=7), fn("torch", target, "mean", ignore_index=7),
            [h, w, b], upstream("mean", 12, torch.float32, device), torch.float32, ["h", "weight", "bias"])
    everything_ignored = torch.full_like(target, -100)
    loss = catalog_cross_entropy(h, w, b, everything_ignored, reduction="sum", impl=impl)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, [h, w, b]):
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_reference(relu: bool, reduction: str, dtype: torch.dtype) -> None:
    (h, w), b, target = make_inputs(37, 1000, 45, dtype, "cpu", seed=6)

    def chunked(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pt_catalog_cross_entropy_chunked(h, w, b, target, reduction=reduction, relu=relu, chunk_size=300)

    def spec(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pt_catalog_cross_entropy(h, w, b, target, reduction=reduction, relu=relu)

    compare(chunked, spec, [h, w, b], upstream(reduction, 37, dtype, "cpu"), dtype, ["h", "weight", "bias"])


# ---- exclusions (a sampled softmax's accidental hits) --------------------------------------------------


def make_exclude(target: torch.Tensor, V: int, E: int, seed: int) -> torch.Tensor:
    """[M, E] columns to exclude: random columns, -1 padding, duplicates, and each row's own target once."""
    g = torch.Generator().manual_seed(seed)
    M = target.shape[0]
    excl = torch.randint(0, V, (M, E), generator=g)
    excl[torch.rand(M, E, generator=g) < 0.3] = -1
    if E >= 2:
        excl[:, 0] = target.cpu().clamp(min=0)  # the target is listed: it must still count as the positive
        excl[:, 1] = excl[:, -1]  # a duplicate
    return excl.to(target.device)


def fn_excl(impl: str, target: torch.Tensor, exclude: torch.Tensor, reduction: str = "mean", relu: bool = False):
    def call(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return catalog_cross_entropy(h, w, b, target, reduction=reduction, relu=relu, exclude=exclude, impl=impl)

    return call


def test_exclusion_spec() -> None:
    """Excluded columns leave the row's softmax (same as deleting them from the catalogue); the target never does."""
    (h, w), b, target = make_inputs(6, 40, 8, torch.float32, "cpu", seed=21)
    target = target.clamp(min=0)
    exclude = make_exclude(target, 40, 5, seed=3)
    got = pt_catalog_cross_entropy(h, w, b, target, reduction="none", exclude=exclude)
    for m in range(6):
        dropped = {int(c) for c in exclude[m] if c >= 0 and c != target[m]}
        keep = torch.tensor([v for v in range(40) if v not in dropped])
        z = h[m] @ w[keep].t() + b[keep]
        want = torch.logsumexp(z, 0) - z[(keep == target[m]).nonzero()[0, 0]]
        torch.testing.assert_close(got[m], want)
    assert (exclude == target[:, None]).any(1).all()  # every row listed its target, which still counted


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 300, 20), (5, 123, 16), (40, 7, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_exclusions_match_reference(device: str, dtype: torch.dtype, shape: tuple[int, int, int], relu: bool) -> None:
    M, V, d = shape
    (h, w), b, target = make_inputs(M, V, d, dtype, device, seed=22)
    exclude = make_exclude(target, V, 6, seed=4)
    compare(fn_excl("triton", target, exclude, relu=relu), fn_excl("torch", target, exclude, relu=relu),
            [h, w, b], upstream("mean", M, dtype, device), dtype, ["h", "weight", "bias"])


def test_exclusions_whole_tile(device: str) -> None:
    """Rows whose excluded columns fill whole tiles (and a V-split) keep a finite loss and gradients."""
    M, V = 8, 300
    (h, w), b, target = make_inputs(M, V, 16, torch.float32, device, seed=23)
    target = torch.full_like(target, V - 1)
    exclude = torch.arange(V - 1, device=device).repeat(M, 1)  # everything but the target
    exclude[::2, 150:] = -1
    for n_split in (1, 3):
        def tri(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return triton_catalog_cross_entropy(h, w, b, target, exclude=exclude, n_split=n_split)

        compare(tri, fn_excl("torch", target, exclude), [h, w, b], upstream("mean", M, torch.float32, device),
                torch.float32, ["h", "weight", "bias"])


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_chunked_reference_exclusions(relu: bool) -> None:
    (h, w), b, target = make_inputs(37, 1000, 45, torch.float32, "cpu", seed=24)
    exclude = make_exclude(target, 1000, 9, seed=5)

    def chunked(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pt_catalog_cross_entropy_chunked(h, w, b, target, relu=relu, exclude=exclude, chunk_size=300)

    compare(chunked, fn_excl("torch", target, exclude, relu=relu), [h, w, b],
            upstream("mean", 37, torch.float32, "cpu"), torch.float32, ["h", "weight", "bias"])


SWEEP = sweep(6, 301, M=(1, 40), V=(1, 400), d=(1, 40), bf16=(0, 1), relu=(0, 1), seed=(0, 2**16))
if torch.cuda.is_available():
    SWEEP += sweep(2, 302, M=(1, 3000), V=(1, 70000), d=(1, 300), bf16=(0, 1), relu=(0, 1), seed=(0, 2**16))


@pytest.mark.parametrize("case", SWEEP, ids=sweep_id)
def test_sweep_sizes(case: dict[str, int]) -> None:
    """Seeded random sizes against the reference."""
    M, V, d, relu, seed = case["M"], case["V"], case["d"], bool(case["relu"]), case["seed"]
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    (h, w), b, target = make_inputs(M, V, d, dtype, DEVICES[0], seed=seed)
    compare(fn("triton", target, "sum", relu), fn("torch", target, "sum", relu), [h, w, b],
            upstream("sum", M, dtype, DEVICES[0]), dtype, ["h", "weight", "bias"])


@pytest.mark.skipif(not dispatch.interpreter_enabled(), reason="CPU run only: the interpreter runs the GPU tiles")
@pytest.mark.parametrize("d", [45, 200])
def test_gpu_tile_sizes_in_interpreter(monkeypatch: pytest.MonkeyPatch, d: int) -> None:
    """The CUDA tile configuration through the interpreter, in fp32 (bf16 tiles go to tl.dot natively
    on CUDA, which the interpreter cannot run)."""
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: True)
    (h, w), b, target = make_inputs(70, 300, d, torch.float32, "cpu", seed=9)
    compare(fn("triton", target, relu=True), fn("torch", target, relu=True), [h, w, b],
            upstream("mean", 70, torch.float32, "cpu"), torch.float32, ["h", "weight", "bias"])


@pytest.mark.parametrize("d", [45, 200])
def test_every_gpu_tiling(monkeypatch: pytest.MonkeyPatch, d: int) -> None:
    """Each candidate tiling the CUDA autotuner may pick, for every kernel, gives the reference's values and
    gradients (fp32: compiled on CUDA, through the interpreter elsewhere; with exclusions and two V- and M-splits
    to cross tile edges)."""
    dev = gpu_tilings_on(monkeypatch)
    block_d = common.next_pow2(max(d, 16))
    tiles = {k: tce.candidates(k, block_d, 4, interpret=False) for k in ("fwd", "bwd_h", "bwd_w")}
    assert min(len(t) for t in tiles.values()) >= 3
    (h, w), b, target = make_inputs(70, 300, d, torch.float32, dev, seed=9)
    exclude = make_exclude(target, 300, 4, seed=6)
    for chosen in every_tiling(tiles, "catalog_ce_"):

        def tri(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            with tuning.forced(chosen):
                return triton_catalog_cross_entropy(h, w, b, target, exclude=exclude, n_split=2, w_split=2)

        compare(tri, fn_excl("torch", target, exclude), [h, w, b], upstream("mean", 70, torch.float32, dev),
                torch.float32, ["h", "weight", "bias"])


@pytest.mark.parametrize("d", [16, 64, 128, 256, 512, 1024])
def test_heuristic_tiles_fit_in_registers(d: int) -> None:
    """Up to d = 512 the untimed tiling's live tiles stay under the budget in fp32 as in bf16 (fp32 at bf16's
    tiling was the 0.03x backward); wider rows get the smallest tiles tl.dot takes. fp32 gets smaller tiles than
    bf16 wherever the tiles are above the minimum."""
    for elem in (2, 4):
        cfg = tce.heuristic_tiles(d, elem, interpret=False)
        if d > 512:
            assert (cfg["BLOCK_M"], cfg["BLOCK_V"]) == (16, 16)
            continue
        for kernel in ("fwd", "bwd_h", "bwd_w"):
            assert tce.tile_bytes(kernel, cfg, d, elem) <= tce.TILE_BYTES, (kernel, d, elem, str(cfg))
    bf16, fp32 = tce.heuristic_tiles(d, 2, False), tce.heuristic_tiles(d, 4, False)
    assert fp32["BLOCK_M"] == max(16, bf16["BLOCK_M"] // 2) and fp32["BLOCK_V"] == max(16, bf16["BLOCK_V"] // 2)
    assert tce.tile_bytes("bwd_h", tce.TileConfig.of(8, BLOCK_M=64, BLOCK_V=64), 256, 4) > tce.TILE_BYTES


# ---- dispatcher -------------------------------------------------------------------------------------


@pytest.fixture
def clean_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    kernels.set_default_impl(None)
    yield
    kernels.set_default_impl(None)


def test_dispatch_and_chunked_switch(clean_default: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    mod = importlib.import_module("transrec.kernels.catalog_cross_entropy")
    tmod = importlib.import_module("transrec.kernels.triton.triton_catalog_cross_entropy")
    monkeypatch.setattr(mod, "pt_catalog_cross_entropy",
                        lambda *a: calls.append("spec") or pt_catalog_cross_entropy(*a))
    monkeypatch.setattr(mod, "pt_catalog_cross_entropy_chunked",
                        lambda *a: calls.append("chunked") or pt_catalog_cross_entropy(*a))
    monkeypatch.setattr(tmod, "triton_catalog_cross_entropy",
                        lambda *a, **k: calls.append("triton") or pt_catalog_cross_entropy(*a, **k))
    (h, w), b, target = make_inputs(8, 30, 8, torch.float32, "cpu")
    catalog_cross_entropy(h, w, b, target)
    monkeypatch.setattr(mod, "CHUNKED_MIN_LOGITS", 100)  # 8 x 30 logits: now "large"
    catalog_cross_entropy(h, w, b, target)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    (h, w), b, target = make_inputs(8, 30, 8, torch.float32, DEVICES[0])  # where Triton can run
    catalog_cross_entropy(h, w, b, target)
    assert calls == ["spec", "chunked", "triton"]


def test_bad_arguments(clean_default: None, monkeypatch: pytest.MonkeyPatch) -> None:
    (h, w), b, target = make_inputs(8, 30, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        catalog_cross_entropy(h, w, b, target, impl="Triton")
    with pytest.raises(ValueError, match="reduction"):
        catalog_cross_entropy(h, w, b, target, reduction="avg")
    with pytest.raises(ValueError, match="int64"):
        catalog_cross_entropy(h, w, b, target.int())
    with pytest.raises(ValueError, match="exclude must be int64"):
        catalog_cross_entropy(h, w, b, target, exclude=target[:, None].int())
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        catalog_cross_entropy(h, w, b, target, impl="triton")
