"""How alike a model's user vectors are on a catalogue, layer by layer: the diagnosis of a collapsed user encoder
(the work of `python -m transrec.trainer.commands.collapse`, whose docstring defines the figures).
"""

from __future__ import annotations

import numpy as np
import torch

from transrec.trainer.evaluation.eval_users import eval_users

# Collapse thresholds, from RESULTS.md ("Why transfer across platforms fails"): the mean pairwise cosine of 500
# validation users' vectors was 0.24-0.72 in the runs that did not collapse (mostly 0.24-0.47) and 0.87-0.96 in the
# collapsed ones, so 0.85 lies between the two groups. Half the users shown one identical top-10 list is a
# popularity-like ranking whatever the cosine.
COLLAPSE_COSINE = 0.85
COLLAPSE_SAME_TOP10 = 0.5


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows of `x` [N, d] (N >= 2)."""
    if len(x) < 2:
        raise ValueError(f"mean pairwise cosine needs at least 2 rows, got {len(x)}")
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    total = unit.sum(0).pow(2).sum() - unit.pow(2).sum()  # sum over i != j of cos(x_i, x_j)
    return float(total / (len(x) * (len(x) - 1)))


def mean_share(x: torch.Tensor) -> float:
    """|mean row|^2 / mean |row|^2: 1 when all rows are equal, 0 when they cancel out."""
    x = x.double()
    return float(x.mean(0).pow(2).sum() / x.pow(2).sum(-1).mean())


def effective_rank(x: torch.Tensor) -> float:
    """The entropy effective rank (Roy & Vetterli 2007) of the rows of `x` [N, d] after centring: exp(H(p)) with
    p_k = s_k / sum(s) over the singular values s_k of the centred rows and H(p) = -sum p_k log p_k (0 log 0 = 0).
    It is 1 for rows on a line and d for isotropic rows; 0.0 when all rows are equal (nothing left after centring).
    Singular values below rounding error (numpy's matrix_rank tolerance, relative to the uncentred rows) count as 0."""
    x = x.double()
    tol = max(x.shape) * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(x, ord=2))
    s = torch.linalg.svdvals(x - x.mean(0))
    s = s[s > tol]
    if len(s) == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def top_k_lists(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k highest-scoring columns [N, min(k, columns)], best first; equal scores in column order."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return torch.sort(-scores, dim=1, stable=True).indices[:, :k]


def most_common_row_share(rows: torch.Tensor) -> float:
    """The share of the rows of `rows` [N, k] that equal its most common row."""
    return float(torch.unique(rows, dim=0, return_counts=True)[1].max() / len(rows))


def same_top_k_share(user_vectors: torch.Tensor, item_vectors: torch.Tensor, k: int = 10) -> float:
    """The share of users whose top-k item list (by user . item, best first, equal scores broken by the lower item
    index) equals the most common such list, as an ordered list: 1.0 when every user is shown the same list."""
    scores = user_vectors.double() @ item_vectors.double().T
    return most_common_row_share(top_k_lists(scores, k))


def user_vector_health(user_vectors: torch.Tensor, item_vectors: torch.Tensor, k: int = 10) -> dict:
    """How alike the user vectors [N >= 2, d] are on the catalogue `item_vectors` [M, d]: their mean pairwise cosine,
    mean share and effective rank, the share of users shown the most common top-k list (`same_top{k}_share`), and
    the score spreads: a user's score std over the items averaged over users, and an item's over the users averaged
    over items."""
    if len(user_vectors) < 2:
        raise ValueError(f"user-vector health needs at least 2 users, got {len(user_vectors)}")
    scores = user_vectors.double() @ item_vectors.double().T
    return {
        "users": len(user_vectors),
        "mean_pairwise_cosine": mean_pairwise_cosine(user_vectors),
        "mean_share": mean_share(user_vectors),
        "effective_rank": effective_rank(user_vectors),
        f"same_top{k}_share": most_common_row_share(top_k_lists(scores, k)),
        "score_std_over_items": float(scores.std(dim=1).mean()),
        "score_std_over_users": float(scores.std(dim=0).mean()),
    }


def collapse_warning(health: dict) -> str | None:
    """A message naming each figure of `health` (user_vector_health) at or past its collapse threshold and what to
    do about it; None when none is. `same_top10_share` is checked when present (health computed with k=10)."""
    crossed = []
    if health["mean_pairwise_cosine"] >= COLLAPSE_COSINE:
        crossed.append(f"mean pairwise cosine {health['mean_pairwise_cosine']:.2f} >= {COLLAPSE_COSINE}")
    if health.get("same_top10_share", 0.0) >= COLLAPSE_SAME_TOP10:
        crossed.append(f"share of users shown the same top-10 list {health['same_top10_share']:.2f} "
                       f">= {COLLAPSE_SAME_TOP10}")
    if not crossed:
        return None
    return (f"user vectors look collapsed: {'; '.join(crossed)}; check the learning rate, re-initialise a "
            "user-encoder block (init_reset), see python -m transrec.trainer.commands.collapse")


def last_position_states(ranker, items: torch.Tensor, hist: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last position's state after the user encoder's input normalisation and after each block (a transformer
    encoder), and the user vector (`ranker.user_vectors` of the left-padded histories `hist` over `items`); only the
    user vector for other encoders."""
    encoder = ranker.model.user_encoder
    states: dict[str, torch.Tensor] = {}
    hooks = []
    if hasattr(encoder, "ln") and hasattr(encoder, "blocks"):
        def keep(name):
            return lambda module, inputs, output: states.__setitem__(name, output[:, -1].float())

        hooks.append(encoder.ln.register_forward_hook(keep("input")))
        hooks += [block.register_forward_hook(keep(f"block {i}")) for i, block in enumerate(encoder.blocks)]
    try:
        states["user vector"] = ranker.user_vectors(items, hist)
    finally:
        for hook in hooks:
            hook.remove()
    return states


def spread_report(ranker, split: str = "valid", users: int = 500, seed: int = 0) -> dict:
    """The layer-by-layer cosines and shares, and the user vectors' effective rank, same-top-10 share and score
    spreads (user_vector_health), of `ranker`'s model (trainer.evaluation.model_ranker) on a seeded sample of `users` of
    the split's evaluated users (all of them when fewer)."""
    data = eval_users(ranker.sequences, split, ranker.model.cfg.max_len)
    if len(data) < 2:
        raise ValueError(f"the {split} split has {len(data)} evaluated users: at least 2 are needed")
    take = np.sort(np.random.default_rng(seed).choice(len(data), min(users, len(data)), replace=False))
    sample = data.take(take)
    with ranker.eval_mode():
        items = ranker.item_vectors()
        states = last_position_states(ranker, items, torch.as_tensor(sample.histories, device=items.device))
    health = user_vector_health(states["user vector"], items)
    return {
        "split": split,
        "users": len(take),
        "items": len(items),
        "layers": {name: {"mean_pairwise_cosine": mean_pairwise_cosine(s), "mean_share": mean_share(s),
                          "mean_norm": float(s.norm(dim=-1).mean())} for name, s in states.items()},
        "item_vectors": {"mean_pairwise_cosine": mean_pairwise_cosine(items), "mean_share": mean_share(items),
                         "mean_norm": float(items.norm(dim=-1).mean())},
        **{key: health[key] for key in ("effective_rank", "same_top10_share", "score_std_over_items",
                                        "score_std_over_users")},
    }
