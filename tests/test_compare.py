"""`python -m transrec.trainer.commands.compare`: two runs' metrics and their paired difference, overall, warm and
cold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from transrec.data_shards.shard_io import read_sequences
from transrec.trainer.commands import compare
from transrec.trainer.evaluation.ranking import eval_users, per_user_gain
from transrec.trainer.evaluation.run_stats import cold_mask, training_items


def _fake_run(d: Path, shards: Path, ranks: dict[str, np.ndarray], users: np.ndarray, targets: np.ndarray) -> Path:
    """A finished run's files as compare reads them: metrics.json, run_config.json, test_ranks*.tsv."""
    d.mkdir(parents=True)
    stages = {s: {"valid": {}, "test": {}, "scoring": "content"} for s in ("1", "2")}
    stages["1"]["scoring"] = "free_head"
    (d / "metrics.json").write_text(json.dumps({"best": {"stage": 2, "scoring": "content"}, "stages": stages}))
    (d / "run_config.json").write_text(json.dumps({"config": {"data": {"shards": str(shards)}}}))
    for name, r in ranks.items():
        rows = "".join(f"{u}\t{t}\t{k}\n" for u, t, k in zip(users, targets, r))
        (d / f"{name}.tsv").write_text("user\ttarget_item\trank\n" + rows)
    return d


@pytest.fixture(scope="module")
def runs(ml_shards, tmp_path_factory):
    data = eval_users(read_sequences(ml_shards), "test", 8)
    rng = np.random.default_rng(0)
    n = len(data.users)
    good = rng.integers(1, 6, size=n)  # A ranks most targets in its top 5
    bad = rng.integers(1, 400, size=n)
    out = tmp_path_factory.mktemp("compare")
    a = _fake_run(out / "a", ml_shards, {"test_ranks": good, "test_ranks_stage1": bad, "test_ranks_stage2": good},
                  data.users, data.targets)
    b = _fake_run(out / "b", ml_shards, {"test_ranks": bad, "test_ranks_popularity": bad}, data.users, data.targets)
    return a, b, good, bad, data, ml_shards


def test_difference_warm_and_cold(runs, tmp_path):
    a, b, good, bad, data, shards = runs
    text = compare.main([str(a), str(b), "--bootstrap", "200", "--out", str(tmp_path / "cmp.md")])
    assert (tmp_path / "cmp.md").read_text() == text + "\n"
    want = per_user_gain(good, "ndcg@10").mean() - per_user_gain(bad, "ndcg@10").mean()
    row = next(line for line in text.splitlines() if line.startswith("| all |"))
    assert f"| {want:+.4f} |" in row and row.endswith("| A better |")
    cold = cold_mask(data.targets, training_items(shards))
    assert 0 < cold.sum() < 30  # MovieLens has a few cold test targets: too few to judge
    assert f"| cold | {int(cold.sum())} |" in text and "not judged" in text
    assert "selected: stage 2 (content)" in text
    reverse = compare.main([str(b), str(a), "--bootstrap", "200"])
    assert next(line for line in reverse.splitlines() if line.startswith("| all |")).endswith("| B better |")


def test_stage_and_popularity_ranks(runs):
    a, b, *_ = runs
    text = compare.main([f"{a}:stage1", f"{b}:popularity", "--bootstrap", "100"])
    assert "stage 1 (free_head)" in text and "| popularity |" in text
    assert next(line for line in text.splitlines() if line.startswith("| all |")).endswith("no clear difference |")


def test_bad_inputs_say_what_to_do(runs, tmp_path):
    a, b, good, _, data, shards = runs
    with pytest.raises(SystemExit, match="no metrics.json"):
        compare.main([str(tmp_path), str(b)])
    with pytest.raises(SystemExit, match="unknown model 'stage7'.*stage1, stage2, or popularity"):
        compare.main([f"{a}:stage7", str(b)])
    with pytest.raises(SystemExit, match="missing"):
        compare.main([f"{b}:stage1", str(a)])
    other = _fake_run(tmp_path / "other", shards, {"test_ranks": good[:-1]}, data.users[:-1], data.targets[:-1])
    with pytest.raises(SystemExit, match="different test users"):
        compare.main([str(a), str(other)])


def test_reciprocal_rank_and_median_rank(runs):
    """`--metric mrr` judges 1/rank; each run's row carries its median target rank beside the random median."""
    a, b, good, bad, data, shards = runs
    text = compare.main([str(a), str(b), "--metric", "mrr", "--bootstrap", "200"])
    want = (1.0 / good).mean() - (1.0 / bad).mean()
    assert f"| all | {len(good)} | {want:+.4f} |" in text
    num_items = json.loads((shards / "manifest.json").read_text())["num_items"]
    assert f"a random ranking puts the median target near rank {num_items // 2}" in text
    row_a = next(line for line in text.splitlines() if line.startswith(f"| {a} |"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    assert cells[2:5] == [f"{per_user_gain(good, 'hr@10').mean():.4f}", f"{(1.0 / good).mean():.4f}",
                          f"{np.median(good):.0f}"]
    cold = cold_mask(data.targets, training_items(shards))
    assert cells[-1] == f"{np.median(good[cold]):.0f}"


def test_runs_made_in_another_checkout_take_shards(runs, tmp_path):
    """A run records its shards' absolute path; moved from another checkout, --shards names the same build here."""
    a, b, good, bad, data, shards = runs
    moved = tmp_path / "elsewhere" / shards.name
    c = _fake_run(tmp_path / "c", moved, {"test_ranks": good}, data.users, data.targets)
    with pytest.raises(SystemExit, match="pass --shards DIR"):
        compare.main([str(c), str(b), "--bootstrap", "50"])
    assert compare.main([str(c), str(b), "--bootstrap", "50", "--shards", str(shards)]) == \
        compare.main([str(a), str(b), "--bootstrap", "50"]).replace(str(a), str(c))
    wrong = tmp_path / "other-build"
    wrong.mkdir()
    with pytest.raises(SystemExit, match="is not the build"):
        compare.main([str(c), str(b), "--shards", str(wrong)])
