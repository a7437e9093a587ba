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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
        rows = np.arange(len(self))[i]  # a slice or an index array: gathered without a Python loop over rows
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        at = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Ragged(offsets, self.values[at])

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(row of each value, value as int64): every row's values in one pair of arrays."""
        lengths = np.diff(self.offsets)
        return (np.repeat(np.arange(len(self)), lengths),
                self.values[self.offsets[0] : self.offsets[-1]].astype(np.int64))


@dataclass
class EvalUsers:
    """The users evaluated in one split: histories (ids, left padded), targets, and the users' side features."""

    users: np.ndarray  # [U]
    histories: np.ndarray  # [U, L] item ids, -1 padded on the left
    targets: np.ndarray  # [U]
    seen: Ragged | list[np.ndarray]  # per user: the distinct items before the target
    features: dict[str, Ragged] = field(default_factory=dict)  # user side features by name, rows aligned with users

    def __len__(self) -> int:
        return len(self.users)

    def take(self, idx: np.ndarray) -> EvalUsers:
        """The users at positions `idx`, as an EvalUsers of their own."""
        seen = self.seen[idx] if isinstance(self.seen, Ragged) else [self.seen[int(i)] for i in idx]
        return EvalUsers(self.users[idx], self.histories[idx], self.targets[idx], seen,
                         {n: r[idx] for n, r in self.features.items()})


class _EvalBuilder:
    """Accumulates evaluated users' records into an EvalUsers (one record at a time: any iterable, any length)."""

    def __init__(self, split: str, max_len: int, feature_names=()):
        if split not in ("valid", "test"):
            raise ValueError("split must be 'valid' or 'test'")
        self.split, self.max_len, self.feature_names = split, max_len, tuple(feature_names)
        self.users, self.targets, self.hist, self.seen = [], [], [], []
        self.features = {n: [] for n in self.feature_names}

    def __len__(self) -> int:
        return len(self.users)

    def add(self, s: dict) -> None:
        if not s["evaluated"]:
            return
        cut = s["num_train"] + (0 if self.split == "valid" else 1)
        before = np.asarray(s["items"][:cut], dtype=np.int64)
        h = np.full(self.max_len, -1, dtype=np.int64)
        tail = before[-self.max_len :]
        h[self.max_len - len(tail) :] = tail
        self.hist.append(h)
        self.users.append(s["user"])
        self.targets.append(s["items"][cut])
        self.seen.append(np.unique(before).astype(np.int32))
        for n in self.feature_names:
            self.features[n].append(s["features"].get(n, [0]))  # a user without the feature: padding id 0

    def done(self) -> EvalUsers:
        hist = np.stack(self.hist) if self.hist else np.zeros((0, self.max_len), dtype=np.int64)
        return EvalUsers(np.asarray(self.users, dtype=np.int64), hist, np.asarray(self.targets, dtype=np.int64),
                         Ragged.from_rows(self.seen), {n: Ragged.from_rows(r) for n, r in self.features.items()})


def eval_users(sequences, split: str, max_len: int, feature_names=()) -> EvalUsers:
    """Validation: history = training items, target = the next; test: history includes the validation item.
    `sequences`: user samples in index order (a SequenceTable, or read_sequences' list), read in one pass;
    `feature_names`: the user side features to keep (a user lacking one gets padding id 0)."""
    build = _EvalBuilder(split, max_len, feature_names)
    for s in sequences:
        build.add(s)
    return build.done()


class EvalStream:
    """One split's evaluated users streamed from the sequence shards in batches, this rank's users only: the
    trainer's memory for evaluation is O(batch), not O(users). With at least as many sequence shards as ranks, a
    rank reads only its own shards (shard i to rank i % world), so a node reads each shard once per evaluation;
    otherwise every rank reads them all and keeps user % world == rank. `users` / `targets`: every evaluated user
    (all ranks) in index order, for the per-user rank files and the cold-target counts."""

    def __init__(self, shard_dir, split: str, max_len: int, users: np.ndarray, targets: np.ndarray,
                 feature_names=(), rank: int = 0, world: int = 1):
        _EvalBuilder(split, max_len)  # checks the split
        self.shard_dir, self.split, self.max_len, self.feature_names = shard_dir, split, max_len, feature_names
        self.users, self.targets, self.rank, self.world = users, targets, rank, world

    def __len__(self) -> int:
        return len(self.users)

    def chunks(self, batch: int) -> Iterator[EvalUsers]:
        from pathlib import Path

        from data_shards.shard_io import load_manifest, sequence_records

        shard_dir = Path(self.shard_dir)
        build = _EvalBuilder(self.split, self.max_len, self.feature_names)
        names = load_manifest(shard_dir)["shards"]["sequences"]
        by_shard = len(names) >= self.world
        for i, name in enumerate(names):
            if by_shard and i % self.world != self.rank:
                continue
            for s in sequence_records(shard_dir / name):
                if by_shard or s["user"] % self.world == self.rank:
                    build.add(s)
                    if len(build) == batch:
                        yield build.done()
                        build = _EvalBuilder(self.split, self.max_len, self.feature_names)
        if len(build):
            yield build.done()

    def in_memory(self) -> EvalUsers:
        """This rank's evaluated users held at once (benches, tests: O(users) memory)."""
        return next(self.chunks(max(1, len(self))), _EvalBuilder(self.split, self.max_len, self.feature_names).done())


