"""--resume cuts the logs back to the checkpoint (trainer/monitoring/metric_log.py): the loss and validation CSVs of a
resumed run hold exactly the rows of a run never interrupted, and TensorBoard drops the events logged after the
checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from transrec.trainer.monitoring.metric_log import RunLog, truncate_logs

HEADER = "stage,epoch,hr@10,ndcg@10\n"


def write_logs(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "loss_stage1.csv").write_text("step,loss\n" + "".join(f"{s},0.{s}\n" for s in range(1, 7)) + "7,0.")
    (run / "loss_stage2.csv").write_text("step,loss\n" + "".join(f"{s},0.{s}\n" for s in range(1, 5)))
    (run / "valid_curve.csv").write_text(HEADER + "1,0,0.1,0.1\n1,1,0.2,0.2\n2,0,0.3,0.3\n2,1,0.4,0.4\n")


def test_truncate_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    """By step in the checkpoint's stage (every row of an earlier stage, none of a later one), by (stage, epoch) for
    validation rows; a row a kill cut short goes; files are replaced whole, no temporary file is left."""
    run = tmp_path / "run"
    write_logs(run)
    # stage 1, mid-epoch 1 after its 3rd optimizer step: epoch 0's validation stays, epoch 1's does not
    dropped = truncate_logs(run, stage=1, stage_step=3, epoch=1)
    assert dropped == {"loss_stage1.csv": 4, "loss_stage2.csv": 4, "valid_curve.csv": 3}
    assert (run / "loss_stage1.csv").read_text() == "step,loss\n1,0.1\n2,0.2\n3,0.3\n"
    assert (run / "loss_stage2.csv").read_text() == "step,loss\n"
    assert (run / "valid_curve.csv").read_text() == HEADER + "1,0,0.1,0.1\n"
    write_logs(run)
    # stage 2 at its start of epoch 1 after 2 steps: stage 1 whole (its cut-short last row aside)
    assert truncate_logs(run, stage=2, stage_step=2, epoch=1) == {"loss_stage1.csv": 1, "loss_stage2.csv": 2,
                                                                   "valid_curve.csv": 1}
    assert (run / "loss_stage1.csv").read_text() == "step,loss\n" + "".join(f"{s},0.{s}\n" for s in range(1, 7))
    assert (run / "loss_stage2.csv").read_text() == "step,loss\n1,0.1\n2,0.2\n"
    assert (run / "valid_curve.csv").read_text() == HEADER + "1,0,0.1,0.1\n1,1,0.2,0.2\n2,0,0.3,0.3\n"
    assert truncate_logs(run, stage=2, stage_step=2, epoch=1) == {}  # nothing after the checkpoint any more
    assert sorted(p.name for p in run.iterdir()) == ["loss_stage1.csv", "loss_stage2.csv", "valid_curve.csv"]


def session_starts(tensorboard: Path) -> list[int]:
    """The steps of the SessionLog START events (a writer opened with purge_step writes one) in the event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    return [e.step for f in sorted(tensorboard.glob("events.out.tfevents.*")) for e in EventFileLoader(str(f)).Load()
            if e.HasField("session_log") and e.session_log.status == SessionLog.START]


