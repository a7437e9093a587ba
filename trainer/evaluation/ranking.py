"""Leave-one-out ranking over the WHOLE catalogue: exact ranks, HR@K, NDCG@K, paired bootstrap, popularity.

Rank of the target = 1 + number of other items scoring >= the target (ties count against the model), found
by counting over item chunks: no sort of the catalogue, memory O(users_batch x item_chunk). With
`exclude_seen`, the user's earlier items (other than the target itself) are removed from the ranking, for
every model alike. Users are split across ranks; the per-user ranks are gathered, so metrics are exact.
A user whose scores hold NaN or an infinity is never counted as a hit (`settle_nonfinite`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from transrec.trainer.evaluation.eval_users import (  # noqa: F401  (re-exported: evaluation's data types live in eval_users)
    EvalStream,
    EvalUsers,
    HeldRecords,
    Ragged,
    SplitSummary,
    UserSample,
    eval_users,
    interaction_counts,
)

LOG = logging.getLogger("transrec")


class NonFiniteScores(ValueError):
    """A model produced NaN or infinite scores or vectors: it can rank nothing. Evaluation, recommendation and the
    service stop with this (never count such a score as a hit); validation during training records the users'
    ranks as the worst possible instead, so a diverged epoch can never be selected."""


def count_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [N, ...] holding any NaN or infinity, as a 0-d tensor (no host sync until read)."""
    bad = ~torch.isfinite(x)
    return (bad.reshape(len(x), -1).any(1) if x.dim() > 1 else bad).sum()


