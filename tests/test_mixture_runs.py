"""Whole runs over a mixture of catalogues (MovieLens + the H&M fixture, tiny preset): two ranks under ZeRO-2, the
per-catalogue figures equal to the export's on each catalogue alone, exact resume after kill -9, the mean-residual
user state."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_runs import REPO, _env, _run_main

from transrec.data_shards.mixture import Catalogue, mix

FAST = ["monitor.projector=false", "eval.bootstrap=50"]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, ml_shards, hm_shards) -> Path:
    out = tmp_path_factory.mktemp("mixrun") / "mix"
    mix([Catalogue(ml_shards, "ml"), Catalogue(hm_shards, "hm")], out)
    return out


def _common(mixture: Path, tiny_bert_dir: Path, *settings: str) -> list[str]:
    return ["--preset", "tiny", "--shards", str(mixture), "--text-encoder", str(tiny_bert_dir), "--ds_config",
            str(REPO / "ds_configs" / "zero2.json"), "--set", *FAST, *settings]


def _ranks(path: Path) -> dict[int, tuple[int, int]]:
    rows = [r.split("\t") for r in path.read_text().split("\n")[1:] if r]
    return {int(u): (int(t), int(k)) for u, t, k in rows}


def test_two_rank_mixture_run_scores_each_catalogue_as_its_export_does_alone(mixture, ml_shards, hm_shards,
                                                                             tiny_bert_dir, tmp_path):
    from transrec.trainer.commands.evaluate import main as evaluate_main

    run = tmp_path / "run"
    out = _run_main([*_common(mixture, tiny_bert_dir, "data.mixing_alpha=0.5"), "--run-dir", str(run)], ranks=2)
    assert re.search(r"catalogues \(training windows, loss weight\): ml \(\d+, 0\.\d+\), hm \(\d+, \d+\.\d+\)",
                     out.stdout + out.stderr)
    per = json.loads((run / "catalogues.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert per["selection"] == {"metric": "ndcg@10", "across_catalogues": "macro", "stage": metrics["best"]["stage"],
                                "epoch": metrics["best"]["epoch"]}
    assert per["test"]["ml"]["users"] + per["test"]["hm"]["users"] == metrics["test"]["users"]
    # the selection figure is the mean of the catalogues' figures
    assert metrics["valid"]["ndcg@10"] == pytest.approx(
        (per["valid"]["ml"]["ndcg@10"] + per["valid"]["hm"]["ndcg@10"]) / 2)
    run_ranks = _ranks(run / "test_ranks.tsv")
    first_hm_user = json.loads((mixture / "manifest.json").read_text())["catalogues"][1]["users"][0]
    first_hm_item = json.loads((mixture / "manifest.json").read_text())["catalogues"][1]["items"][0]
    for shards, user_offset, item_offset, name in ((ml_shards, 0, 0, "ml"),
                                                   (hm_shards, first_hm_user, first_hm_item, "hm")):
        alone = tmp_path / f"{name}.json"
        result = evaluate_main(["--export", str(run / "export"), "--shards", str(shards), "--out", str(alone)])
        assert result["content"] == per["test"][name]
        assert result["popularity"] == per["test_popularity"][name]
        for user, (target, rank) in _ranks(alone.with_suffix(".ranks.tsv")).items():
            assert run_ranks[user + user_offset] == (target + item_offset, rank)
    with pytest.raises(SystemExit, match="is a mixture of catalogues"):
        evaluate_main(["--export", str(run / "export"), "--shards", str(mixture)])


def test_mixture_resume_after_sigkill_reaches_the_same_metrics(mixture, tiny_bert_dir, tmp_path):
    common = _common(mixture, tiny_bert_dir, "save_every_steps=2", "stage1.max_steps=8", "stage2.max_steps=4",
                     "data.mixing_alpha=0")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run_main([*common, "--run-dir", str(straight)])
    proc = subprocess.Popen([sys.executable, str(REPO / "trainer" / "main.py"), *common, "--run-dir", str(killed)],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, point = time.time() + 300, killed / "resume.json"
    while time.time() < deadline:
        if point.exists() and json.loads(point.read_text())["batches_done"] >= 4:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed mid-epoch")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    resumed = _run_main(["--resume", str(killed)])
    assert re.search(r"resumed stage \d at epoch \d+, batch [1-9]", resumed.stdout + resumed.stderr)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    assert a["test"] == b["test"] and a["valid"] == b["valid"] and a["best"] == b["best"]
    assert (json.loads((straight / "catalogues.json").read_text())["test"]
            == json.loads((killed / "catalogues.json").read_text())["test"])
    assert (straight / "loss_stage1.csv").read_text() == (killed / "loss_stage1.csv").read_text()


def test_mean_residual_user_state_starts_as_the_history_mean(tiny_bert_dir):
    from conftest import small_model_config

    from transrec.trainer.core.model import TransRec, history_means

    torch.manual_seed(0)
    vecs = torch.randn(3, 5, 16)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5, [False, False, False, False, True]])
    vecs = vecs * mask[..., None]
    means = history_means(vecs, mask)
    assert torch.allclose(means[0, -1], vecs[0, 2:].mean(0)) and torch.allclose(means[1, 2], vecs[1, :3].mean(0))
    assert torch.equal(means[2, :4], torch.zeros(4, 16))
    cfg = small_model_config(tiny_bert_dir, user_state="mean_residual")
    model = TransRec(cfg, 4, np.zeros(4, dtype=np.int64), {}).eval()
    assert model.user_gate.item() == 0.0 and "user_gate" in model.export_state()
    assert torch.allclose(model.user_vector(vecs, mask), vecs[:, :].sum(1) / mask.sum(1, keepdim=True))
    with torch.no_grad():
        model.user_gate.fill_(0.5)
    plain = model.user_encoder(vecs, mask)[:, -1]
    assert torch.allclose(model.user_vector(vecs, mask), means[:, -1] + 0.5 * plain, atol=1e-6)
    # the encoder's own state (the paper's) has no gate
    assert TransRec(small_model_config(tiny_bert_dir), 4, np.zeros(4, dtype=np.int64), {}).user_gate is None
