"""The user-vector collapse probe: its statistics against plain computations, on an export of a tiny run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from transrec.trainer.collapse import main
from transrec.trainer.collapse_diagnostics import mean_pairwise_cosine, mean_share, spread_report


def test_mean_pairwise_cosine_and_mean_share_by_hand():
    assert mean_pairwise_cosine(torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.5, 0.0]])) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(1 / math.sqrt(2))
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).double()
    unit = x / x.norm(dim=-1, keepdim=True)
    pairs = [float(unit[i] @ unit[j]) for i, j in itertools.permutations(range(7), 2)]
    assert mean_pairwise_cosine(x) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert mean_share(torch.tensor([[1.0, 2.0], [1.0, 2.0]])) == pytest.approx(1.0)
    assert mean_share(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])) == pytest.approx(0.0)
    assert mean_share(x) == pytest.approx(float(x.mean(0).pow(2).sum() / x.pow(2).sum(-1).mean()), abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 rows"):
        mean_pairwise_cosine(torch.ones(1, 3))


def test_spread_report_matches_the_model_user_vectors(source_run, ml_shards, tmp_path, capsys):
    """The report's last block equals the user vector (no side features), and every figure equals a recount from
    the ranker's own user and item vectors for the same seeded users."""
    from transrec.trainer.eval_data import eval_users
    from transrec.trainer.model_eval import ranker_from_export

    ranker = ranker_from_export(source_run / "export", ml_shards, "cpu", show_progress=False)
    report = spread_report(ranker, "valid", users=40, seed=3)
    layers = report["layers"]
    assert list(layers) == ["input", "block 0", "user vector"]  # the tiny preset's encoder has one block
    assert report["users"] == 40 and report["items"] == ranker.store.num_items

    data = eval_users(ranker.sequences, "valid", ranker.model.cfg.max_len)
    take = np.sort(np.random.default_rng(3).choice(len(data), 40, replace=False))
    items = ranker.item_vectors()
    users = ranker.user_vectors(items, torch.as_tensor(data.take(take).histories))
    assert layers["user vector"]["mean_pairwise_cosine"] == pytest.approx(mean_pairwise_cosine(users), abs=1e-6)
    assert layers["block 0"] == layers["user vector"]
    assert layers["user vector"]["mean_norm"] == pytest.approx(float(users.norm(dim=-1).mean()), rel=1e-6)
    assert layers["input"]["mean_pairwise_cosine"] != pytest.approx(layers["user vector"]["mean_pairwise_cosine"])
    scores = users @ items.T
    assert report["score_std_over_items"] == pytest.approx(float(scores.std(dim=1).mean()), rel=1e-5)
    assert report["score_std_over_users"] == pytest.approx(float(scores.std(dim=0).mean()), rel=1e-5)
    assert report["item_vectors"]["mean_share"] == pytest.approx(mean_share(items), abs=1e-9)

    out = tmp_path / "collapse.json"
    main(["--export", str(source_run / "export"), "--shards", str(ml_shards), "--users", "40", "--seed", "3",
          "--out", str(out), "--device", "cpu"])
    assert json.loads(out.read_text())["layers"] == json.loads(json.dumps(layers))
    assert "| user vector |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--export", str(source_run / "export"), "--shards", str(ml_shards), "--users", "1"])
