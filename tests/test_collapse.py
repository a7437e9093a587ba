"""The user-vector collapse probe: its statistics against plain computations, on an export of a tiny run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from transrec.trainer.commands.collapse import main
from transrec.trainer.evaluation.collapse_diagnostics import (
    COLLAPSE_COSINE,
    COLLAPSE_SAME_TOP10,
    collapse_warning,
    effective_rank,
    mean_pairwise_cosine,
    mean_share,
    same_top_k_share,
    spread_report,
    top_k_lists,
    user_vector_health,
)


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


def rotation(d: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)).double())[0]


def test_effective_rank_of_rows_with_known_singular_values():
    """Centred rows on a line have one singular value; +-e_i have d equal ones; +-2e_1, +-e_2, +-e_3 (rotated and
    shifted) have singular values in the ratio 2:1:1, so p = (1/2, 1/4, 1/4) and exp(H) = 2^1.5."""
    t = torch.tensor([0.0, 1.0, 2.0, 5.0, -3.0]).double()
    line = torch.tensor([4.0, -1.0, 0.5]).double() + t[:, None] * torch.tensor([1.0, 2.0, 3.0]).double()
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-9)
    basis = torch.eye(4).double()
    assert effective_rank(torch.cat([basis, -basis])) == pytest.approx(4.0, abs=1e-9)
    rows = torch.cat([torch.diag(torch.tensor([2.0, 1.0, 1.0])), -torch.diag(torch.tensor([2.0, 1.0, 1.0]))])
    rows = rows.double() @ rotation(3, 0) + torch.tensor([7.0, -2.0, 0.3]).double()
    p = [0.5, 0.25, 0.25]
    assert effective_rank(rows) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), abs=1e-9)
    assert effective_rank(rows) == pytest.approx(2 ** 1.5, abs=1e-9)
    assert effective_rank(torch.full((5, 3), 0.1)) == 0.0
    assert effective_rank(torch.zeros(4, 2)) == 0.0


def test_same_top_k_share_counts_ordered_lists_with_ties_by_index():
    items = torch.eye(3)  # a user's scores are its own coordinates
    three_of_four = torch.tensor([[3.0, 2.0, 1.0], [5.0, 4.0, 0.0], [1.0, 0.5, 0.0], [2.0, 3.0, 0.0]])
    assert same_top_k_share(three_of_four, items, k=2) == 0.75  # the last one's list is [1, 0]: same set, not order
    assert same_top_k_share(three_of_four, items, k=1) == 0.75
    assert same_top_k_share(torch.tensor([[1.0, 2.0, 3.0]]).repeat(5, 1), items, k=2) == 1.0
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    assert top_k_lists(ties, 2).tolist() == [[0, 1], [0, 1], [0, 1], [1, 2]]
    assert same_top_k_share(ties, torch.eye(4), k=2) == 0.75
    with pytest.raises(ValueError, match="at least 1"):
        same_top_k_share(ties, torch.eye(4), k=0)


def test_user_vector_health_equals_its_parts():
    g = torch.Generator().manual_seed(1)
    users, items = torch.randn(9, 5, generator=g), torch.randn(12, 5, generator=g)
    health = user_vector_health(users, items, k=3)
    assert list(health) == ["users", "mean_pairwise_cosine", "mean_share", "effective_rank", "same_top3_share",
                            "score_std_over_items", "score_std_over_users"]
    assert health["users"] == 9
    assert health["mean_pairwise_cosine"] == mean_pairwise_cosine(users)
    assert health["mean_share"] == mean_share(users)
    assert health["effective_rank"] == effective_rank(users)
    assert health["same_top3_share"] == same_top_k_share(users, items, k=3)
    scores = users.double() @ items.double().T
    assert health["score_std_over_items"] == pytest.approx(float(scores.std(dim=1).mean()), abs=1e-12)
    assert health["score_std_over_users"] == pytest.approx(float(scores.std(dim=0).mean()), abs=1e-12)
    assert "same_top10_share" in user_vector_health(users, items)
    with pytest.raises(ValueError, match="at least 2 users"):
        user_vector_health(users[:1], items)


def test_collapse_warning_names_the_figure_past_its_threshold():
    healthy = {"mean_pairwise_cosine": 0.84, "same_top10_share": 0.49}
    assert collapse_warning(healthy) is None
    cosine = collapse_warning({**healthy, "mean_pairwise_cosine": 0.93})
    assert "mean pairwise cosine 0.93 >= 0.85" in cosine and "same top-10" not in cosine
    assert "init_reset" in cosine and "python -m transrec.trainer.commands.collapse" in cosine
    same_list = collapse_warning({**healthy, "same_top10_share": 0.8})
    assert "same top-10 list 0.80 >= 0.5" in same_list and "cosine" not in same_list
    at_both = collapse_warning({"mean_pairwise_cosine": COLLAPSE_COSINE, "same_top10_share": COLLAPSE_SAME_TOP10})
    assert "cosine 0.85 >= 0.85" in at_both and "list 0.50 >= 0.5" in at_both


def test_spread_report_matches_the_model_user_vectors(source_run, ml_shards, tmp_path, capsys):
    """The report's last block equals the user vector (no side features), and every figure equals a recount from
    the ranker's own user and item vectors for the same seeded users."""
    from transrec.trainer.evaluation.eval_users import eval_users
    from transrec.trainer.evaluation.model_ranker import ranker_from_export

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
    assert report["effective_rank"] == pytest.approx(effective_rank(users), rel=1e-9)
    assert report["same_top10_share"] == same_top_k_share(users, items)

    out = tmp_path / "collapse.json"
    main(["--export", str(source_run / "export"), "--shards", str(ml_shards), "--users", "40", "--seed", "3",
          "--out", str(out), "--device", "cpu"])
    assert json.loads(out.read_text())["layers"] == json.loads(json.dumps(layers))
    printed = capsys.readouterr().out
    assert "| user vector |" in printed
    assert f"effective rank {report['effective_rank']:.2f}" in printed
    assert f"top-10 list {report['same_top10_share']:.3f}" in printed
    with pytest.raises(SystemExit):
        main(["--export", str(source_run / "export"), "--shards", str(ml_shards), "--users", "1"])
