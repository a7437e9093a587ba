"""The learning rate's schedule, as a pure function of the step: linear warm-up, then cosine decay to a tenth.

    lr(step) = base_lr * lr_factor(step, warmup_steps, steps_total)

Each stage's optimizer steps through it (torch's LambdaLR, trainer/training/loop.py: `Trainer.make_engine`).
"""

from __future__ import annotations

import math

FLOOR = 0.1  # the factor at the end of the decay


def lr_factor(step: int, warmup_steps: int, steps_total: int) -> float:
    """The base rate's multiplier at optimizer step `step` (0-based): (step + 1) / warmup_steps during the warm-up,
    then a half cosine from 1 down to FLOOR at `steps_total`, and FLOOR after it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps_total - warmup_steps))
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
