"""A resumed run's TensorBoard curves neither repeat nor jump: a tiny two-stage run, stopped twice where events had
been logged after its last checkpoint (mid stage 1, and in stage 2 before its first checkpoint) and resumed each
time, reads back from its event files with one point per step for every tag: the training tags at every optimizer
step 1..10 of the run, validation, popularity's line and the collapse diagnostics once per validation, and the
HParams figures once, at the last step."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

PER_STEP = ["time/step_s", "time/forward_s", "grad_norm/user_encoder", "perf/cache_hit_share", "lr/main", "train/lr"]


def test_a_resumed_run_has_one_point_per_step(tmp_path, monkeypatch, ml_shards, tiny_bert_dir):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    from transrec.trainer.main import main
    from transrec.trainer.training.loop import Trainer

    run = tmp_path / "run"
    common = ["--preset", "tiny", "--shards", str(ml_shards), "--text-encoder", str(tiny_bert_dir), "--ds_config",
              str(REPO / "ds_configs" / "zero2.json"), "--set", "log_every=1", "save_every_steps=3",
              "stage1.epochs=1", "stage1.max_steps=6", "stage2.epochs=1", "stage2.max_steps=4"]
    # (stage, epoch, batches done) of the resume points to fail instead of saving: stage 1's at step 6 (steps 4-6
    # were logged after the step-3 checkpoint), stage 2's at its step 3 (stage 2's first steps were logged after
    # the checkpoint at the end of stage 1)
    stops = [(1, 0, 6), (2, 0, 3)]
    real_save = Trainer.save_resume_point

    def save_or_stop(self, engine, stage, epoch, batches_done, stale, *unlogged):
        if stops and stops[0] == (stage, epoch, batches_done):
            stops.pop(0)
            self.log.close()  # what the run logged is on disk, as after a kill
            raise KeyboardInterrupt
        real_save(self, engine, stage, epoch, batches_done, stale, *unlogged)

    monkeypatch.setattr(Trainer, "save_resume_point", save_or_stop)
    with pytest.raises(KeyboardInterrupt):
        main([*common, "--run-dir", str(run)])
    points = [json.loads((run / "resume.json").read_text())["tag"]]
    with pytest.raises(KeyboardInterrupt):
        main(["--resume", str(run)])
    points.append(json.loads((run / "resume.json").read_text())["tag"])
    main(["--resume", str(run)])
    assert points == ["stage1-epoch0-batch3", "stage1-epoch1-batch0"] and not stops

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()

    def steps(tag: str) -> list[int]:
        return [e.step for e in acc.Scalars(tag)]

    assert steps("train/stage1_loss") == [1, 2, 3, 4, 5, 6]
    assert steps("train/stage2_loss") == [7, 8, 9, 10]
    for tag in PER_STEP:
        assert steps(tag) == list(range(1, 11)), tag
    for tag in ("eval/stage1/ndcg@10", "health/stage1/mean_pairwise_cosine"):
        assert steps(tag) == [6], tag
    for tag in ("eval/stage2/ndcg@10", "health/stage2/effective_rank"):
        assert steps(tag) == [10], tag
    assert steps("eval/popularity/ndcg@10") == [6, 10]
    assert steps("hparams/test_ndcg@10") == [10]
    # the loss curve is the CSV's, which a resume cuts back to the checkpoint (tests/test_resume_logs.py)
    csv_rows = (run / "loss_stage1.csv").read_text().splitlines()[1:]
    assert [e.value for e in acc.Scalars("train/stage1_loss")] == pytest.approx(
        [float(r.split(",")[1]) for r in csv_rows], abs=1e-6)
