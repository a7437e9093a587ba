"""The cross-catalogue study's own arithmetic: Spearman's correlation and the catalogue cut used by its diagnosis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.experiments.cross_catalogue import mean_user_vector, spearman, with_excluded


def pearson_of_average_ranks(a, b):
    def avg_ranks(x):
        x = np.asarray(x, dtype=float)
        return np.array([(x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])

    return float(np.corrcoef(avg_ranks(a), avg_ranks(b))[0, 1])


def test_spearman():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert spearman(a, -a**3) == pytest.approx(-1.0)
    ties = rng.integers(0, 4, size=50)  # many ties: average ranks
    assert spearman(a, ties) == pytest.approx(pearson_of_average_ranks(a, ties))
    assert np.isnan(spearman(a, np.ones(50)))


def test_with_excluded_cuts_the_catalogue_but_keeps_each_target():
    V = 12
    seen = [np.array([1, 2], dtype=np.int32), np.array([5], dtype=np.int32)]
    data = ev.EvalUsers(np.array([0, 1]), np.array([[-1, 1, 2], [-1, -1, 5]]), np.array([3, 7]),
                        ev.Ragged.from_rows(seen))
    drop = np.array([3, 4, 6, 7, 8])  # includes both users' targets
    cut = with_excluded(data, drop)
    scores = torch.arange(V, dtype=torch.float32).flip(0)[None].expand(2, V)  # item 0 scores highest
    ranks = ev.rank_with_scores(lambda h, c: scores[: len(h)], V, cut, exclude_seen=True)
    # user 0: target 3; items ranked above it, not excluded: 0 (1, 2 seen) -> rank 2
    # user 1: target 7; items above it not excluded: 0, 1, 2 (5 seen; 3, 4, 6 dropped) -> rank 4
    assert ranks.tolist() == [2, 4]


def test_mean_user_vector():
    data = ev.EvalUsers(np.arange(5), np.arange(15).reshape(5, 3), np.zeros(5, dtype=np.int64),
                        ev.Ragged.from_rows([np.zeros(0, dtype=np.int32)] * 5))
    got = mean_user_vector(lambda hist, chunk: hist.float(), data, batch=2)
    assert torch.allclose(got, torch.arange(15, dtype=torch.float32).reshape(5, 3).mean(0))
