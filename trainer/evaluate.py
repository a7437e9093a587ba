"""Leave-one-out evaluation over the WHOLE catalogue: exact ranks, HR@K, NDCG@K, paired bootstrap.

    python -m trainer.evaluate --export RUN_DIR/export --shards DIR [--split valid|test] [--out FILE]
        [--include-seen] [--device cpu|cuda]

evaluates an export by content on any shards (its own run's: the run's test figures; another catalogue's: zero-shot
transfer) without a Trainer, DeepSpeed or TensorBoard; prints the metrics against popularity and writes them (with
the per-user ranks beside, FILE.ranks.tsv) to FILE as JSON.

Rank of the target = 1 + number of other items scoring >= the target (ties count against the model), found
by counting over item chunks: no sort of the catalogue, memory O(users_batch x item_chunk). With
`exclude_seen`, the user's earlier items (other than the target itself) are removed from the ranking, for
every model alike. Users are split across ranks; the per-user ranks are gathered, so metrics are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class Ragged:
    """Rows of item ids of different lengths as one flat int32 array and offsets (a few bytes an id, not a numpy
    object per row). `r[i]` is row i (int64); `r[a:b]` or `r[index_array]` is a Ragged of those rows."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray):
        self.offsets, self.values = offsets, values

    @classmethod
    def from_rows(cls, rows: list) -> Ragged:
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)])
        values = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
        return cls(offsets, values)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.values[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)
        return Ragged.from_rows([self[int(k)] for k in np.arange(len(self))[i]])


@dataclass
class EvalUsers:
    """The users evaluated in one split: histories (ids, left padded) and targets."""

    users: np.ndarray  # [U]
    histories: np.ndarray  # [U, L] item ids, -1 padded on the left
    targets: np.ndarray  # [U]
    seen: Ragged | list[np.ndarray]  # per user: the distinct items before the target


def eval_users(sequences, split: str, max_len: int) -> EvalUsers:
    """Validation: history = training items, target = the next; test: history includes the validation item.
    `sequences`: user samples in index order (a SequenceTable, or read_sequences' list), read in one pass."""
    if split not in ("valid", "test"):
        raise ValueError("split must be 'valid' or 'test'")
    hist = np.full((len(sequences), max_len), -1, dtype=np.int64)  # every user at most; cut to the evaluated
    users, targets, seen_rows, seen_values = [], [], [0], []
    for s in sequences:
        if not s["evaluated"]:
            continue
        cut = s["num_train"] + (0 if split == "valid" else 1)
        before = np.asarray(s["items"][:cut], dtype=np.int64)
        h = before[-max_len:]
        hist[len(users), max_len - len(h) :] = h
        users.append(s["user"])
        targets.append(s["items"][cut])
        distinct = np.unique(before).astype(np.int32)
        seen_values.append(distinct)
        seen_rows.append(seen_rows[-1] + len(distinct))
    histories = hist[: len(users)].copy()
    values = np.concatenate(seen_values) if seen_values else np.zeros(0, dtype=np.int32)
    return EvalUsers(np.asarray(users), histories, np.asarray(targets), Ragged(np.asarray(seen_rows), values))


