"""curves.png: every finished run draws its training loss and validation NDCG@10 from its own records, popularity's
line and the selected model marked, and links it from results.md (trainer/monitoring/run_curves.py)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from transrec.trainer.monitoring.run_curves import CURVES_FILE, read_curves, write_curves


def designed_run(folder: Path) -> Path:
    folder.mkdir()
    (folder / "loss_stage1.csv").write_text("step,loss\n20,8.5\n40,7.25\n60,6.75\n")
    (folder / "loss_stage2.csv").write_text("step,loss\n10,6.5\n")
    (folder / "valid_curve.csv").write_text("stage,epoch,hr@10,ndcg@10\n1,0,0.1,0.05\n1,1,0.2,0.09\n1,2,0.2,0.08\n"
                                            "2,0,0.2,0.07\n")
    (folder / "metrics.json").write_text(json.dumps({"popularity_valid": {"ndcg@10": 0.03},
                                                     "best": {"stage": 1, "epoch": 1}}))
    return folder


def test_the_curves_are_the_run_records(tmp_path):
    run = designed_run(tmp_path / "run")
    curves = read_curves(run)
    assert curves.loss == {1: ([20, 40, 60], [8.5, 7.25, 6.75]), 2: ([10], [6.5])}
    assert curves.valid == {1: ([0, 1, 2], [0.05, 0.09, 0.08]), 2: ([0], [0.07])}
    assert curves.popularity == 0.03 and curves.selected == (1, 1)
    out = write_curves(run)
    assert out == run / CURVES_FILE
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1000, 360)


def test_a_run_without_training_still_gets_its_picture(tmp_path):
    """A zero-shot run (--stage none) has a stage-0 validation and no loss."""
    run = tmp_path / "zero_shot"
    run.mkdir()
    (run / "valid_curve.csv").write_text("stage,epoch,ndcg@10\n0,0,0.02\n")
    (run / "metrics.json").write_text(json.dumps({"popularity_valid": {"ndcg@10": 0.04},
                                                  "best": {"stage": 0, "epoch": 0}}))
    assert read_curves(run).loss == {} and read_curves(run).valid == {0: ([0], [0.02])}
    assert write_curves(run).stat().st_size > 0


def test_every_finished_run_draws_and_links_its_curves(source_run):
    metrics = json.loads((source_run / "metrics.json").read_text())
    assert (source_run / CURVES_FILE).exists()
    assert f"]({CURVES_FILE})" in (source_run / "results.md").read_text()
    curves = read_curves(source_run)
    assert curves.selected == (metrics["best"]["stage"], metrics["best"]["epoch"])
    assert set(curves.loss) == {1, 2} and curves.popularity == metrics["popularity_valid"]["ndcg@10"]