def excluded_pairs(
    targets: torch.Tensor, seen: Ragged | list[np.ndarray], exclude_seen: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs left out of each user's count: the target itself, and seen items when excluded.

    Built on the host with numpy and copied to the device once per user batch (no per-user work)."""
    t = targets.cpu().numpy()
    rows, items = np.arange(len(t)), t
    if exclude_seen and len(seen):
        if isinstance(seen, Ragged):
            r, v = seen.flat()
        else:
            r = np.repeat(np.arange(len(seen)), [len(x) for x in seen])
            v = np.concatenate([np.asarray(x, dtype=np.int64) for x in seen])
        keep = v != t[r]
        rows, items = np.concatenate([rows, r[keep]]), np.concatenate([items, v[keep]])
    device = targets.device
    return torch.as_tensor(rows, device=device), torch.as_tensor(items, dtype=torch.long, device=device)


def ranks_from_scores(
    score_chunk: Callable[[slice], torch.Tensor],
    num_items: int,
    target_scores: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    chunk: int = 65536,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """1 + #{items v not excluded : s_v >= s_target}, counted over item chunks (no sort, O(B x chunk) memory).

    Excluded items (the target, seen items) are removed by index inside the chunk that scored them, so
    the count never depends on recomputing a score in another way. A user whose target score or any item score is
    NaN or infinite gets rank num_items + 1 (after every real rank: never a hit), since no comparison with a
    NaN is true and its count would otherwise say rank 1; rank_with_vectors / rank_with_scores then stop or record
    the worst rank (their `nonfinite`). `ranges` (lo [B], hi [B]): user b is ranked among items [lo_b, hi_b) only
    (its own catalogue in a mixture; its target and seen items lie there)."""
    rows, items = pairs
    count = torch.zeros(len(target_scores), dtype=torch.long, device=target_scores.device)
    bad = ~torch.isfinite(target_scores)
    for start in range(0, num_items, chunk):
        stop = min(start + chunk, num_items)
        s = score_chunk(slice(start, stop))  # [B, C]
        bad |= ~torch.isfinite(s).all(1)  # elementwise like the count itself: no host sync
        above = s >= target_scores[:, None]
        if ranges is not None:
            cols = torch.arange(start, stop, device=s.device)
            above &= (cols >= ranges[0][:, None]) & (cols < ranges[1][:, None])
        count += above.sum(1)
        sel = (items >= start) & (items < stop)
        r, v = rows[sel], items[sel] - start
        count.index_add_(0, r, -(s[r, v] >= target_scores[r]).long())
    return torch.where(bad, num_items + 1, count + 1)


def catalogue_ranges(targets: torch.Tensor, bounds: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lo [B], hi [B]): the item range of each target's catalogue in a mixture (`bounds` [C + 1] item offsets);
    None for one catalogue."""
    if bounds is None:
        return None
    b = torch.as_tensor(bounds, device=targets.device)
    c = torch.searchsorted(b, targets, right=True) - 1
    return b[c], b[c + 1]


def catalogue_of(items: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Each item's catalogue number in a mixture."""
    return np.searchsorted(bounds, items, side="right") - 1


def settle_nonfinite(ranks: np.ndarray, num_items: int, nonfinite: str, what: str = "the model") -> np.ndarray:
    """`ranks` from ranks_from_scores with the non-finite users settled: `nonfinite` "raise" stops with
    NonFiniteScores naming how many users (evaluation, serving: a broken model must not score); "worst" gives them
    the worst real rank, num_items (validation during training: a diverged epoch is never selected)."""
    if nonfinite not in ("raise", "worst"):
        raise ValueError(f"nonfinite must be raise or worst, not {nonfinite!r}")
    bad = ranks > num_items
    if not bad.any():
        return ranks
    n = int(bad.sum())
    if nonfinite == "raise":
        raise NonFiniteScores(f"{what} gives NaN or infinite scores for {n} of {len(ranks)} users: it cannot rank "
                              "(diverged or damaged weights); retrain it or use an earlier export")
    LOG.warning(f"{what}: NaN or infinite scores for {n} of {len(ranks)} users, recorded as rank {num_items} (the "
                "worst) so they count as misses")
    return np.minimum(ranks, num_items)


def metrics_from_ranks(ranks: np.ndarray, ks=(5, 10, 20)) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean()) if len(ranks) else 0.0
    out["users"] = int(len(ranks))
    return out


def per_user_gain(ranks: np.ndarray, metric: str) -> np.ndarray:
    if metric == "mrr":  # reciprocal rank: every position counts, not only the top k
        return 1.0 / ranks.astype(np.float64)
    name, k = metric.split("@")
    k = int(k)
    if name == "hr":
        return (ranks <= k).astype(np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of (a - b) over users and its percentile interval from `n` paired resamples of users."""
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired bootstrap needs two equal-length, non-empty per-user arrays")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(diff.mean()), "low": float(lo), "high": float(hi), "excludes_zero": bool(lo > 0 or hi < 0)}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_chunks(data: EvalUsers | EvalStream, batch: int) -> Iterator[tuple[np.ndarray, EvalUsers]]:
    """This rank's users of `data` in batches, each with its users' positions in `data`: an EvalStream reads only its
    own users from the shards; users held in memory are split rank::world."""
    if isinstance(data, EvalStream):
        for chunk in data.chunks(batch):
            pos = np.searchsorted(data.users, chunk.users)
            if not ((pos < len(data)).all() and np.array_equal(data.users[pos], chunk.users)):
                raise ValueError(f"{data.shard_dir}: the sequence shards changed since this run read them")
            yield pos, chunk
        return
    rank, world = _rank_world()
    positions = np.arange(len(data))[rank::world]
    for start in range(0, len(positions), batch):
        pos = positions[start : start + batch]
        yield pos, data.take(pos)


def _gather(ranks: np.ndarray, mine: np.ndarray) -> np.ndarray:
    """Every rank's ranks (`ranks` [n], filled where `mine`), on every rank."""
    parts = [(np.flatnonzero(mine), ranks[mine])]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (np.flatnonzero(mine), ranks[mine]))
    out = np.zeros(len(ranks), dtype=np.int64)
    filled = np.zeros(len(ranks), dtype=bool)
    for p, r in parts:
        out[p], filled[p] = r, True
    if not filled.all():
        raise RuntimeError(f"{int((~filled).sum())} of {len(ranks)} evaluated users were ranked by no rank")
    return out


@contextmanager
def matmul_precision(precision: str, device: torch.device):
    """fp32 matmuls as `precision` says ("fp32" | "tf32", eval.precision) inside the block, on CUDA; nothing on
    other devices (TF32 is a CUDA tensor-core format)."""
    if precision not in ("fp32", "tf32"):
        raise ValueError(f"precision must be fp32 or tf32, not {precision!r}")
    if precision == "fp32" or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    name, value = (("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True))
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


@torch.no_grad()
def rank_with_vectors(
    user_vec_fn: Callable[[torch.Tensor, EvalUsers], torch.Tensor],
    item_vectors: torch.Tensor,
    data: EvalUsers | EvalStream,
    exclude_seen: bool,
    user_batch: int = 256,
    device=None,
    precision: str = "fp32",
    nonfinite: str = "raise",
    what: str = "the model",
    bounds: np.ndarray | None = None,
) -> np.ndarray:
    """Ranks of every user's target by dot product with all item vectors [V, d] (exact in fp32; `precision`
    "tf32": the score matmuls on CUDA's TF32 tensor cores); user_vec_fn(histories, chunk) gives the chunk's user
    vectors [B, d]. Users with NaN or infinite scores: NonFiniteScores, or the worst rank (settle_nonfinite)."""
    with matmul_precision(precision, item_vectors.device):
        ranks = _rank_with_vectors(user_vec_fn, item_vectors, data, exclude_seen, user_batch, device, bounds)
    if (ranks > len(item_vectors)).any():
        bad_items = int(count_nonfinite(item_vectors))
        if bad_items:
            what = f"{what} ({bad_items} of {len(item_vectors)} item vectors NaN or infinite)"
    return settle_nonfinite(ranks, len(item_vectors), nonfinite, what)


def _rank_with_vectors(user_vec_fn, item_vectors, data, exclude_seen, user_batch, device, bounds=None) -> np.ndarray:
    device = device or item_vectors.device
    ranks, mine = np.zeros(len(data), dtype=np.int64), np.zeros(len(data), dtype=bool)  # allocated once: no
    for pos, chunk in _local_chunks(data, user_batch):  # small array per batch left between the large ones
        hist = torch.as_tensor(chunk.histories, device=device)
        u = user_vec_fn(hist, chunk)  # [B, d]
        tg = torch.as_tensor(chunk.targets, device=device)
        ts = (u * item_vectors[tg].to(u.dtype)).sum(-1)
        pairs = excluded_pairs(tg, chunk.seen, exclude_seen)
        r = ranks_from_scores(lambda sl: u @ item_vectors[sl].to(u.dtype).T, len(item_vectors), ts, pairs,
                              ranges=catalogue_ranges(tg, bounds))
        ranks[pos], mine[pos] = r.cpu().numpy(), True
    return _gather(ranks, mine)


@torch.no_grad()
def rank_with_scores(
    score_fn: Callable[[torch.Tensor, EvalUsers], torch.Tensor],
    num_items: int,
    data: EvalUsers | EvalStream,
    exclude_seen: bool,
    user_batch: int = 256,
    device="cpu",
    nonfinite: str = "raise",
    what: str = "the model",
    bounds: np.ndarray | None = None,
) -> np.ndarray:
    """Exact ranks when a model scores every item directly (stage-1 head, popularity): score_fn(histories, chunk).
    Users with NaN or infinite scores: NonFiniteScores, or the worst rank (settle_nonfinite)."""
    ranks, mine = np.zeros(len(data), dtype=np.int64), np.zeros(len(data), dtype=bool)
    for pos, chunk in _local_chunks(data, user_batch):
        hist = torch.as_tensor(chunk.histories, device=device)
        full = score_fn(hist, chunk)  # [B, V]
        tg = torch.as_tensor(chunk.targets, device=device)
        ts = full.gather(1, tg[:, None])[:, 0]
        pairs = excluded_pairs(tg, chunk.seen, exclude_seen)
        r = ranks_from_scores(lambda sl: full[:, sl], num_items, ts, pairs, ranges=catalogue_ranges(tg, bounds))
        ranks[pos], mine[pos] = r.cpu().numpy(), True
    return settle_nonfinite(_gather(ranks, mine), num_items, nonfinite, what)


def popularity_scores(counts: np.ndarray, seed: int = 0, bounds: np.ndarray | None = None) -> torch.Tensor:
    """Interaction counts over the items available before the evaluated target (interaction_counts: train, + valid
    for test), plus a tiny seeded jitter below 1 that breaks count ties at random instead of against the target. A
    mixture's catalogues (`bounds`) each draw the jitter their own shards would: the same ties broken the same way."""
    if bounds is None:
        jitter = np.random.default_rng(seed).random(len(counts)) * 0.5
    else:
        jitter = np.concatenate([np.random.default_rng(seed).random(int(hi - lo)) * 0.5
                                 for lo, hi in zip(bounds[:-1], bounds[1:])])
    return torch.as_tensor(counts + jitter, dtype=torch.float64)


def popularity_ranks(counts: np.ndarray, data: EvalUsers | EvalStream, exclude_seen: bool,
                     bounds: np.ndarray | None = None) -> np.ndarray:
    """Ranks by popularity; `counts`: interaction_counts(sequences, num_items, split) of the evaluated split; a
    mixture's users (`bounds`) among their own catalogue's items."""
    pop = popularity_scores(counts, bounds=bounds)
    return rank_with_scores(lambda hist, chunk: pop[None].expand(len(hist), -1), len(counts), data, exclude_seen,
                            bounds=bounds)