def excluded_pairs(
    targets: torch.Tensor, seen: list[np.ndarray], exclude_seen: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs left out of each user's count: the target itself, and seen items when excluded.

    Built on the host with numpy and copied to the device once per user batch (no per-user device work)."""
    t = targets.cpu().numpy()
    rows, items = np.arange(len(t)), t
    if exclude_seen and seen:
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
) -> torch.Tensor:
    """1 + #{items v not excluded : s_v >= s_target}, counted over item chunks (no sort, O(B x chunk) memory).

    Excluded items (the target, seen items) are removed by index inside the chunk that scored them, so
    the count never depends on recomputing a score in another way."""
    rows, items = pairs
    count = torch.zeros(len(target_scores), dtype=torch.long, device=target_scores.device)
    for start in range(0, num_items, chunk):
        stop = min(start + chunk, num_items)
        s = score_chunk(slice(start, stop))  # [B, C]
        count += (s >= target_scores[:, None]).sum(1)
        sel = (items >= start) & (items < stop)
        r, v = rows[sel], items[sel] - start
        count.index_add_(0, r, -(s[r, v] >= target_scores[r]).long())
    return count + 1


def metrics_from_ranks(ranks: np.ndarray, ks=(5, 10, 20)) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean()) if len(ranks) else 0.0
    out["users"] = int(len(ranks))
    return out


def per_user_gain(ranks: np.ndarray, metric: str) -> np.ndarray:
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


def _shard_for_rank(n: int) -> tuple[slice, int, int]:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return slice(rank, n, world), rank, world


def _gather(local: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (positions, local))
    out = np.zeros(n, dtype=local.dtype)
    for pos, vals in parts:
        out[pos] = vals
    return out


@torch.no_grad()
def rank_with_vectors(
    user_vec_fn: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
    item_vectors: torch.Tensor,
    data: EvalUsers,
    exclude_seen: bool,
    user_batch: int = 256,
    device=None,
) -> np.ndarray:
    """Exact ranks of every user's target by dot product with all item vectors [V, d]."""
    n = len(data.users)
    part, _, _ = _shard_for_rank(n)
    positions = np.arange(n)[part]
    device = device or item_vectors.device
    out = np.zeros(len(positions), dtype=np.int64)
    for start in range(0, len(positions), user_batch):
        pos = positions[start : start + user_batch]
        hist = torch.as_tensor(data.histories[pos], device=device)
        u = user_vec_fn(hist, data.users[pos])  # [B, d]
        tg = torch.as_tensor(data.targets[pos], device=device)
        ts = (u * item_vectors[tg].to(u.dtype)).sum(-1)
        pairs = excluded_pairs(tg, [data.seen[p] for p in pos], exclude_seen)
        r = ranks_from_scores(lambda sl: u @ item_vectors[sl].to(u.dtype).T, len(item_vectors), ts, pairs)
        out[start : start + len(pos)] = r.cpu().numpy()
    return _gather(out, positions, n)


@torch.no_grad()
def rank_with_scores(
    score_fn: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
    num_items: int,
    data: EvalUsers,
    exclude_seen: bool,
    user_batch: int = 256,
    device="cpu",
) -> np.ndarray:
    """Exact ranks when a model scores every item directly (stage-1 head, popularity): score_fn(hist, users)."""
    n = len(data.users)
    part, _, _ = _shard_for_rank(n)
    positions = np.arange(n)[part]
    out = np.zeros(len(positions), dtype=np.int64)
    for start in range(0, len(positions), user_batch):
        pos = positions[start : start + user_batch]
        hist = torch.as_tensor(data.histories[pos], device=device)
        full = score_fn(hist, data.users[pos])  # [B, V]
        tg = torch.as_tensor(data.targets[pos], device=device)
        ts = full.gather(1, tg[:, None])[:, 0]
        pairs = excluded_pairs(tg, [data.seen[p] for p in pos], exclude_seen)
        r = ranks_from_scores(lambda sl: full[:, sl], num_items, ts, pairs)
        out[start : start + len(pos)] = r.cpu().numpy()
    return _gather(out, positions, n)


def interaction_counts(sequences: list[dict], num_items: int, split: str = "train") -> np.ndarray:
    """Interactions per item over what is known before the split's targets: the training portions ("train",
    "valid"), plus each evaluated user's validation item ("test")."""
    counts = np.zeros(num_items, dtype=np.float64)
    for s in sequences:
        cut = s["num_train"] + (1 if split == "test" and s["evaluated"] else 0)
        np.add.at(counts, np.asarray(s["items"][:cut], dtype=np.int64), 1.0)
    return counts


def popularity_scores(sequences: list[dict], num_items: int, split: str, seed: int = 0) -> torch.Tensor:
    """Interaction counts over the items available before the evaluated target (train, + valid for test),
    plus a tiny seeded jitter below 1 that breaks count ties at random instead of against the target."""
    counts = interaction_counts(sequences, num_items, split)
    jitter = np.random.default_rng(seed).random(num_items) * 0.5
    return torch.as_tensor(counts + jitter, dtype=torch.float64)


def popularity_ranks(
    sequences: list[dict], num_items: int, data: EvalUsers, split: str, exclude_seen: bool
) -> np.ndarray:
    pop = popularity_scores(sequences, num_items, split)
    return rank_with_scores(lambda hist, users: pop[None].expand(len(hist), -1), num_items, data, exclude_seen)


def main(argv: list[str] | None = None) -> dict:
    import json
    from pathlib import Path

    from trainer.model_eval import export_cli, ranker_from_export

    p = export_cli("python -m trainer.evaluate", __doc__)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--out", default=None, help="write the metrics as JSON here (ranks beside, .ranks.tsv)")
    p.add_argument("--include-seen", action="store_true", help="keep the user's earlier items in the ranking")
    a = p.parse_args(argv)
    from trainer.main import local_shards

    a.shards = local_shards(a.shards)
    if not (Path(a.shards) / "manifest.json").exists():
        raise SystemExit(f"error: no shards at {a.shards}: build them with `python -m data_shards.build`")
    try:
        ranker = ranker_from_export(Path(a.export), Path(a.shards), a.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    max_len = ranker.model.cfg.max_len
    data = eval_users(ranker.sequences, a.split, max_len)
    ranks = ranker.ranks(data, "content", exclude_seen=not a.include_seen)
    pop = popularity_ranks(ranker.sequences, ranker.store.num_items, data, a.split, not a.include_seen)
    result = {"split": a.split, "export": str(a.export), "shards": str(a.shards), "exclude_seen": not a.include_seen,
              "content": metrics_from_ranks(ranks), "popularity": metrics_from_ranks(pop),
              "vs_popularity": {m: paired_bootstrap(per_user_gain(ranks, m), per_user_gain(pop, m))
                                for m in ("hr@10", "ndcg@10")}}
    iv = result["vs_popularity"]["ndcg@10"]
    print(f"{a.split}: {len(ranks)} users, {ranker.store.num_items} items; content HR@10 "
          f"{result['content']['hr@10']:.4f} NDCG@10 {result['content']['ndcg@10']:.4f}; popularity HR@10 "
          f"{result['popularity']['hr@10']:.4f} NDCG@10 {result['popularity']['ndcg@10']:.4f}; NDCG@10 - popularity "
          f"{iv['diff']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]")
    if a.out:
        out = Path(a.out)
        out.write_text(json.dumps(result, indent=1))
        with open(out.with_suffix(".ranks.tsv"), "w") as f:
            f.write("user\ttarget_item\trank\n")
            f.writelines(f"{u}\t{t}\t{r}\n" for u, t, r in zip(data.users, data.targets, ranks))
    return result


if __name__ == "__main__":
    main()
