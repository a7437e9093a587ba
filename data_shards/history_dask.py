"""User histories on Dask, for a log partitioned into many files, on one machine's cores or a cluster's.

`--engine dask` runs the history stage as a map and a reduce of Dask tasks (dask.delayed, scheduled by Dask: local
processes by default, or the cluster of `--dask-scheduler ADDRESS` through dask.distributed; every worker must see
the scratch folder, e.g. a shared file system):

- map, one task per part file: read and check its rows (data_shards/log_reader.py, the same checks and reports),
  look each item up, and append each kept row to one of `buckets` files by a stable hash of its user;
- reduce, one task per bucket: order each user's rows by (time, file, row), count repeats and apply the dedup rule,
  sort the bucket's users by the builder's user order, and store them as arrays (read back memory-mapped).

The client then merges the sorted buckets (a k-way merge of their users) into the existing sequence writer, so the
shard folder is the one the other engines write, to the byte (tests/test_history_engine.py). Only that last pass is
sequential; parsing, shuffling, sorting and dedup run wherever Dask runs them. Why Dask rather than Spark or Ray: pure
Python (no JVM), the same task code on a laptop and on a cluster, and small wheels (no Arrow needed here).
"""

from __future__ import annotations

import heapq
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from transrec.data_shards.bad_input import Problems
from transrec.data_shards.history_engine import FILE_SHIFT
from transrec.data_shards.log_reader import log_files, read_log

DEFAULT_BUCKETS = 64


def user_order(raw: str, first_seen: int) -> tuple:
    """The builder's user order (data_shards/build_input.sort_key, history_engine.USER_ORDER): ASCII-digit ids by
    their number, then the others by code point; equal numbers by their first interaction in the log."""
    if raw.isascii() and raw.isdigit():
        digits = raw.lstrip("0")
        return 0, len(digits), digits, first_seen
    return 1, 0, raw, first_seen


def bucket_of(users: list[str], buckets: int) -> np.ndarray:
    """A stable hash (the same in every process, unlike hash()) of each user into [0, buckets)."""
    return np.fromiter((zlib.crc32(u.encode("utf-8", "surrogatepass")) % buckets for u in users), np.int64,
                       len(users))


def map_part(part: Path, file_no: int, fmt: str | None, cols: tuple[str, str, str | None],
             item_index: dict[str, int], all_items: frozenset[str], buckets: int, scratch: Path) -> dict:
    """One part file: its rows checked, looked up and appended to the bucket files of their users."""
    problems = Problems()
    unknown, no_content, rows = [], 0, 0
    for c, chunk in enumerate(read_log(part, *cols, problems, fmt)):
        rows += len(chunk.users)
        idx = np.fromiter((item_index.get(x, -1) for x in chunk.items), np.int64, len(chunk.items))
        missing = [k for k in np.flatnonzero(idx < 0) if chunk.items[k] not in all_items]
        unknown += [(int(chunk.rows[k]), chunk.items[k], chunk.users[k]) for k in missing]
        no_content += int((idx < 0).sum()) - len(missing)
        keep = np.flatnonzero(idx >= 0)
        df = pd.DataFrame({"usr": pd.Series([chunk.users[k] for k in keep], dtype=object), "idx": idx[keep],
                           "t": chunk.times[keep], "pos": chunk.rows[keep] + file_no * FILE_SHIFT})
        for b, part_df in df.groupby(bucket_of(list(df["usr"]), buckets), sort=True):
            part_df.to_pickle(scratch / "map" / f"b{b:05d}-f{file_no:06d}-c{c:06d}.pkl")
    return {"file": part.name, "rows": rows, "unparseable": problems.found["unparseable_row"], "unknown": unknown,
            "no_content": no_content}


def reduce_bucket(b: int, dedup: str, has_time: bool, scratch: Path) -> dict:
    """One bucket: order, count repeats, dedup, sort its users; arrays to scratch/sorted/b{b}.*"""
    files = sorted((scratch / "map").glob(f"b{b:05d}-*.pkl"))
    out = scratch / "sorted" / f"b{b:05d}"
    if not files:
        return {"bucket": b, "users": 0, "found": 0, "removed": 0}
    df = pd.concat([pd.read_pickle(f) for f in files], ignore_index=True)
    df = df.sort_values(["usr", "t", "pos"], kind="mergesort", ignore_index=True)
    repeat = ["idx", "t"] if has_time and dedup != "first" else ["idx"]
    found = int(df.duplicated(["usr", *repeat]).sum())
    first_seen = df.groupby("usr", sort=False)["pos"].min()
    removed = 0
    if dedup != "keep":
        drop = df.duplicated(["usr", "idx"] if dedup == "first" else ["usr", "idx", "t"])
        removed = int(drop.sum())
        df = df[~drop.to_numpy()]
    users = sorted(first_seen.index, key=lambda u: user_order(u, int(first_seen[u])))
    rank = pd.Series(np.arange(len(users)), index=users)
    df = df.assign(r=rank.loc[df["usr"]].to_numpy()).sort_values(["r", "t", "pos"], kind="mergesort")
    counts = np.bincount(df["r"].to_numpy(), minlength=len(users))
    np.save(f"{out}.items.npy", df["idx"].to_numpy(np.int64))
    np.save(f"{out}.times.npy", df["t"].to_numpy(np.float64))
    np.save(f"{out}.offsets.npy", np.r_[0, np.cumsum(counts)].astype(np.int64))
    with open(f"{out}.users.jsonl", "w") as f:
        f.writelines(json.dumps([u, int(first_seen[u])]) + "\n" for u in users)
    for p in files:
        p.unlink()
    return {"bucket": b, "users": len(users), "found": found, "removed": removed}


