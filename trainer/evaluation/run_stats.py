"""Statistics over runs' per-user test ranks: the warm / cold split and paired bootstrap comparisons.

Shared by `python -m transrec.trainer.commands.compare` (two runs) and the experiments' reports (rows of seeds). Cold
test targets
are items that occur in no user's training portion: only a model that scores items by content can rank them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transrec.data_shards.shard_io import read_sequences
from transrec.trainer.evaluation.ranking import paired_bootstrap, per_user_gain

SUBSETS = ("all", "warm", "cold")
MIN_JUDGED_USERS = 30  # a difference over fewer test users is reported as not judged
NOT_JUDGED = "not judged"
METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


def write_ranks(path: Path, users, targets, ranks) -> None:
    """A per-user ranks file (test_ranks*.tsv): user, target item, rank; read_ranks reads it back."""
    with open(path, "w") as f:
        f.write("user\ttarget_item\trank\n")
        f.writelines(f"{u}\t{t}\t{r}\n" for u, t, r in zip(users, targets, ranks))


def read_ranks(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, target items, ranks) from a run's test_ranks*.tsv."""
    data = np.loadtxt(path, dtype=np.int64, delimiter="\t", skiprows=1, ndmin=2)
    return data[:, 0], data[:, 1], data[:, 2]


def training_items(shards: Path) -> np.ndarray:
    """Every item that occurs in some user's training portion (items[:num_train])."""
    items = [np.asarray(s["items"][: s["num_train"]], dtype=np.int64) for s in read_sequences(shards)]
    return np.unique(np.concatenate(items)) if items else np.zeros(0, dtype=np.int64)


def cold_mask(targets: np.ndarray, train_items: np.ndarray) -> np.ndarray:
    """True where the test target never occurs in any user's training portion."""
    return ~np.isin(targets, train_items)


def subset_mask(cold: np.ndarray, subset: str) -> np.ndarray:
    return {"all": np.ones_like(cold), "warm": ~cold, "cold": cold}[subset]


def seed_metrics(ranks: np.ndarray, cold: np.ndarray, metrics=METRICS) -> dict[str, dict[str, float]]:
    """{subset: {metric: value, "users": n}} for one run's per-user ranks."""
    out = {}
    for sub in SUBSETS:
        m = subset_mask(cold, sub)
        out[sub] = {k: (float(per_user_gain(ranks[m], k).mean()) if m.any() else float("nan")) for k in metrics}
        out[sub]["users"] = int(m.sum())
    return out


def compare(ranks_a: np.ndarray, ranks_b: np.ndarray, cold: np.ndarray, metric: str, subset: str,
            n: int = 1000, seed: int = 0, min_users: int = MIN_JUDGED_USERS) -> dict:
    """a - b on one metric over one subset of test users: per-user gains averaged over seeds ([S, U] ranks; a and
    b may have different numbers of seeds), then a 95% paired bootstrap over users. Verdict: win / loss only
    when the interval excludes zero; over fewer than `min_users` users the difference is not judged."""
    m, min_users = subset_mask(cold, subset), max(min_users, 1)
    if m.sum() < min_users:  # e.g. MovieLens has 3 cold test targets: an interval over them says nothing
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "excludes_zero": False,
                "verdict": NOT_JUDGED, "users": int(m.sum()), "min_users": min_users}
    ga = np.mean([per_user_gain(r[m], metric) for r in ranks_a], axis=0)
    gb = np.mean([per_user_gain(r[m], metric) for r in ranks_b], axis=0)
    res = paired_bootstrap(ga, gb, n=n, seed=seed)
    res["verdict"] = "win" if res["low"] > 0 else "loss" if res["high"] < 0 else "no clear difference"
    res["users"] = int(m.sum())
    return res
