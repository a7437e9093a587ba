"""Scoring an export's item vectors (trainer/evaluation/scoring.py): the user side (model / mean of history / none) and
the popularity prior against scores computed independently in numpy; exact ranks against a brute-force count; the
prior's beta chosen on validation; the Scoring record's validation and its file in an export."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from transrec.trainer.core.checkpoint import CHECKPOINT_HASHES, IntegrityError, verify_hashes
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.evaluation import scoring as sc
from transrec.trainer.evaluation.eval_users import EvalUsers, Ragged

V, D, L = 30, 6, 5


def make_users(rng: np.random.Generator, n_users: int, num_items: int, max_len: int = L, lengths=None,
               targets=None) -> EvalUsers:
    """Users with left-padded histories of distinct items, a target outside the history (unless given) and
    seen = the history's distinct items."""
    hist = np.full((n_users, max_len), -1, dtype=np.int64)
    seen, tg = [], []
    for i in range(n_users):
        n = int(rng.integers(1, max_len + 1)) if lengths is None else lengths[i]
        items = rng.choice(num_items, size=n + 1, replace=False)
        h, t = items[:n], int(items[n]) if targets is None else int(targets[i])
        if n:
            hist[i, max_len - n :] = h
        seen.append(np.unique(h).astype(np.int32))
        tg.append(t)
    return EvalUsers(np.arange(100, 100 + n_users, dtype=np.int64), hist, np.asarray(tg, dtype=np.int64),
                     Ragged.from_rows(seen))


def user_table(rng: np.random.Generator, data: EvalUsers, d: int = D) -> tuple[np.ndarray, object]:
    """A "model" user encoder for the test: one fixed random vector per user id (float64 numpy, and the
    model_user(hist, chunk) callable scoring.py takes)."""
    table = {int(u): rng.normal(size=d) for u in data.users}

    def model_user(hist: torch.Tensor, chunk: EvalUsers) -> torch.Tensor:
        assert len(hist) == len(chunk)
        return torch.tensor(np.stack([table[int(u)] for u in chunk.users]), dtype=torch.float32)

    return np.stack([table[int(u)] for u in data.users]), model_user


def np_mean_user(iv: np.ndarray, hist_row: np.ndarray) -> np.ndarray:
    """Unit mean of the unit vectors of the real history items (zero when none)."""
    items = hist_row[hist_row >= 0]
    if len(items) == 0:
        return np.zeros(iv.shape[1])
    unit = iv[items] / np.linalg.norm(iv[items], axis=1, keepdims=True)
    m = unit.mean(0)
    return m / np.linalg.norm(m)


def np_scores(user: str, beta: float, iv: np.ndarray, data: EvalUsers, model_u: np.ndarray,
              counts: np.ndarray) -> np.ndarray:
    """[U, V] float64: the content score of `user` + beta * log1p(count)."""
    if user == "model":
        content = model_u @ iv.T
    elif user == "mean":
        unit_items = iv / np.linalg.norm(iv, axis=1, keepdims=True)
        content = np.stack([np_mean_user(iv, h) for h in data.histories]) @ unit_items.T
    else:
        content = np.zeros((len(data), len(iv)))
    return content + beta * np.log1p(counts.astype(np.float64))[None]


def brute_ranks(scores: np.ndarray, data: EvalUsers, exclude_seen: bool, margin: float | None = 1e-4) -> np.ndarray:
    """1 + #{items v != target, not excluded: s_v >= s_target}, one user at a time. `margin`: the designed data must
    keep every score this far from the target's (a float32 rounding then cannot flip a comparison)."""
    out = []
    for i, t in enumerate(data.targets):
        s = scores[i]
        allowed = np.ones(len(s), dtype=bool)
        allowed[t] = False
        if exclude_seen:
            allowed[[v for v in data.seen[i] if v != t]] = False
        if margin is not None:
            gaps = np.abs(s[allowed] - s[t])
            assert gaps.min() > margin, "test data too close to a tie: choose another seed"
        out.append(1 + int((s[allowed] >= s[t]).sum()))
    return np.asarray(out)


