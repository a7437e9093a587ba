"""The parts of a run's monitoring that are not a whole run: the step timer (on CPU its phases are the wall time;
on CUDA it records events and reads them only when asked, on logging steps), the parts' gradient norms, the cache-hit
count, the HParams row's settings and figures."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from transrec.trainer.monitoring.grad_norms import part_grad_norms, part_of, trainable_parts
from transrec.trainer.monitoring.run_monitoring import cache_hit_counter
from transrec.trainer.monitoring.step_timing import PHASES, StepTimer
from transrec.trainer.monitoring.tensorboard_summaries import flat_settings, run_figures


def test_step_timer_phases_on_cpu_are_the_wall_time_of_each_block():
    timer = StepTimer(torch.device("cpu"))

    def slow_batches():
        for i in range(3):
            time.sleep(0.02)
            yield i

    t0 = time.perf_counter()
    for _ in timer.loader(slow_batches()):
        with timer.span("forward"):
            time.sleep(0.01)
        with timer.span("optimizer"):
            pass
    wall = time.perf_counter() - t0
    seconds = timer.read()
    assert set(seconds) == set(PHASES)
    assert seconds["loader_wait"] == pytest.approx(0.06, abs=0.03)
    assert seconds["forward"] == pytest.approx(0.03, abs=0.02)
    assert sum(seconds.values()) <= wall
    assert sum(seconds.values()) == pytest.approx(wall, rel=0.2)
    assert timer.read() == dict.fromkeys(PHASES, 0.0)  # read() starts the next window at zero


class FakeEvent:
    """A CUDA event as the timer uses it; counts the waits."""

    created: list[FakeEvent] = []

    def __init__(self):
        self.recorded = self.synchronized = 0
        FakeEvent.created.append(self)

    def record(self):
        self.recorded += 1

    def synchronize(self):
        self.synchronized += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.recorded and end.recorded and end.synchronized, "read before the end event was waited for"
        return 250.0  # milliseconds


def test_step_timer_on_cuda_records_events_and_waits_only_in_read():
    FakeEvent.created = []
    timer = StepTimer(torch.device("cuda"), event_factory=FakeEvent)
    wrapped = timer.timed(lambda x: x + 1, "to_device")
    for step in range(4):  # four steps without a logging step: nothing is waited for
        assert wrapped(step) == step + 1
        for phase in ("forward", "backward", "optimizer"):
            with timer.span(phase):
                pass
        with timer.span("checkpoint"):  # a host phase: no events
            pass
    assert len(FakeEvent.created) == 4 * 4 * 2
    assert all(e.recorded == 1 and e.synchronized == 0 for e in FakeEvent.created)
    seconds = timer.read()
    assert {p: seconds[p] for p in ("to_device", "forward", "backward", "optimizer")} == dict.fromkeys(
        ("to_device", "forward", "backward", "optimizer"), 4 * 0.25)
    assert seconds["checkpoint"] < 0.01
    assert timer.pending == []


def test_step_timer_refuses_an_unknown_phase():
    with pytest.raises(ValueError, match="unknown phase 'io'"), StepTimer(torch.device("cpu")).span("io"):
        pass


class Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
        self.user_encoder = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)
        self.logit_scale = nn.Parameter(torch.ones(()))


def test_part_of_names_top_level_modules_and_each_tower():
    assert part_of("towers.image.backbone.conv1.weight") == "towers.image"
    assert part_of("user_encoder.blocks.0.attn.w") == "user_encoder"
    assert part_of("logit_scale") == "logit_scale"


def test_part_grad_norms_are_the_norms_of_each_parts_gradients():
    torch.manual_seed(0)
    model = Parts()
    model.towers["b"].requires_grad_(False)
    x = torch.randn(4, 3)
    loss = model.head(model.user_encoder(model.towers["a"](x))).sum() * model.logit_scale
    loss.backward()
    norms = part_grad_norms(trainable_parts(model))
    assert sorted(norms) == ["head", "logit_scale", "towers.a", "user_encoder"]  # frozen tower b: no entry
    for part, module in (("towers.a", model.towers["a"]), ("user_encoder", model.user_encoder)):
        expected = torch.cat([p.grad.flatten() for p in module.parameters()]).norm()
        assert float(norms[part]) == pytest.approx(float(expected), rel=1e-6)
    assert float(norms["logit_scale"]) == pytest.approx(abs(float(model.logit_scale.grad)), rel=1e-6)


class Cache:
    def __init__(self, covered: set[str]):
        self.covered = covered

    def covers(self, name: str) -> bool:
        return name in self.covered


def test_cache_hit_counter_counts_items_of_cached_modalities():
    modality = np.array([0, 1, 1, 0, 1])
    count = cache_hit_counter(Cache({"image"}), ("text", "image"), modality)
    assert count(np.array([0, 1, 2, 3])) == 2
    assert count(np.array([4])) == 1
    assert cache_hit_counter(None, ("text", "image"), modality) is None


def test_hparams_settings_are_flat_and_of_plugin_types():
    flat = flat_settings({"stage1": {"lr": 1e-3, "trainable": {}}, "eval": {"ks": (5, 10)}, "init_from": None,
                          "model": {"text": {"encoder": "minilm"}}})
    assert flat == {"stage1.lr": 1e-3, "stage1.trainable": "{}", "eval.ks": "[5, 10]", "init_from": "none",
                    "model.text.encoder": "minilm"}


def test_run_figures_take_the_selected_models_validation_and_test():
    metrics = {"valid": {"ndcg@10": 0.2, "hr@10": 0.4, "hr@20": 0.5}, "test": {"ndcg@10": 0.1, "hr@10": 0.3},
               "popularity_test": {"ndcg@10": 0.05}, "best": {"stage": 2, "epoch": 1}}
    assert run_figures(metrics, "hr@20") == {
        "hparams/valid_hr@20": 0.5, "hparams/valid_ndcg@10": 0.2, "hparams/valid_hr@10": 0.4,
        "hparams/test_ndcg@10": 0.1, "hparams/test_hr@10": 0.3, "hparams/popularity_test_ndcg@10": 0.05,
        "hparams/best_stage": 2.0}


def test_time_breakdown_weighs_each_window_by_its_steps():
    from transrec.bench.time_breakdown import stage_breakdown

    phases = {"loader_wait": 0.1, "to_device": 0.0, "forward": 0.3, "backward": 0.4, "optimizer": 0.1,
              "checkpoint": 0.0}
    scalars = {"train/stage1_loss": {2: 5.0, 4: 4.0, 8: 3.0}, "time/step_s": {2: 1.0, 4: 1.0, 8: 2.0},
               "time/accounted_share": {2: 0.9, 4: 0.9, 8: 0.45}}
    for p, v in phases.items():
        scalars[f"time/{p}_s"] = {2: v, 4: v, 8: v}
    b = stage_breakdown(scalars, 1)
    # windows of 2, 2 and 4 steps (the first weighs as the next): step time (2*1 + 2*1 + 4*2) / 8
    assert b["step"] == pytest.approx(1.5)
    assert b["forward"] == pytest.approx(0.3)
    assert b["accounted_share"] == pytest.approx(0.9 / 1.5)
    assert b["worst_window_share"] == 0.45 and b["windows"] == 3
    assert stage_breakdown(scalars, 2) is None


def test_an_epochs_end_hands_its_part_of_the_window_to_the_next_epoch(tmp_path, monkeypatch):
    """log_every 4 over epochs of 3 steps: the window logged at step 4 holds epoch 0's steps 1-3 and epoch 1's step 4
    (their time, items and cache hits), not the pause between the epochs (validation); its loss is epoch 1's alone."""
    from types import SimpleNamespace

    from transrec.trainer.monitoring.metric_log import RunLog

    log = RunLog(tmp_path, rank=0, world=1, device=torch.device("cpu"), log_every=4)
    logged = []
    monkeypatch.setattr(log, "scalars", lambda values, step: logged.append((step, values)))
    batch = SimpleNamespace(num_real=2, unique_items=torch.tensor([0, 1, 2]))

    def train(meter, steps, first_step, loss):
        for b in range(steps):
            meter.batch_in(batch)
            with meter.timer.span("forward"):
                time.sleep(0.02)
            meter.step_done(torch.tensor(loss), b, first_step + b, first_step + b, True, lambda: [0.1])

    meter = log.epoch(1, 0, 3, 0, 6, estimate=False, cache_hits=lambda items: 1)
    train(meter, 3, 1, loss=1.0)
    window = meter.close()
    assert (window.optimizer_steps, window.items, window.cached_items) == (3, 9, 3) and not logged
    time.sleep(0.2)  # the validation between the epochs
    meter = log.epoch(1, 1, 3, 0, 6, estimate=False, cache_hits=lambda items: 1, window=window)
    train(meter, 1, 4, loss=2.0)
    log.close()
    [(step, values)] = logged
    assert step == 4 and values["train/stage1_loss"] == 2.0
    assert values["perf/items_per_step"] == 3.0 and values["perf/cache_hit_share"] == pytest.approx(1 / 3)
    assert values["time/forward_s"] == pytest.approx(0.02, abs=0.01)
    assert values["time/step_s"] < 0.02 + 0.2 / 4  # the pause is in no window
    assert values["time/accounted_share"] > 0.8


