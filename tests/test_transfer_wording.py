"""transfer=auto as a new user reads it (issue 45): `scratch` named in transfer.candidates, the cost estimate against
known timings, the init log's count and names of the tensors it creates, and the collapse warning saying whether it
is the expected start of fine-tuning."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from test_serving import build_export

from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import preset


def test_scratch_is_accepted_as_a_named_candidate():
    from transrec.trainer.transfer.candidates import candidate_plan

    cfg = apply_overrides(preset("tiny"), ["init_from=x", "transfer=auto", "transfer.candidates=finetune,scratch"])
    assert cfg.transfer.candidate_names() == ["finetune", "scratch"]
    assert [c.name for c in candidate_plan(cfg)] == ["finetune", "scratch"]
    both = apply_overrides(preset("tiny"), ["init_from=x", "transfer=auto", "transfer.candidates=scratch,towers",
                                            "transfer.include_scratch=true"])
    assert both.transfer.candidate_names() == ["scratch", "towers"]  # named once
    with pytest.raises(ValueError, match=r"transfer.candidates='bogus': name one or more of .*'scratch'"):
        apply_overrides(preset("tiny"), ["init_from=x", "transfer.candidates=bogus"])


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class _TimedTrainer:
    """The start's trainer, done: its validation takes `eval_s` on the clock, its stages' batches are timed as
    given, and its frozen-block pass took `cache_s`."""

    def __init__(self, clock, eval_s, cache_s, steps):
        self.clock, self.eval_s, self.steps = clock, eval_s, steps
        self.model = SimpleNamespace(cache=SimpleNamespace(computed_s=cache_s))

    def evaluate(self, split, scoring):
        self.clock.now += self.eval_s

    def time_steps(self, stage):
        return self.steps[stage]


def test_the_cost_estimate_counts_the_set_up_once_and_not_the_one_off_cache_pass(monkeypatch):
    """The start ran 300 s: 120 s of frozen-block pass (later candidates read the store), a validation and a test
    evaluation of 30 s each, 120 s of set-up. A candidate that trains runs both stages, 4 epochs of 50 batches at
    1.2 s, a 30 s validation per epoch and a 30 s test per stage: 120 + 2 x (4 x (60 + 30) + 30) = 900 s (the
    estimate before counted the whole 300 s as set-up: 1080 s)."""
    from transrec.trainer.training import transfer_auto as transfer

    clock = _Clock()
    monkeypatch.setattr(transfer, "time", clock)
    cfg = apply_overrides(preset("tiny"), ["stage1.epochs=4", "stage2.epochs=4"])
    trainer = _TimedTrainer(clock, eval_s=30.0, cache_s=120.0, steps={1: (1.2, 50), 2: (1.2, 50)})
    got = transfer.estimate_minutes(trainer, cfg, 300.0)
    assert got["train"] * 60 == pytest.approx(900.0)
    assert got["setup"] * 60 == pytest.approx(120.0) and got["start"] * 60 == pytest.approx(300.0)
    real_s = 900.0  # such a candidate, run to its last epoch
    assert real_s / 2 <= got["train"] * 60 <= real_s * 2
    # once the first trained candidate has finished (early stopping: 9.5 min), the others are expected to take as long
    measured = transfer.measured_estimate(got, "finetune", 9.5)
    later = transfer.candidate_plan(apply_overrides(preset("tiny"), ["init_from=x", "transfer=auto"]))
    towers = next(c for c in later if c.name == "towers")
    assert transfer._minutes(measured, towers) == 9.5 and transfer._minutes(got, towers) == got["train"]


def test_the_init_log_names_every_tensor_it_creates(tiny_bert_dir, tmp_path):
    """Count and names agree: each created tensor is named (or, past eight, counted in its group)."""
    import numpy as np

    from transrec.trainer.core.checkpoint import load_export
    from transrec.trainer.core.model import TransRec

    export = build_export(tmp_path / "export", tiny_bert_dir)
    cfg = preset("tiny").model
    cfg.text.encoder = str(tiny_bert_dir)
    for parts in ("all", "towers"):
        model = TransRec(cfg, 12, np.arange(12) % 2, {"text": 0, "image": 0})
        lines = []
        made = load_export(model, cfg, export, log=lines.append, parts=parts)
        [line] = lines
        count, listed = re.search(r"newly created (\d+): \[([^\]]*)\]", line).groups()
        assert int(count) == len(made["created"]) > 0
        entries = [e for e in listed.split(", ") if e]
        if len(made["created"]) <= 8:
            assert entries == sorted(made["created"])
        else:  # groups with counts adding up to the number created
            total = sum(int(e.rsplit(" x", 1)[1]) if " x" in e else 1 for e in entries)
            assert total == len(made["created"])
            assert all(any(k.startswith(e.split(".*")[0]) for k in made["created"]) for e in entries)


def test_the_collapse_warning_says_whether_it_is_the_start_of_fine_tuning(tmp_path, monkeypatch):
    """The issue's run: cosine 0.98 at epoch 0 falling to 0.86 by epoch 5, then a stage that stays collapsed."""
    import torch

    from transrec.trainer.monitoring import metric_log
    from transrec.trainer.monitoring.metric_log import RunLog

    log = RunLog(tmp_path, rank=0, world=1, device=torch.device("cpu"), log_every=1)
    monkeypatch.setattr(log, "scalars", lambda values, step: None)
    warnings = []
    monkeypatch.setattr(metric_log.LOG, "warning", warnings.append)
    falling = [0.98, 0.96, 0.93, 0.90, 0.88, 0.86]
    for epoch, cosine in enumerate(falling):
        log.validation(1, epoch, {"ndcg@10": 0.1}, epoch, health={"mean_pairwise_cosine": cosine,
                                                                 "same_top10_share": 0.1})
    assert len(warnings) == 6
    assert "expected at the start of fine-tuning if the cosine falls in the next epochs" in warnings[0]
    for epoch, w in enumerate(warnings[1:], 1):
        assert (f"(falling: 0.98 at epoch 0, {falling[epoch - 1]:.2f} at epoch {epoch - 1}, {falling[epoch]:.2f} "
                "now: expected at the start of fine-tuning") in w
    warnings.clear()
    for epoch, cosine in enumerate([0.95, 0.95]):
        log.validation(2, epoch, {"ndcg@10": 0.1}, 10 + epoch, health={"mean_pairwise_cosine": cosine,
                                                                      "same_top10_share": 0.1})
    log.close()
    assert "not falling since epoch 0 (0.95; 0.95 at epoch 0): not the start of fine-tuning but a failure" \
        in warnings[1]