@dataclass
class SplitSummary:
    """What evaluation needs of every user, read in one streaming pass: interactions per item known before each
    split's targets ("train", "valid", "test"; see interaction_counts) and each split's evaluated users and targets.
    O(items + evaluated users) numbers, no sequence kept."""

    counts: dict[str, np.ndarray]
    users: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]

    @classmethod
    def read(cls, shard_dir) -> SplitSummary:
        from pathlib import Path

        from data_shards.shard_io import load_manifest, sequence_records

        shard_dir = Path(shard_dir)
        manifest = load_manifest(shard_dir)
        counts = {k: np.zeros(manifest["num_items"], dtype=np.float64) for k in ("train", "valid", "test")}
        users, targets = {"valid": [], "test": []}, {"valid": [], "test": []}
        for name in manifest["shards"]["sequences"]:
            for s in sequence_records(shard_dir / name):
                items, n = np.asarray(s["items"], dtype=np.int64), s["num_train"]
                np.add.at(counts["train"], items[:n], 1.0)
                if s["evaluated"]:
                    counts["test"][items[n]] += 1.0  # each evaluated user's validation item, known at test time
                    for split, cut in (("valid", n), ("test", n + 1)):
                        users[split].append(s["user"])
                        targets[split].append(items[cut])
        counts["test"] += counts["train"]
        counts["valid"] = counts["train"].copy()
        out = {}
        for split in ("valid", "test"):
            u, t = np.asarray(users[split], dtype=np.int64), np.asarray(targets[split], dtype=np.int64)
            order = np.argsort(u, kind="stable")
            out[split] = (u[order], t[order])
        return cls(counts, {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()})


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
            if (pos >= len(data.users)).any() or not np.array_equal(data.users[np.minimum(pos, len(data) - 1)],
                                                                    chunk.users):
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
) -> np.ndarray:
    """Ranks of every user's target by dot product with all item vectors [V, d] (exact in fp32; `precision`
    "tf32": the score matmuls on CUDA's TF32 tensor cores); user_vec_fn(histories, chunk) gives the chunk's user
    vectors [B, d]."""
    with matmul_precision(precision, item_vectors.device):
        return _rank_with_vectors(user_vec_fn, item_vectors, data, exclude_seen, user_batch, device)


def _rank_with_vectors(user_vec_fn, item_vectors, data, exclude_seen, user_batch, device) -> np.ndarray:
    device = device or item_vectors.device
    ranks, mine = np.zeros(len(data), dtype=np.int64), np.zeros(len(data), dtype=bool)  # allocated once: no
    for pos, chunk in _local_chunks(data, user_batch):  # small array per batch left between the large ones
        hist = torch.as_tensor(chunk.histories, device=device)
        u = user_vec_fn(hist, chunk)  # [B, d]
        tg = torch.as_tensor(chunk.targets, device=device)
        ts = (u * item_vectors[tg].to(u.dtype)).sum(-1)
        pairs = excluded_pairs(tg, chunk.seen, exclude_seen)
        r = ranks_from_scores(lambda sl: u @ item_vectors[sl].to(u.dtype).T, len(item_vectors), ts, pairs)
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
) -> np.ndarray:
    """Exact ranks when a model scores every item directly (stage-1 head, popularity): score_fn(histories, chunk)."""
    ranks, mine = np.zeros(len(data), dtype=np.int64), np.zeros(len(data), dtype=bool)
    for pos, chunk in _local_chunks(data, user_batch):
        hist = torch.as_tensor(chunk.histories, device=device)
        full = score_fn(hist, chunk)  # [B, V]
        tg = torch.as_tensor(chunk.targets, device=device)
        ts = full.gather(1, tg[:, None])[:, 0]
        pairs = excluded_pairs(tg, chunk.seen, exclude_seen)
        r = ranks_from_scores(lambda sl: full[:, sl], num_items, ts, pairs)
        ranks[pos], mine[pos] = r.cpu().numpy(), True
    return _gather(ranks, mine)


def interaction_counts(sequences: list[dict], num_items: int, split: str = "train") -> np.ndarray:
    """Interactions per item over what is known before the split's targets: the training portions ("train",
    "valid"), plus each evaluated user's validation item ("test")."""
    counts = np.zeros(num_items, dtype=np.float64)
    for s in sequences:
        cut = s["num_train"] + (1 if split == "test" and s["evaluated"] else 0)
        np.add.at(counts, np.asarray(s["items"][:cut], dtype=np.int64), 1.0)
    return counts


def popularity_scores(counts: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Interaction counts over the items available before the evaluated target (interaction_counts: train, + valid
    for test), plus a tiny seeded jitter below 1 that breaks count ties at random instead of against the target."""
    jitter = np.random.default_rng(seed).random(len(counts)) * 0.5
    return torch.as_tensor(counts + jitter, dtype=torch.float64)


def popularity_ranks(counts: np.ndarray, data: EvalUsers | EvalStream, exclude_seen: bool) -> np.ndarray:
    """Ranks by popularity; `counts`: interaction_counts(sequences, num_items, split) of the evaluated split."""
    pop = popularity_scores(counts)
    return rank_with_scores(lambda hist, chunk: pop[None].expand(len(hist), -1), len(counts), data, exclude_seen)


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
    data = eval_users(ranker.sequences, a.split, max_len, ranker.user_feature_names)
    ranks = ranker.ranks(data, "content", exclude_seen=not a.include_seen)
    counts = interaction_counts(ranker.sequences, ranker.store.num_items, a.split)
    pop = popularity_ranks(counts, data, not a.include_seen)
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
