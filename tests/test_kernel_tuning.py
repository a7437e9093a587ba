"""kernels.triton.tuning: which tiling a kernel launches with, and how the CUDA autotuner picks it.

The timing itself needs CUDA (bench/gpu_all.sh runs the kernel tests there); these tests drive the chooser with a
stand-in timer, and tests/test_catalog_cross_entropy.py runs every candidate tiling through the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from transrec.kernels.triton import tuning
from transrec.kernels.triton.tuning import TileConfig

CPU = torch.device("cpu")
A = TileConfig.of(4, BLOCK_M=64, BLOCK_V=64)
B = TileConfig.of(8, BLOCK_M=32, BLOCK_V=64)
C = TileConfig.of(4, BLOCK_M=32, BLOCK_V=32)


@pytest.fixture(autouse=True)
def fresh() -> None:
    tuning.clear()
    yield
    tuning.clear()


def fake_timer(ms: dict[TileConfig, float | Exception], calls: list[TileConfig]):
    def timer(launch, cfg: TileConfig) -> float:
        calls.append(cfg)
        launch(cfg)
        value = ms[cfg]
        if isinstance(value, Exception):
            raise value
        return value

    return timer


def test_tuning_picks_the_fastest_and_remembers_it() -> None:
    calls: list[TileConfig] = []
    launched: list[TileConfig] = []
    timer = fake_timer({A: 3.0, B: 1.5, C: 2.0}, calls)
    got = tuning.choose("k", ("bf16", 64), [A, B, C], launched.append, CPU, tune=True, timer=timer)
    assert got == B and calls == [A, B, C] and launched == [A, B, C]
    assert tuning.choose("k", ("bf16", 64), [A, B, C], launched.append, CPU, tune=True, timer=timer) == B
    assert calls == [A, B, C]  # the second call with the same key times nothing
    assert tuning.timings()[("k", "bf16", 64)] == [(str(A), 3.0), (str(B), 1.5), (str(C), 2.0)]
    # another key is tuned on its own
    timer2 = fake_timer({A: 1.0, B: 5.0, C: 5.0}, calls)
    assert tuning.choose("k", ("bf16", 128), [A, B, C], launched.append, CPU, tune=True, timer=timer2) == A


def test_failing_candidates_are_skipped_and_all_failing_is_an_error() -> None:
    calls: list[TileConfig] = []
    timer = fake_timer({A: RuntimeError("out of resources: shared memory"), B: 4.0, C: 9.0}, calls)
    assert tuning.choose("k", (1,), [A, B, C], lambda c: None, CPU, tune=True, timer=timer) == B
    assert "out of resources" in tuning.timings()[("k", 1)][0][1]
    timer = fake_timer({A: RuntimeError("no"), B: ValueError("nope"), C: RuntimeError("never")}, [])
    with pytest.raises(RuntimeError, match=r"no candidate tiling.*TRANSREC_KERNEL_AUTOTUNE=0"):
        tuning.choose("k", (2,), [A, B, C], lambda c: None, CPU, tune=True, timer=timer)


def test_untuned_launches_take_the_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU (the interpreter), or with autotuning switched off, the first candidate runs untimed."""
    def never(launch, cfg):
        raise AssertionError("timed without tuning")

    assert tuning.choose("k", (1,), [C, A], lambda c: None, CPU, timer=never) == C
    monkeypatch.setenv(tuning.ENV_VAR, "0")
    assert not tuning.autotune_enabled()
    assert tuning.choose("k", (1,), [B, A], lambda c: None, torch.device("cuda"), timer=never) == B
    monkeypatch.setenv(tuning.ENV_VAR, "1")
    assert tuning.autotune_enabled()
    with pytest.raises(ValueError, match="no tile configuration"):
        tuning.choose("k", (1,), [], lambda c: None, CPU)


def test_forced_tiling_wins_inside_the_block_only() -> None:
    never = fake_timer({}, [])
    with tuning.forced({"k": C}):
        assert tuning.choose("k", (1,), [A, B], lambda c: None, CPU, tune=True, timer=never) == C
        assert tuning.choose("other", (1,), [A, B], lambda c: None, CPU) == A
    assert tuning.choose("k", (1,), [A, B], lambda c: None, CPU) == A


def test_every_tiling_runs_each_candidate_in_the_fewest_rounds() -> None:
    from transrec.kernels.testing import every_tiling

    rounds = every_tiling({"fwd": [A, B, C], "bwd": [C]}, "op_")
    assert rounds == [{"op_fwd": A, "op_bwd": C}, {"op_fwd": B, "op_bwd": C}, {"op_fwd": C, "op_bwd": C}]


def test_buckets_and_neighbourhood() -> None:
    assert [tuning.bucket(n) for n in (0, 1, 16, 17, 100, 128, 129, 5000)] == [16, 16, 16, 32, 128, 128, 256, 8192]
    base = TileConfig.of(8, BLOCK_M=32, BLOCK_V=64)
    near = tuning.neighbourhood(base, lambda c: c["BLOCK_V"] <= 64, halve=("BLOCK_M", "BLOCK_V"),
                                double=("BLOCK_V",), warps=(4, 8))
    assert near == [base, TileConfig.of(8, BLOCK_M=16, BLOCK_V=64), TileConfig.of(8, BLOCK_M=32, BLOCK_V=32),
                    TileConfig.of(4, BLOCK_M=32, BLOCK_V=64)]  # BLOCK_V=128 does not fit; warps=8 is the base
    tiny = TileConfig.of(4, BLOCK_M=16, BLOCK_V=16)
    assert tuning.neighbourhood(tiny, lambda c: True, halve=("BLOCK_M",), warps=(4,)) == [tiny]  # never below 16
    assert base.launch_args() == {"BLOCK_M": 32, "BLOCK_V": 64, "num_warps": 8}
    assert str(base) == "BLOCK_M=32 BLOCK_V=64 warps=8"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the tuner times launches with CUDA events")
def test_cuda_tuning_times_every_candidate_and_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue cross-entropy tuned on CUDA (bf16, paper-like d): each kernel's candidates timed (or skipped
    with the reason), the chosen tiling's values and gradients equal the reference's."""
    from transrec.kernels.ops import catalog_cross_entropy
    from transrec.kernels.testing import compare
    from transrec.kernels.triton import triton_catalog_cross_entropy as tce

    monkeypatch.setenv(tuning.ENV_VAR, "1")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 256, generator=g).cuda().bfloat16().requires_grad_()
    w = (torch.randn(4096, 256, generator=g) / 16).cuda().bfloat16().requires_grad_()
    target = torch.randint(0, 4096, (512,), generator=g).cuda()

    def run(impl: str):
        return lambda h, w: catalog_cross_entropy(h, w, None, target, impl=impl)

    compare(run("triton"), run("torch"), [h, w], torch.tensor(1.0, device="cuda", dtype=torch.bfloat16),
            torch.bfloat16, ["h", "weight"])
    timed = {key[0]: results for key, results in tuning.timings().items()}
    for kernel in ("fwd", "bwd_h", "bwd_w"):
        results = timed[f"catalog_ce_{kernel}"]
        assert [c for c, _ in results] == [str(c) for c in tce.candidates(kernel, 256, 2, interpret=False)]
        assert any(isinstance(ms, float) for _, ms in results)
