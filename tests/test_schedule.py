"""trainer/training/schedule.py: the learning rate's warm-up and cosine decay, step by step, and the rates an
optimizer actually takes through it."""

from __future__ import annotations

import functools

import pytest
import torch

from transrec.trainer.training.schedule import FLOOR, lr_factor


def test_warm_up_then_cosine_down_to_the_floor():
    assert [lr_factor(s, 4, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 104) == 1.0  # the decay starts at the top
    assert lr_factor(54, 4, 104) == pytest.approx(FLOOR + (1 - FLOOR) / 2)  # half-way: the cosine's middle
    assert lr_factor(104, 4, 104) == pytest.approx(FLOOR)
    assert lr_factor(500, 4, 104) == pytest.approx(FLOOR)  # past the planned steps: stays at the floor
    assert lr_factor(0, 0, 10) == 1.0  # no warm-up
    decay = [lr_factor(s, 4, 104) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_the_optimizer_takes_these_rates():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, warmup_steps=3, steps_total=20))
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * lr_factor(s, 3, 20) for s in range(25)])