def test_rewind_opens_tensorboard_with_purge_step(tmp_path):
    """After rewind, TensorBoard's reader drops the events from the checkpoint's step + 1 on: the loss curve has each
    step once, with the resumed run's values after the checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLog(tmp_path, 0, 1, torch.device("cpu"), 1)
    for step in range(1, 9):
        first.scalars({"eval/hr@10": 0.1 * step}, step)
    first.close()
    time.sleep(1.1)  # event files are named by the second: the resumed run's sorts after
    resumed = RunLog(tmp_path, 0, 1, torch.device("cpu"), 1)
    resumed.rewind(stage=1, stage_step=5, epoch=0, run_step=5)
    for step in (6, 7):
        resumed.scalars({"eval/hr@10": 1.0 + step}, step)
    resumed.close()
    assert session_starts(tmp_path / "tensorboard") == [6]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    curve = [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/hr@10")]
    assert curve == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 0.5), (6, 7.0), (7, 8.0)]


def test_a_resumed_run_logs_each_step_and_validation_once(ml_shards, tiny_bert_dir, tmp_path, monkeypatch):
    """Stage 1 of 2 epochs ends at max_steps=6 in epoch 0 (checkpoints at steps 3 and 6). Stopped three times, each
    stop resumed in this process: (1) before the step-6 checkpoint (steps 4-6 were logged after the step-3 one),
    (2) after stage 1's validation, before the resume point that follows it, (3) just after that resume point. The
    resumed run's loss_stage1.csv and valid_curve.csv equal, byte for byte, those of the same run never interrupted:
    no row twice, no step or validation past the stage's end; TensorBoard purges from each checkpoint's step + 1."""
    from transrec.trainer.main import main
    from transrec.trainer.training.loop import Trainer

    common = ["--preset", "tiny", "--shards", str(ml_shards), "--text-encoder", str(tiny_bert_dir), "--ds_config",
              str(REPO / "ds_configs" / "zero2.json"), "--stage", "1", "--set", "log_every=1", "save_every_steps=3",
              "stage1.epochs=2", "stage1.max_steps=6"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    main([*common, "--run-dir", str(straight)])
    assert [r.split(",")[0] for r in (straight / "loss_stage1.csv").read_text().splitlines()] == [
        "step", "1", "2", "3", "4", "5", "6"]
    assert len((straight / "valid_curve.csv").read_text().splitlines()) == 2  # the header and epoch 0

    stops = [("instead of", (1, 0, 6)), ("instead of", (1, 1, 0)), ("after", (1, 1, 0))]  # (stage, epoch, batch)
    real_save = Trainer.save_resume_point

    def save_or_stop(self, engine, stage, epoch, batches_done, stale, *unlogged):
        point = (stage, epoch, batches_done)
        if stops and stops[0] == ("instead of", point):
            stops.pop(0)
            self.log.close()  # what the run had logged is on disk, as it is when a kill comes later
            raise KeyboardInterrupt
        real_save(self, engine, stage, epoch, batches_done, stale, *unlogged)
        if stops and stops[0] == ("after", point):
            stops.pop(0)
            self.log.close()
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_resume_point", save_or_stop)
    with pytest.raises(KeyboardInterrupt):
        main([*common, "--run-dir", str(run)])
    assert [r.split(",")[0] for r in (run / "loss_stage1.csv").read_text().splitlines()][-1] == "6"
    points = []
    for _ in range(3):
        points.append(json.loads((run / "resume.json").read_text())["tag"])
        if stops:
            with pytest.raises(KeyboardInterrupt):
                main(["--resume", str(run)])
        else:
            main(["--resume", str(run)])
    assert points == ["stage1-epoch0-batch3", "stage1-epoch0-batch6", "stage1-epoch1-batch0"] and not stops
    for name in ("loss_stage1.csv", "valid_curve.csv"):
        assert (run / name).read_text() == (straight / name).read_text(), name
    # each resume reopens TensorBoard's writer before training, purging from its checkpoint's step + 1 (steps 3, 6, 6)
    assert session_starts(run / "tensorboard") == [4, 7, 7]


def test_a_checkpoint_inside_a_logging_window_carries_its_unlogged_losses(tmp_path):
    """log_every 2, a checkpoint after step 3: the run before the checkpoint saw loss 3, the resumed run sees loss 4.
    The resumed run logs mean(loss 3, loss 4) at step 4, as a run never interrupted does, not loss 4 alone."""
    losses = [torch.tensor(v) for v in (1.0, 2.0, 4.0, 8.0)]

    def logged(run: Path, stop_after: int | None) -> str:
        run.mkdir()
        log = RunLog(run, rank=0, world=1, device=torch.device("cpu"), log_every=2)
        meter = log.epoch(1, 0, 4, 0, 4, estimate=False)
        for step, loss in enumerate(losses, start=1):
            meter.step_done(loss, step - 1, step, step, boundary=True, lrs=lambda: [0.1])
            if step == stop_after:  # the checkpoint, then a kill: a new process resumes the window
                saved = meter.unlogged()
                meter = log.epoch(1, 0, 4, step, 4, estimate=False)
                meter.carry(saved)
        log.close()
        return (run / "loss_stage1.csv").read_text()

    whole = logged(tmp_path / "whole", None)
    assert whole == "step,loss\n2,1.50000000\n4,6.00000000\n"
    assert logged(tmp_path / "resumed", stop_after=3) == whole