def np_ndcg10(ranks: np.ndarray) -> float:
    return float(np.mean([1.0 / math.log2(r + 1) if r <= 10 else 0.0 for r in ranks]))


@pytest.fixture
def world():
    rng = np.random.default_rng(7)
    iv = rng.normal(size=(V, D))
    data = make_users(rng, 9, V)
    model_u, model_user = user_table(rng, data)
    counts = rng.integers(0, 60, size=V)
    return iv, data, model_u, model_user, counts


# -- the item and user sides ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["model", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_scores_are_content_plus_prior(world, user, beta):
    iv, data, model_u, model_user, counts = world
    scoring = sc.Scoring(user, beta)
    items = sc.scored_items(torch.tensor(iv, dtype=torch.float32), scoring, counts)
    hist = torch.as_tensor(data.histories)
    u = sc.user_side(scoring, lambda h: model_user(h, data), torch.tensor(iv, dtype=torch.float32), hist)
    assert items.shape == (V, D + (1 if beta else 0)) and u.shape == (len(data), D + (1 if beta else 0))
    got = (u @ items.T).double().numpy()
    want = np_scores(user, beta, iv, data, model_u, counts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_content_scores_the_prior_alone(world):
    iv, data, _, model_user, counts = world
    scoring = sc.Scoring("none", 2.5)
    items = sc.scored_items(torch.tensor(iv, dtype=torch.float32), scoring, counts)
    u = sc.user_side(scoring, model_user, torch.tensor(iv, dtype=torch.float32), torch.as_tensor(data.histories))
    assert items.shape == (V, 1) and u.shape == (len(data), 1)
    np.testing.assert_allclose((u @ items.T).numpy(), np.tile(2.5 * np.log1p(counts), (len(data), 1)), rtol=1e-6)


def test_prior_needs_counts_for_every_item(world):
    iv = torch.tensor(world[0], dtype=torch.float32)
    with pytest.raises(ValueError, match="interaction counts"):
        sc.scored_items(iv, sc.Scoring("model", 1.0), None)
    with pytest.raises(ValueError, match="interaction counts"):
        sc.scored_items(iv, sc.Scoring("model", 1.0), np.ones(V - 1))
    assert sc.scored_items(iv, sc.Scoring("model", 0.0), None).shape == (V, D)  # no prior: no counts needed


def test_empty_history_is_zero_and_ranks_by_the_prior():
    rng = np.random.default_rng(3)
    iv = rng.normal(size=(V, D))
    data = make_users(rng, 4, V, lengths=[0, 2, 0, 3])
    mean = sc.mean_history_vector(torch.tensor(iv, dtype=torch.float32), torch.as_tensor(data.histories))
    assert torch.equal(mean[0], torch.zeros(D)) and torch.equal(mean[2], torch.zeros(D))
    for i in (1, 3):  # the others: the unit mean of their unit item vectors
        np.testing.assert_allclose(mean[i].numpy(), np_mean_user(iv, data.histories[i]), rtol=1e-5, atol=1e-6)
    counts = rng.permutation(V) * 3  # distinct counts: the prior alone orders every item
    ranks = sc.scoring_ranks(None, torch.tensor(iv, dtype=torch.float32), data, sc.Scoring("mean", 0.5), counts,
                             exclude_seen=True)
    for i in (0, 2):  # no history: rank = 1 + the items with a larger count (nothing seen to exclude)
        assert ranks[i] == 1 + int((counts > counts[data.targets[i]]).sum())


# -- exact ranks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_seen", [True, False])
@pytest.mark.parametrize("user,beta", [("model", 0.0), ("mean", 0.0), ("model", 0.4), ("mean", 0.05)])
def test_scoring_ranks_equal_brute_force(user, beta, exclude_seen):
    rng = np.random.default_rng(11)
    iv = rng.normal(size=(V, D))
    data = make_users(rng, 12, V)
    # one user whose target is also an earlier item: it must stay in the ranking (never excluded)
    data.targets[5] = int(data.histories[5, -1])
    model_u, model_user = user_table(rng, data)
    counts = rng.integers(0, 40, size=V)
    ranks = sc.scoring_ranks(model_user, torch.tensor(iv, dtype=torch.float32), data, sc.Scoring(user, beta), counts,
                             exclude_seen, user_batch=5)
    want = brute_ranks(np_scores(user, beta, iv, data, model_u, counts), data, exclude_seen)
    np.testing.assert_array_equal(ranks, want)


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_popularity_alone_is_evaluate_popularity(world, exclude_seen):
    iv, data, _, model_user, _ = world
    counts = np.random.default_rng(5).permutation(V) * 2  # distinct: ties cannot matter
    ranks = sc.scoring_ranks(model_user, torch.tensor(iv, dtype=torch.float32), data, sc.Scoring("none", 1.0),
                             counts, exclude_seen)
    np.testing.assert_array_equal(ranks, ev.popularity_ranks(counts, data, exclude_seen))
    want = brute_ranks(counts[None].repeat(len(data), 0).astype(float), data, exclude_seen)
    np.testing.assert_array_equal(ranks, want)


# -- choosing the prior's beta ----------------------------------------------------------------------------------------


def np_scale(user_vecs: np.ndarray, item_vecs: np.ndarray, counts: np.ndarray) -> float:
    """prior_scale's definition: mean over users of the (sample) std of their content scores over the items,
    over the (population) std of log1p(count)."""
    content = (user_vecs @ item_vecs.T).std(1, ddof=1).mean()
    return float(content / np.log1p(counts).std())


def test_choose_prior_takes_popularity_when_targets_are_popular():
    rng = np.random.default_rng(21)
    n_items, popular = 60, 6
    iv = rng.normal(size=(n_items, D))
    counts = np.concatenate([rng.integers(200, 400, size=popular), rng.integers(0, 20, size=n_items - popular)])
    # every target is one of the popular items, never one of the user's earlier (unpopular) items
    hist_rng = np.random.default_rng(22)
    n_users = 30
    data = make_users(hist_rng, n_users, n_items, targets=rng.integers(0, popular, size=n_users))
    for i in range(n_users):  # histories from the unpopular items only
        h = hist_rng.choice(np.arange(popular, n_items), size=L, replace=False)
        data.histories[i] = h
    data.seen = Ragged.from_rows([np.unique(h) for h in data.histories])
    model_u, model_user = user_table(rng, data)

    choice = sc.choose_prior(model_user, torch.tensor(iv, dtype=torch.float32), data, "model", counts,
                             exclude_seen=True, user_batch=7)
    scale = np_scale(model_u, iv, counts)
    assert choice.scale == pytest.approx(scale, rel=1e-4)
    values = []
    for g in sc.BETA_GRID:
        ranks = brute_ranks(np_scores("model", g * scale, iv, data, model_u, counts), data, True, margin=None)
        values.append(np_ndcg10(ranks))
    best = int(np.argmax(values))  # the first of equal values
    assert best > 0 and choice.scoring.prior_beta > 0
    assert choice.scoring == sc.Scoring("model", sc.BETA_GRID[best] * choice.scale)
    assert [row["ndcg@10"] for row in choice.table] == pytest.approx(values, abs=1e-9)
    assert choice.table[best]["ndcg@10"] == pytest.approx(max(values), abs=1e-9)
    assert values[best] > values[0] + 0.1  # the prior really helps here: the test can tell
    want = brute_ranks(np_scores("model", choice.scoring.prior_beta, iv, data, model_u, counts), data, True,
                       margin=None)
    np.testing.assert_array_equal(choice.ranks, want)


def test_choose_prior_keeps_zero_when_popularity_misleads():
    rng = np.random.default_rng(31)
    n_items = 40
    iv = rng.normal(size=(n_items, D))
    data = make_users(rng, 15, n_items)
    model_u, model_user = user_table(rng, data)
    # each target: the unseen item the model scores highest
    for i in range(len(data)):
        s = model_u[i] @ iv.T
        s[data.seen[i]] = -np.inf
        data.targets[i] = int(np.argmax(s))
    targets = set(data.targets.tolist())
    # adversarial counts: items that are never a target are the popular ones
    counts = np.array([0 if v in targets else 1000 + v for v in range(n_items)])
    choice = sc.choose_prior(model_user, torch.tensor(iv, dtype=torch.float32), data, "model", counts,
                             exclude_seen=True)
    assert choice.scoring == sc.Scoring("model", 0.0)
    np.testing.assert_array_equal(choice.ranks, np.ones(len(data)))
    assert choice.table[0]["g"] == 0.0 and choice.table[0]["ndcg@10"] == 1.0
    assert choice.table[-1]["ndcg@10"] < 1.0  # a large prior does hurt: 0 wins on merit, not by default


# -- the Scoring record and its file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("user,beta", [("model", 0.0), ("mean", 0.0), ("mean", 3), ("none", 0.5), ("model", 1e-3)])
def test_scoring_accepts(user, beta):
    s = sc.Scoring(user, beta)
    assert sc.Scoring.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("user,beta,match", [
    ("knn", 0.0, "user vector"), ("", 1.0, "user vector"), ("model", -0.1, "prior_beta"),
    ("model", float("nan"), "prior_beta"), ("model", float("inf"), "prior_beta"), ("mean", True, "prior_beta"),
    ("model", "1", "prior_beta"), ("model", None, "prior_beta"), ("none", 0.0, "prior_beta > 0"),
])
def test_scoring_rejects(user, beta, match):
    with pytest.raises(ValueError, match=match):
        sc.Scoring(user, beta)


@pytest.mark.parametrize("d", [{"user": "model", "beta": 1.0}, {"user": "model", "prior_beta": 0, "x": 1},
                               ["model", 0.0], "model"])
def test_from_dict_rejects_unknown_keys(d):
    with pytest.raises(ValueError, match="expected"):
        sc.Scoring.from_dict(d)


def test_read_scoring_without_file(tmp_path):
    assert sc.read_scoring(tmp_path) == sc.Scoring()


def test_write_read_round_trip_and_hashes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    want = sc.Scoring("mean", 0.25)
    sc.write_scoring(tmp_path, want)
    assert sc.read_scoring(tmp_path) == want
    hashes = json.loads((tmp_path / CHECKPOINT_HASHES).read_text())
    assert hashes[sc.SCORING_FILE] == hashlib.sha256((tmp_path / sc.SCORING_FILE).read_bytes()).hexdigest()
    assert "model.safetensors" in hashes
    verify_hashes(tmp_path, "export", "restore it")
    # a second write (another beta) rewrites the hashes to cover the new file
    sc.write_scoring(tmp_path, sc.Scoring("none", 1.5))
    verify_hashes(tmp_path, "export", "restore it")
    assert sc.read_scoring(tmp_path) == sc.Scoring("none", 1.5)
    (tmp_path / sc.SCORING_FILE).write_text(json.dumps({"user": "model", "prior_beta": 9.0}))
    with pytest.raises(IntegrityError, match="scoring.json"):
        verify_hashes(tmp_path, "export", "restore it")


def test_read_scoring_rejects_bad_files(tmp_path):
    (tmp_path / sc.SCORING_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sc.read_scoring(tmp_path)
    (tmp_path / sc.SCORING_FILE).write_text(json.dumps({"user": "model", "beta": 1}))
    with pytest.raises(ValueError, match="scoring.json"):
        sc.read_scoring(tmp_path)


def test_a_scoring_file_added_after_the_export_is_refused(tmp_path):
    """scoring.json changes the ranking: one copied into an export by hand (not in its files.sha256.json) is refused."""
    from transrec.data_shards.integrity import IntegrityError
    from transrec.trainer.core.checkpoint import write_checkpoint_hashes

    (tmp_path / "config.json").write_text("{}")
    write_checkpoint_hashes(tmp_path)
    (tmp_path / "scoring.json").write_text('{"user": "mean", "prior_beta": 0.5}')
    with pytest.raises(IntegrityError, match="not covered by"):
        sc.read_scoring(tmp_path)
    sc.write_scoring(tmp_path, sc.Scoring("mean", 0.5))
    assert sc.read_scoring(tmp_path) == sc.Scoring("mean", 0.5)


def test_prior_beta_must_fit_float32():
    with pytest.raises(ValueError, match="float32"):
        sc.Scoring("model", 1e39)
