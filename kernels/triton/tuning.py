"""Tile configurations of the Triton kernels: a few candidates per kernel, the fastest chosen by timing on CUDA.

Each kernel lists its candidate tilings, the first being the heuristic choice. On CUDA the first call with a
new key times every candidate (one warm-up launch, which compiles, then a few timed launches) and keeps the
fastest for that key; a candidate that fails to compile (too much shared memory, too many registers) is
skipped. The key is the kernel, the input dtype and the sizes bucketed to powers of two, so a training run
whose sizes change every step (the number of unique items in a batch) tunes a handful of times, not every
step. Timing synchronises the device, so it never runs while a CUDA graph is being captured; the heuristic
choice is used then.

Everywhere else the heuristic choice is used, untimed: in the Triton interpreter (CPU tests), or with
``TRANSREC_KERNEL_AUTOTUNE=0``. The kernels' launches only store their outputs (no accumulation into
caller buffers), so launching a candidate more than once changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

ENV_VAR = "TRANSREC_KERNEL_AUTOTUNE"
TIMED_LAUNCHES = 3
# Candidate tilings keep the live tiles of one program (operand tiles, the score tile, a gradient accumulator) under
# this many bytes; above it they spill out of registers (the catalogue cross-entropy's fp32 backward at bf16's
# tiling ran at 0.03x the reference on one H100).
TILE_BYTES = 160 << 10
T = TypeVar("T")


@dataclass(frozen=True)
class TileConfig:
    """Block sizes (the kernel's constexpr arguments) and the number of warps of one launch."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int

    @classmethod
    def of(cls, num_warps: int, **blocks: int) -> TileConfig:
        return cls(tuple(sorted(blocks.items())), num_warps)

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def launch_args(self) -> dict[str, int]:
        return {**dict(self.blocks), "num_warps": self.num_warps}

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.blocks) + f" warps={self.num_warps}"


def bucket(n: int) -> int:
    """n rounded up to a power of two (at least 16): the size part of a tuning key."""
    return 1 << max(4, (max(int(n), 1) - 1).bit_length())


def autotune_enabled() -> bool:
    """Whether CUDA launches time their candidates: on unless $TRANSREC_KERNEL_AUTOTUNE is 0/false/off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def cuda_time(launch: Callable[[TileConfig], object], cfg: TileConfig) -> float:
    """Mean milliseconds of one launch of ``cfg``, after a warm-up launch that compiles it."""
    launch(cfg)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED_LAUNCHES):
        launch(cfg)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / TIMED_LAUNCHES


_chosen: dict[tuple, TileConfig] = {}
_timings: dict[tuple, list[tuple[str, float | str]]] = {}  # per key: (candidate, ms or why it failed)
_forced: dict[str, TileConfig] = {}


def choose(
    kernel: str,
    key: tuple,
    candidates: Sequence[TileConfig],
    launch: Callable[[TileConfig], object],
    device: torch.device,
    *,
    tune: bool | None = None,
    timer: Callable[[Callable[[TileConfig], object], TileConfig], float] = cuda_time,
) -> TileConfig:
    """The tiling to launch ``kernel`` with for this key (see the module docstring).

    ``tune`` None decides by itself (CUDA, not capturing, autotuning enabled, more than one candidate);
    tests pass True with their own ``timer``. A tiling forced by ``forced`` wins over everything."""
    if not candidates:
        raise ValueError(f"{kernel}: no tile configuration to choose from")
    if kernel in _forced:
        return _forced[kernel]
    full_key = (kernel, *key)
    if full_key in _chosen:
        return _chosen[full_key]
    if tune is None:
        tune = (device.type == "cuda" and autotune_enabled() and len(candidates) > 1
                and not torch.cuda.is_current_stream_capturing())
    if not tune:
        return candidates[0]
    results: list[tuple[str, float | str]] = []
    best: tuple[float, TileConfig] | None = None
    for cfg in candidates:
        try:
            ms = float(timer(launch, cfg))
        except Exception as e:  # a tiling the device cannot compile or run is skipped (Triton's OutOfResources)
            results.append((str(cfg), f"{type(e).__name__}: {e}"))
            continue
        results.append((str(cfg), ms))
        if best is None or ms < best[0]:
            best = (ms, cfg)
    _timings[full_key] = results
    if best is None:
        failures = "; ".join(f"{c}: {why}" for c, why in results)
        raise RuntimeError(f"{kernel}: no candidate tiling could be launched for {key} ({failures}); "
                           f"set {ENV_VAR}=0 to launch the heuristic tiling and see its error directly")
    _chosen[full_key] = best[1]
    return best[1]


def launch_tuned(kernel: str, key: tuple, candidates: Sequence[TileConfig], launch: Callable[[TileConfig], T],
                 device: torch.device) -> T:
    """launch(the tiling `choose` picks for this key): what a kernel's host code calls."""
    return launch(choose(kernel, key, candidates, launch, device))


def dot_tile_bytes(rows_a: int, rows_b: int, block_d: int, elem_bytes: int, acc_rows: int) -> int:
    """Live bytes of a program that multiplies a [rows_a, d] tile by a [rows_b, d] tile (inputs in their dtype, the
    [rows_a, rows_b] scores in fp32) into an fp32 accumulator of [acc_rows, d] (0: none)."""
    return (rows_a + rows_b) * block_d * elem_bytes + rows_a * rows_b * 4 + acc_rows * block_d * 4


def timings() -> dict[tuple, list[tuple[str, float | str]]]:
    """What each tuned key measured: for the benches' reports."""
    return dict(_timings)


def clear() -> None:
    """Forget every choice (tests; a bench that wants a fresh tuning)."""
    _chosen.clear()
    _timings.clear()


@contextmanager
def forced(configs: dict[str, TileConfig]) -> Iterator[None]:
    """Launch the named kernels with these tilings inside the block (tests run every candidate this way)."""
    before = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)


def neighbourhood(base: TileConfig, fits: Callable[[TileConfig], bool], halve: Sequence[str] = (),
                  double: Sequence[str] = (), warps: Sequence[int] = (4, 8)) -> list[TileConfig]:
    """``base`` first, then tilings one step away from it (each named block halved or doubled, the other warp
    counts) that ``fits``; no duplicates. Block sizes stay >= 16, what tl.dot needs."""
    out = [base]

    def add(cfg: TileConfig) -> None:
        if cfg not in out and fits(cfg) and all(v >= 16 for _, v in cfg.blocks):
            out.append(cfg)

    blocks = dict(base.blocks)
    for name in halve:
        add(TileConfig.of(base.num_warps, **{**blocks, name: blocks[name] // 2}))
    for name in double:
        add(TileConfig.of(base.num_warps, **{**blocks, name: blocks[name] * 2}))
    for w in warps:
        add(TileConfig.of(w, **blocks))
    return out