def test_validation_logs_health_and_warns_when_it_crosses_the_threshold(tmp_path, monkeypatch):
    from transrec.trainer.monitoring import metric_log
    from transrec.trainer.monitoring.metric_log import RunLog

    log = RunLog(tmp_path, rank=0, world=1, device=torch.device("cpu"), log_every=1)
    logged, warnings = [], []
    monkeypatch.setattr(log, "scalars", lambda values, step: logged.append((step, values)))
    monkeypatch.setattr(metric_log.LOG, "warning", warnings.append)
    healthy = {"users": 500, "mean_pairwise_cosine": 0.3, "same_top10_share": 0.1, "effective_rank": 20.0}
    collapsed = {**healthy, "mean_pairwise_cosine": 0.93}
    log.validation(1, 0, {"ndcg@10": 0.1}, 40, reference={"ndcg@10": 0.03}, health=healthy)
    assert logged == [(40, {"eval/stage1/ndcg@10": 0.1}), (40, {"eval/popularity/ndcg@10": 0.03}),
                      (40, {"health/stage1/mean_pairwise_cosine": 0.3, "health/stage1/same_top10_share": 0.1,
                            "health/stage1/effective_rank": 20.0})]
    assert warnings == []
    log.validation(2, 3, {"ndcg@10": 0.1}, 80, health=collapsed)
    [warning] = warnings
    assert warning.startswith("stage 2 epoch 3: user vectors look collapsed: mean pairwise cosine 0.93 >= 0.85")
    assert "first epoch" not in warning
    log.validation(2, 0, {"ndcg@10": 0.1}, 90, health=collapsed)
    log.close()
    assert "a stage's first epoch often starts there" in warnings[-1]
