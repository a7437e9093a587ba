"""A target's recent popularity as a training-free prior: popularity dynamics on a catalogue no model saw.

PrepRec (2024) reports that an item's recent-popularity trajectory transfers zero-shot across domains where static
popularity does not. Here it is the simplest, parameter-free form, computed on the target itself: for a user evaluated
at time t (its target's timestamp), an item's recent count is the number of interactions with that item, by any user,
on the days before t's day and within `window` days of it. Day resolution: nothing of t's own day counts, so neither
the target itself nor anything after it that day leaks in. Other users' interactions count whatever their split, as a
live platform would know them at t (static popularity counts training portions only; both are reported).

Rows (each chosen on the target's validation split, never on test):
- recent popularity: log(1 + recent count), ties broken by static popularity, the window from WINDOWS;
- zero-shot + recent prior, content baseline + recent prior: the export's user . item score (or the history mean's
  cosine) + beta x log(1 + recent count), the window and beta = g x (spread of the scores / spread of the prior) from
  WINDOWS x GRID.
"""

from __future__ import annotations

import numpy as np
import torch

from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.evaluation.eval_users import known_before
from transrec.trainer.evaluation.scoring import BETA_GRID, mean_history_vector, unit

DAY = 86400.0
WINDOWS = (7, 30, 90, 365)  # days
GRID = BETA_GRID  # the static prior's grid (trainer/evaluation/scoring.py)


class RecentCounts:
    """Interactions per item per day of a catalogue's whole log, cumulated: counts(times, window) in O(B x V)."""

    def __init__(self, sequences, num_items: int):
        days, items = [], []
        for s in sequences:
            days.append(np.floor(np.asarray(s["timestamps"], dtype=np.float64) / DAY).astype(np.int64))
            items.append(np.asarray(s["items"], dtype=np.int64))
        day, item = np.concatenate(days), np.concatenate(items)
        self.first = int(day.min())
        per_day = np.zeros((int(day.max()) - self.first + 2, num_items), dtype=np.int32)
        np.add.at(per_day, (day - self.first + 1, item), 1)
        self.cum = np.cumsum(per_day, axis=0)  # cum[k, i]: interactions with item i on days before first + k

    def __call__(self, times: np.ndarray, window: int) -> np.ndarray:
        """[B, V]: per user time (seconds), each item's interactions on the `window` days before that day."""
        k = np.clip(np.floor(np.asarray(times, dtype=np.float64) / DAY).astype(np.int64) - self.first, 0,
                    len(self.cum) - 1)
        return self.cum[k] - self.cum[np.clip(k - window, 0, None)]


def target_times(sequences, split: str) -> dict[int, float]:
    """{user: timestamp of its `split` target} of the evaluated users."""
    out = {}
    for s in sequences:
        if s["evaluated"]:
            out[int(s["user"])] = float(s["timestamps"][known_before(s, split)])
    return out


def _ranks(base_fn, recent: RecentCounts, times: dict[int, float], data: ev.EvalUsers, window: int, beta: float,
           num_items: int, exclude_seen: bool) -> np.ndarray:
    def score(hist, chunk):
        prior = torch.as_tensor(np.log1p(recent(np.asarray([times[int(u)] for u in chunk.users]), window)),
                                dtype=torch.float64)
        return base_fn(hist, chunk).double() + beta * prior

    return ev.rank_with_scores(score, num_items, data, exclude_seen)


def _spread(base_fn, recent: RecentCounts, times: dict[int, float], data: ev.EvalUsers, window: int) -> float:
    """The mean per-user spread of the base scores over that of the prior (first 256 users): beta = g x this."""
    chunk = data.take(np.arange(min(256, len(data))))
    base = base_fn(torch.as_tensor(chunk.histories), chunk).double()
    prior = np.log1p(recent(np.asarray([times[int(u)] for u in chunk.users]), window))
    b, p = float(base.std(1).mean()), float(prior.std(1).mean())
    return b / p if b > 0 and p > 0 else 1.0


def recent_rows(user_fn, item_vectors: torch.Tensor, sequences, valid: ev.EvalUsers, test: ev.EvalUsers,
                counts_valid: np.ndarray, counts_test: np.ndarray, metric: str = "ndcg@10",
                exclude_seen: bool = True) -> dict[str, dict]:
    """The three rows of the module docstring: validation metrics, the chosen window and beta, test ranks.
    `user_fn(hist, chunk)`: the export's user vectors."""
    num_items = len(item_vectors)
    recent = RecentCounts(sequences, num_items)
    times = {split: target_times(sequences, split) for split in ("valid", "test")}
    iv, unit_iv = item_vectors.float(), unit(item_vectors.float())
    static = {"valid": ev.popularity_scores(counts_valid), "test": ev.popularity_scores(counts_test)}

    def bases(split: str) -> dict:
        tiebreak = 1e-3 * torch.log1p(static[split]).float()
        return {"recent popularity": lambda hist, chunk: tiebreak[None].expand(len(hist), -1),
                "zero-shot + recent prior": lambda hist, chunk: user_fn(hist, chunk).float() @ iv.T,
                "content baseline + recent prior": lambda hist, chunk: mean_history_vector(iv, hist) @ unit_iv.T}

    out = {}
    for name in bases("valid"):
        base_v, base_t = bases("valid")[name], bases("test")[name]
        best = None
        for window in WINDOWS:
            scale = 1.0 if name == "recent popularity" else _spread(base_v, recent, times["valid"], valid, window)
            for g in (1.0,) if name == "recent popularity" else GRID:
                ranks = _ranks(base_v, recent, times["valid"], valid, window, g * scale, num_items, exclude_seen)
                value = float(ev.per_user_gain(ranks, metric).mean())
                if best is None or value > best[0]:
                    best = (value, window, g, g * scale, ranks)
        _, window, g, beta, valid_ranks = best
        test_ranks = _ranks(base_t, recent, times["test"], test, window, beta, num_items, exclude_seen)
        out[name] = {"valid": ev.metrics_from_ranks(valid_ranks), "test": ev.metrics_from_ranks(test_ranks),
                     "test_ranks": test_ranks.tolist(), "window_days": window, "g": g, "beta": beta}
    return out
