"""The users an evaluation ranks, as data: who is evaluated in a split, their histories, targets, seen items and side
features (`EvalUsers`, built from any sequence of user records by `eval_users`), streamed from the shards one batch
at a time for the trainer (`EvalStream`, each rank its own users), and what evaluation needs of every user in one
streaming pass (`SplitSummary`: interactions per item, each split's evaluated users and targets). Ranking them is
trainer/evaluation/ranking.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from transrec.data_shards import shard_io
from transrec.trainer.core.progress import ProgressLog

SPLITS = ("valid", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError("split must be 'valid' or 'test'")


def known_before(s: dict, split: str) -> int:
    """How many of user record `s`'s items come before the split's targets: the training portion ("train", "valid"),
    plus the validation item for an evaluated user ("test"). For an evaluated user, items[known_before] is the
    split's target."""
    return s["num_train"] + (1 if split == "test" and s["evaluated"] else 0)


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


@dataclass(frozen=True)
class UserSample:
    """A seeded uniform sample of a split's evaluated users (`eval.max_users`): for catalogues of millions of users,
    where ranking every one costs hours. The same seed and size pick the same users in both splits (every evaluated
    user is evaluated in both). `of` keeps index order; `record` is what metrics.json says of it."""

    size: int
    seed: int

    def of(self, users: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(users) <= self.size:
            return users, targets
        keep = np.sort(np.random.default_rng(self.seed).choice(len(users), self.size, replace=False))
        return users[keep], targets[keep]

    def record(self, evaluated: int, of: int) -> dict:
        return {"evaluated": evaluated, "of": of, "sampled": evaluated < of, "seed": self.seed}


class _EvalBuilder:
    """Accumulates evaluated users' records into an EvalUsers (one record at a time: any iterable, any length)."""

    def __init__(self, split: str, max_len: int, feature_names=()):
        _check_split(split)
        self.split, self.max_len, self.feature_names = split, max_len, tuple(feature_names)
        self.users, self.targets, self.hist, self.seen = [], [], [], []
        self.features = {n: [] for n in self.feature_names}

    def __len__(self) -> int:
        return len(self.users)

    def add(self, s: dict) -> None:
        if not s["evaluated"]:
            return
        cut = known_before(s, self.split)
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


def eval_users(sequences, split: str, max_len: int, feature_names=(), sample: UserSample | None = None) -> EvalUsers:
    """Validation: history = training items, target = the next; test: history includes the validation item.
    `sequences`: user samples in index order (a SequenceTable, or read_sequences' list), read in one pass;
    `feature_names`: the user side features to keep (a user lacking one gets padding id 0); `sample`: only a seeded
    sample of the evaluated users (the same in both splits)."""
    kept = None if sample is None else sampled_users(sequences, sample)
    build = _EvalBuilder(split, max_len, feature_names)
    for s in sequences:
        if kept is None or s["user"] in kept:
            build.add(s)
    return build.done()


def sampled_users(sequences, sample: UserSample) -> frozenset[int]:
    """The users `sample` keeps of `sequences`' evaluated users (a SequenceTable's flags, or the records')."""
    flags = getattr(sequences, "evaluated", None)
    if flags is not None:
        evaluated = np.flatnonzero(flags)
    else:
        evaluated = np.asarray([s["user"] for s in sequences if s["evaluated"]], dtype=np.int64)
    users, _ = sample.of(evaluated, evaluated)
    return frozenset(users.tolist())


def users_read(shard_dir, rank: int, world: int, what: str, log=None) -> Iterator[dict]:
    """rank_records with a progress line every 30 s through `log` (when given): users read, rate, time left."""
    total = -(-shard_io.load_manifest(Path(shard_dir))["num_users"] // world)  # about a rank's share
    return ProgressLog(what, total, log, unit="users").counted(rank_records(shard_dir, rank, world))


def rank_records(shard_dir, rank: int = 0, world: int = 1) -> Iterator[dict]:
    """The user records one rank owns, streamed: with at least as many sequence shards as ranks, the rank's own
    shards (shard i to rank i % world), so that the ranks of a node read each shard once; otherwise the users with
    user % world == rank, from every shard. Every user belongs to exactly one rank."""
    shard_dir = Path(shard_dir)
    names = shard_io.load_manifest(shard_dir)["shards"]["sequences"]
    by_shard = len(names) >= world
    for i, name in enumerate(names):
        if by_shard and i % world != rank:
            continue
        for s in shard_io.sequence_records(shard_dir / name):
            if by_shard or s["user"] % world == rank:
                yield s


class HeldRecords:
    """The records of a sample's users that one rank owns (rank_records), read from the shards in one pass on first
    use and held: O(sample) memory, and every later evaluation of the run (both splits, every epoch, popularity)
    reads them from here instead of the shards again."""

    def __init__(self, shard_dir, users: np.ndarray, rank: int = 0, world: int = 1, log=None):
        self.shard_dir, self.rank, self.world, self.log = shard_dir, rank, world, log
        self.users = frozenset(users.tolist())
        self._records: list[dict] | None = None

    def __iter__(self) -> Iterator[dict]:
        if self._records is None:
            records = users_read(self.shard_dir, self.rank, self.world, "reading the sampled users' records", self.log)
            self._records = [s for s in records if s["user"] in self.users]
        return iter(self._records)


class EvalStream:
    """One split's evaluated users streamed from the sequence shards in batches, this rank's users only: the
    trainer's memory for evaluation is O(batch), not O(users). With at least as many sequence shards as ranks, a
    rank reads only its own shards (shard i to rank i % world), so a node reads each shard once per evaluation;
    otherwise every rank reads them all and keeps user % world == rank. `users` / `targets`: every evaluated user
    (all ranks) in index order, for the per-user rank files and the cold-target counts; with a `sample`, only the
    sampled ones, whose records are read once and held (HeldRecords)."""

    def __init__(self, shard_dir, split: str, max_len: int, users: np.ndarray, targets: np.ndarray,
                 feature_names=(), rank: int = 0, world: int = 1, sample: UserSample | None = None,
                 held: HeldRecords | None = None, log=None):
        _check_split(split)
        self.shard_dir, self.split, self.max_len, self.feature_names = shard_dir, split, max_len, feature_names
        self.rank, self.world, self.sample = rank, world, sample
        self.users, self.targets = (users, targets) if sample is None else sample.of(users, targets)
        self.held = None  # a sample's records, read once and held (shared with the other split's stream: `held`)
        if sample is not None:
            self.held = held if held is not None else HeldRecords(shard_dir, self.users, rank, world, log)
            if self.held.users != frozenset(self.users.tolist()):
                raise ValueError("the held records are another sample's users: give both splits the same sample")

    def __len__(self) -> int:
        return len(self.users)

    def chunks(self, batch: int) -> Iterator[EvalUsers]:
        build = _EvalBuilder(self.split, self.max_len, self.feature_names)
        for s in self.held if self.held is not None else rank_records(self.shard_dir, self.rank, self.world):
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
    def read(cls, shard_dir, rank: int = 0, world: int = 1, log=None) -> SplitSummary:
        """The summary of the users a rank owns (rank_records; all of them with one rank), streamed from the
        sequence shards, with progress lines through `log`. Ranks' summaries add up to the whole folder's
        (`merge`)."""
        num_items = shard_io.load_manifest(Path(shard_dir))["num_items"]
        return cls.from_records(users_read(shard_dir, rank, world, "reading every user's record once", log),
                                num_items)

    @classmethod
    def of_all_ranks(cls, shard_dir, rank: int, world: int, device: torch.device, log=None) -> SplitSummary:
        """The whole folder's summary on every rank, each rank reading only the users it owns (rank_records): the
        counts per item added up by one all-reduce, the evaluated users and targets (a few numbers per user)
        gathered."""
        part = cls.read(shard_dir, rank, world, log)
        if world == 1:
            return part
        counts = {}
        for name, c in part.counts.items():
            total = torch.from_numpy(c).to(device)
            dist.all_reduce(total)
            counts[name] = total.cpu().numpy()
        parts: list = [None] * world
        dist.all_gather_object(parts, cls({}, part.users, part.targets))
        return cls.merge(parts, counts=counts)

    @classmethod
    def merge(cls, parts: Sequence[SplitSummary], counts: dict[str, np.ndarray] | None = None) -> SplitSummary:
        """One summary of disjoint users' summaries (every rank's): counts added (or `counts`, added up elsewhere,
        e.g. by an all-reduce), users and targets in user order."""
        if counts is None:
            counts = {k: np.sum([p.counts[k] for p in parts], axis=0) for k in parts[0].counts}
        users = {k: np.concatenate([p.users[k] for p in parts]) for k in SPLITS}
        targets = {k: np.concatenate([p.targets[k] for p in parts]) for k in SPLITS}
        order = {k: np.argsort(users[k], kind="stable") for k in SPLITS}
        return cls(counts, {k: users[k][order[k]] for k in SPLITS}, {k: targets[k][order[k]] for k in SPLITS})

    @classmethod
    def from_records(cls, records: Iterable[dict], num_items: int) -> SplitSummary:
        """The summary of user records read one at a time (known_before says what each split counts)."""
        counts = {k: np.zeros(num_items, dtype=np.float64) for k in ("train", *SPLITS)}
        users, targets = {k: [] for k in SPLITS}, {k: [] for k in SPLITS}
        for s in records:
            items = np.asarray(s["items"], dtype=np.int64)
            np.add.at(counts["train"], items[: known_before(s, "train")], 1.0)
            if s["evaluated"]:
                # "valid" counts what "train" does; "test" adds each evaluated user's validation item
                counts["test"][items[known_before(s, "valid")]] += 1.0
                for split in SPLITS:
                    users[split].append(s["user"])
                    targets[split].append(items[known_before(s, split)])
        counts["test"] += counts["train"]
        counts["valid"] = counts["train"].copy()
        read = cls(counts, {k: np.asarray(users[k], dtype=np.int64) for k in SPLITS},
                   {k: np.asarray(targets[k], dtype=np.int64) for k in SPLITS})
        return cls.merge([read], counts=counts)  # users (and their targets) in user order


def interaction_counts(sequences: Iterable[dict], num_items: int, split: str = "train") -> np.ndarray:
    """Interactions per item over what is known before the split's targets (known_before): the training portions
    ("train", "valid"), plus each evaluated user's validation item ("test")."""
    return SplitSummary.from_records(sequences, num_items).counts[split]
