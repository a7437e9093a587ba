"""torch.compile of the modules every training step runs (config `model.compile`), in place and reversible.

    model.compile = none | user_encoder | towers | all
    model.compile_mode = default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    model.compile_backend = inductor | aot_eager | ...   (torch.compile's backend)

What is compiled: the user encoder's `forward`, and each tower's `upper` (its trainable blocks, pooling and
projection: what runs every step; the frozen `lower` blocks run once, in the feature cache). The compiled function
replaces the bound method on the instance, so parameter names, checkpoints, exports and the optimizer's groups are
unchanged, and `set_compiled(model, "none")` restores the eager methods.

Shapes. The number of unique items of a step (rows of each tower's input) changes from step to step, and so does the
last batch of an epoch. Padding them to a few bucket sizes would keep shapes static, but it would change values: an
image tower's trainable blocks run BatchNorm on batch statistics, which padded rows would enter. The item and batch
dimensions are compiled as dynamic instead (`dynamic=True`): one graph serves every count, so recompilation stays
bounded without padding (tests/test_speed_levers.py counts the graphs over varying counts). CUDA graphs
(`reduce-overhead`) then record one graph per distinct shape; they pay where shapes repeat (the user encoder's
[micro batch, window]).

ZeRO-3 gathers and releases parameters in module hooks, which a compiled region would have to trace: refused here
with what to do (ZeRO-0/1/2 are fine).
"""

from __future__ import annotations

import torch
from torch import nn

PARTS = ("none", "user_encoder", "towers", "all")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _targets(model: nn.Module, parts: str) -> list[tuple[nn.Module, str]]:
    """(module, method name) pairs that `parts` compiles."""
    out = []
    if parts in ("user_encoder", "all"):
        out.append((model.user_encoder, "forward"))
    if parts in ("towers", "all"):
        out += [(tower, "upper") for tower in model.towers.values()]
    return out


def set_compiled(model: nn.Module, parts: str, mode: str = "default", backend: str = "inductor",
                 zero_stage: int = 0) -> list[str]:
    """Compile `parts` of `model` (a TransRec) in place; every other part runs eager. Returns the compiled parts'
    names. "none" restores every eager method."""
    if parts not in PARTS:
        raise ValueError(f"model.compile must be one of {PARTS}, got {parts!r}")
    if mode not in MODES:
        raise ValueError(f"model.compile_mode must be one of {MODES}, got {mode!r}")
    if parts != "none" and zero_stage >= 3:
        raise ValueError("model.compile with ZeRO-3: the partitioned parameters are gathered in module hooks that a "
                         "compiled region cannot trace; use ds_configs/zero2.json, or model.compile=none")
    for module, name in _targets(model, "all"):  # back to eager first: switching parts never stacks compilations
        module.__dict__.pop(name, None)
    compiled = []
    for module, name in _targets(model, parts):
        eager = getattr(module, name)
        options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}  # inductor's only
        setattr(module, name, torch.compile(eager, backend=backend, dynamic=True, **options))
        compiled.append(f"{type(module).__name__}.{name}")
    return compiled


def is_compiled(module: nn.Module, name: str) -> bool:
    return name in module.__dict__