@dataclass
class DaskHistories:
    """What data_shards/build.py needs of the histories, read back from the sorted buckets."""

    scratch: Path
    buckets: list[int] = field(default_factory=list)
    num_users: int = 0
    duplicates: int = 0
    removed: int = 0
    dropped_no_content: int = 0
    rows_read: int = 0
    # users_among's last answer: (the names asked about, the users among them, the others), one merge pass for both
    _among: tuple[object, list[str], list[str]] | None = None

    def _users(self, b: int) -> Iterator[tuple[tuple, str, int, int]]:
        """(order key, raw id, bucket, position in the bucket) of a bucket's users, in order."""
        with open(self.scratch / "sorted" / f"b{b:05d}.users.jsonl") as f:
            for k, line in enumerate(f):
                raw, first = json.loads(line)
                yield user_order(raw, first), raw, b, k

    def _merged(self) -> Iterator[tuple[tuple, str, int, int]]:
        return heapq.merge(*(self._users(b) for b in self.buckets))

    def histories(self) -> Iterator[tuple[str, list[int], list[float]]]:
        arrays = {}
        for b in self.buckets:
            base = self.scratch / "sorted" / f"b{b:05d}"
            arrays[b] = tuple(np.load(f"{base}.{n}.npy", mmap_mode="r") for n in ("items", "times", "offsets"))
        for _key, raw, b, k in self._merged():
            items, times, offsets = arrays[b]
            s, e = offsets[k], offsets[k + 1]
            yield raw, items[s:e].tolist(), times[s:e].tolist()

    def raw_users(self) -> Iterator[str]:
        return (raw for _key, raw, _b, _k in self._merged())

    def users_among(self, names: Iterable[str], present: bool) -> list[str]:
        """The shard users (in shard order) that are (present=True) or are not among `names`: both lists from one
        merge pass over the buckets, kept for the next call with the same `names` (the build asks for both)."""
        if self._among is None or self._among[0] is not names:
            named, inside, outside = set(names), [], []
            for raw in self.raw_users():
                (inside if raw in named else outside).append(raw)
            self._among = (names, inside, outside)
        return list(self._among[1] if present else self._among[2])

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def dask_histories(log: Path, fmt: str | None, cols: tuple[str, str, str | None], item_index: dict[str, int],
                   all_items: Iterable[str], dedup: str, has_time: bool, problems: Problems, problem_file: str,
                   scratch_parent: Path | None = None, buckets: int = DEFAULT_BUCKETS, scheduler: str | None = None,
                   workers: int | None = None) -> DaskHistories:
    """Run the map and reduce tasks on Dask and return the sorted buckets. `scheduler`: a dask.distributed address
    (tcp://host:8786), or None for this machine's processes (`workers` of them)."""
    import dask  # optional: only --engine dask needs it (setup.py's "distributed" extra)

    if scratch_parent is not None:  # the folder --out will be written into may not exist yet
        scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".history-dask-", dir=scratch_parent))
    (scratch / "map").mkdir()
    (scratch / "sorted").mkdir()
    out = DaskHistories(scratch)
    try:
        parts = log_files(log)
        items = frozenset(all_items)
        maps = [dask.delayed(map_part)(p, k, fmt, cols, item_index, items, buckets, scratch)
                for k, p in enumerate(parts)]
        mapped = _compute(maps, scheduler, workers)
        for m in mapped:  # the reports in log order: parts in name order, rows in file order
            out.rows_read += m["rows"]
            out.dropped_no_content += m["no_content"]
            for p in m["unparseable"]:
                problems.add("unparseable_row", **p)
        for m in mapped:
            name = problem_file if len(parts) == 1 else m["file"]
            for row, item, user in sorted(m["unknown"]):
                problems.add("unknown_item", file=name, line=row, item=item, user=user)
        reduced = _compute([dask.delayed(reduce_bucket)(b, dedup, has_time, scratch) for b in range(buckets)],
                           scheduler, workers)
        out.buckets = [r["bucket"] for r in reduced if r["users"]]
        out.num_users = sum(r["users"] for r in reduced)
        out.duplicates = sum(r["found"] for r in reduced)
        out.removed = sum(r["removed"] for r in reduced)
        return out
    except BaseException:
        out.close()
        raise


def _compute(tasks: list, scheduler: str | None, workers: int | None) -> list:
    import dask  # optional: only --engine dask needs it

    if scheduler:
        from dask.distributed import Client  # optional: a cluster's scheduler (pip install distributed)

        with Client(scheduler):
            return list(dask.compute(*tasks))
    return list(dask.compute(*tasks, scheduler="processes", num_workers=workers))
