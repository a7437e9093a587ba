"""Every user's sequence, held compactly: what the trainer and the evaluator keep in memory on each rank.

`read_sequences` (shard_io) gives one Python dict of lists per user, about 40 bytes per interaction; a
`SequenceTable` holds the same samples as flat arrays (items int32 and timestamps float64 per interaction, offsets
per user: 12 bytes per interaction), read from the shards in one pass. Indexing or iterating gives the same dict a
sequence record holds, built on demand, with `items` and `timestamps` as numpy arrays:

    table = SequenceTable(shard_dir)
    s = table[u]          # {"user", "raw_id", "items", "timestamps", "num_train", "evaluated", "features"}
    for s in table: ...   # users in index order
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transrec.data_shards.shard_io import load_manifest, sequence_records


class SequenceTable:
    def __init__(self, shard_dir: Path | str):
        shard_dir = Path(shard_dir)
        manifest = load_manifest(shard_dir)
        n = manifest["num_users"]
        self.num_train = np.zeros(n, dtype=np.int32)
        self.evaluated = np.zeros(n, dtype=bool)
        self.raw_ids: list[str | None] = [None] * n
        lengths = np.full(n, -1, dtype=np.int64)
        chunks = []  # per shard: (users, item ids, timestamps, {feature: (users' value counts, values)})
        for name in manifest["shards"]["sequences"]:
            users, items, stamps, feats = [], [], [], {}
            for r in sequence_records(shard_dir / name):
                u = r["user"]
                if not 0 <= u < n or lengths[u] >= 0:
                    raise ValueError(f"{shard_dir / name} holds user {u} twice or outside 0..{n - 1}: rebuild the "
                                     "shards")
                users.append(u)
                lengths[u] = len(r["items"])
                items.extend(r["items"])
                stamps.extend(r["timestamps"])
                self.num_train[u], self.evaluated[u], self.raw_ids[u] = r["num_train"], r["evaluated"], r["raw_id"]
                for f, values in r["features"].items():
                    counts, flat = feats.setdefault(f, ({}, []))
                    counts[u] = len(values)
                    flat.extend(values)
            chunks.append((users, np.asarray(items, dtype=np.int32), np.asarray(stamps, dtype=np.float64), feats))
        if (lengths < 0).any():
            raise ValueError(f"sequence shards in {shard_dir} do not hold users 0..{n - 1} "
                             f"({int((lengths < 0).sum())} missing): rebuild them")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.items = np.empty(self.offsets[-1], dtype=np.int32)
        self.timestamps = np.empty(self.offsets[-1], dtype=np.float64)
        names = sorted({f for *_, feats in chunks for f in feats})
        feature_counts = {f: np.full(n, -1, dtype=np.int64) for f in names}  # -1: the user's record lacks it
        for users, items, stamps, feats in chunks:
            at = 0
            for u in users:
                o, length = self.offsets[u], lengths[u]
                self.items[o : o + length] = items[at : at + length]
                self.timestamps[o : o + length] = stamps[at : at + length]
                at += length
            for f, (counts, _) in feats.items():
                for u, c in counts.items():
                    feature_counts[f][u] = c
        self.features = {}  # name -> (offsets [n + 1], values, whether each user's record names the feature)
        for f in names:
            counts = feature_counts[f]
            offsets = np.concatenate([[0], np.cumsum(np.maximum(counts, 0))])
            values = np.empty(offsets[-1], dtype=np.int64)
            for users, _, _, feats in chunks:
                if f not in feats:
                    continue
                counts_here, flat = feats[f]
                at = 0
                for u in users:
                    c = counts_here.get(u)
                    if c is not None:
                        values[offsets[u] : offsets[u] + c] = flat[at : at + c]
                        at += c
            self.features[f] = (offsets, values, counts >= 0)

    def __len__(self) -> int:
        return len(self.num_train)

    def __getitem__(self, u: int) -> dict:
        u = int(u)
        if not 0 <= u < len(self):
            raise IndexError(f"user {u} outside 0..{len(self) - 1}")
        o, end = self.offsets[u], self.offsets[u + 1]
        feats = {f: values[offs[u] : offs[u + 1]].tolist() for f, (offs, values, has) in self.features.items()
                 if has[u]}
        return {"user": u, "raw_id": self.raw_ids[u], "items": self.items[o:end].astype(np.int64),
                "timestamps": self.timestamps[o:end].copy(), "num_train": int(self.num_train[u]),
                "evaluated": bool(self.evaluated[u]), "features": feats}

    def __iter__(self) -> Iterator[dict]:
        return (self[u] for u in range(len(self)))

    def nbytes(self) -> int:
        """Bytes of the arrays (the raw id strings not counted)."""
        arrays = [self.num_train, self.evaluated, self.offsets, self.items, self.timestamps]
        arrays += [a for parts in self.features.values() for a in parts]
        return sum(a.nbytes for a in arrays)
