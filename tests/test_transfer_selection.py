"""transfer=auto never keeps a model that validates below popularity or the training-free content baseline: on
synthetic catalogues built so that each of popularity, the content baseline and the export's own user encoder is the
one that ranks the validation targets, the selection (transfer_report.select over the training-free candidates of
transfer_free.score_candidate) keeps exactly that one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transrec.trainer.core.config import TRANSFER_CANDIDATES
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.transfer.selection import select
from transrec.trainer.transfer.training_free import score_candidate

V, D, USERS, L = 80, 8, 120, 6
FREE = [c for c in TRANSFER_CANDIDATES if c in ("start", "popularity", "content", "prior")]


def users(histories: np.ndarray, targets: np.ndarray) -> ev.EvalUsers:
    return ev.EvalUsers(np.arange(len(targets)), histories, targets,
                        ev.Ragged.from_rows([np.unique(h[h >= 0]).astype(np.int32) for h in histories]))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def best_unseen(scores: torch.Tensor, histories: np.ndarray) -> np.ndarray:
    """Each user's highest-scoring item outside their history."""
    s = scores.clone()
    for u, h in enumerate(histories):
        s[u, torch.as_tensor(h[h >= 0])] = -float("inf")
    return s.argmax(1).numpy()


def case(winner: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    iv = torch.randn(V, D, generator=g)
    mix = torch.randn(D, D, generator=g)  # the "user encoder": a fixed map of the history's last item

    def model_user(hist, chunk=None):
        return iv[hist[:, -1].clamp(min=0)] @ mix

    counts = rng.permutation(V).astype(np.float64) * 3  # distinct counts: popularity has no ties
    hist = np.stack([rng.choice(V, L, replace=False) for _ in range(2 * USERS)])
    if winner == "popularity":
        order = np.argsort(-counts)
        targets = np.array([next(i for i in order if i not in h) for h in hist])
    elif winner == "content":
        mean = unit(unit(iv)[torch.as_tensor(hist)].sum(1))
        targets = best_unseen(mean @ unit(iv).T, hist)
    else:  # the export's user encoder
        targets = best_unseen(model_user(torch.as_tensor(hist)) @ iv.T, hist)
    valid, test = users(hist[:USERS], targets[:USERS]), users(hist[USERS:], targets[USERS:])
    return model_user, iv, valid, test, counts


@pytest.mark.parametrize("winner", ["popularity", "content", "start"])
def test_selection_keeps_the_candidate_that_ranks_the_targets(winner):
    model_user, iv, valid, test, counts = case(winner)
    records, valid_ranks = {}, {}
    for name in FREE:
        scoring, v_ranks, t_ranks, grid = score_candidate(name, model_user, iv, valid, test, counts, counts, True,
                                                          "ndcg@10")
        valid_ranks[name] = v_ranks
        records[name] = {"status": "done", "valid": ev.metrics_from_ranks(v_ranks), "scoring": scoring}
    chosen = select(records, "ndcg@10")
    assert chosen == winner, {n: round(r["valid"]["ndcg@10"], 4) for n, r in records.items()}
    # the winner ranks every validation target first; the others do not
    assert (valid_ranks[winner] == 1).all()
    assert all((valid_ranks[n] > 1).any() for n in {"start", "popularity"} - {winner})
    best_floor = max(records["popularity"]["valid"]["ndcg@10"], records["content"]["valid"]["ndcg@10"])
    assert records[chosen]["valid"]["ndcg@10"] >= best_floor


def test_prior_candidate_recovers_popularity_on_top_of_a_useless_model():
    """Targets follow popularity, the model is noise: the prior's beta is chosen > 0 and its validation equals
    popularity's (it ranks by count once beta dominates), while the start alone is far below."""
    model_user, iv, valid, test, counts = case("popularity")
    out = {n: score_candidate(n, model_user, iv, valid, test, counts, counts, True, "ndcg@10") for n in
           ("start", "prior", "popularity")}
    assert out["prior"][0].prior_beta > 0
    nd = {n: ev.metrics_from_ranks(v[1])["ndcg@10"] for n, v in out.items()}
    assert nd["prior"] == pytest.approx(nd["popularity"])
    assert nd["start"] < nd["popularity"] / 2


def test_selection_never_below_the_floor_on_mixed_signal():
    """Targets half from popularity, half from the content baseline: whatever is chosen validates at least as well as
    the better of popularity and the content baseline."""
    m1, iv, v_pop, t_pop, counts = case("popularity", seed=3)
    _, _, v_con, _, _ = case("content", seed=3)
    half = USERS // 2
    targets = np.concatenate([v_pop.targets[:half], v_con.targets[half:]])
    hist = np.concatenate([v_pop.histories[:half], v_con.histories[half:]])
    valid = users(hist, targets)
    records = {}
    for name in FREE:
        _, v_ranks, _, _ = score_candidate(name, m1, iv, valid, t_pop, counts, counts, True, "ndcg@10")
        records[name] = {"status": "done", "valid": ev.metrics_from_ranks(v_ranks)}
    chosen = select(records, "ndcg@10")
    floor = max(records["popularity"]["valid"]["ndcg@10"], records["content"]["valid"]["ndcg@10"])
    assert records[chosen]["valid"]["ndcg@10"] >= floor
