"""Recommendations for many users at once, one JSON line per user (the work of `python -m
transrec.trainer.commands.recommend`).

Each user's whole history is the query. Under several ranks each rank takes every WORLD_SIZE-th user and writes
FILE.rankN; rank 0 then joins the parts into FILE in user order. Memory stays flat in the number of users: users are
scored a batch at a time and written as they go. A model giving NaN or infinite scores stops the batch with
ranking.NonFiniteScores, and no half-written file is left behind to be taken for the recommendations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from transrec.trainer.evaluation.ranking import NonFiniteScores
from transrec.trainer.serving.recommender import Recommender


class UnknownUsers(ValueError):
    """Raw user ids asked for that the catalogue does not hold."""


def select_users(user_ids: list[str], wanted_file: Path | None) -> list[int]:
    """Every user of the catalogue (`wanted_file` None), or the users of a file of raw ids, one per line, in its
    order; UnknownUsers naming the ids the catalogue does not hold."""
    if wanted_file is None:
        return list(range(len(user_ids)))
    by_raw = {raw: i for i, raw in enumerate(user_ids)}
    wanted = [line.strip() for line in wanted_file.read_text().splitlines() if line.strip()]
    missing = [u for u in wanted if u not in by_raw]
    if missing:
        raise UnknownUsers(f"{len(missing)} user ids of {wanted_file} are not in the shards: {missing[:10]}")
    return [by_raw[u] for u in wanted]


def recommend_users(rec: Recommender, user_ids: list[str], users: list[int], k: int, exclude_seen: bool,
                    out: Path | None, rank: int = 0, world: int = 1) -> int:
    """This rank's share of `users` (every `world`-th) written to `out` (None: standard output; several ranks: each
    writes OUT.rankN and rank 0 joins them); returns the number of lines this rank wrote."""
    target = Path(f"{out}.rank{rank}") if world > 1 else out
    try:
        with (open(target, "w") if target else sys.stdout) as f:
            n = batch_recommend(rec, rec.ranker.sequences, user_ids, users[rank::world], k, exclude_seen, f)
    except NonFiniteScores:
        if target:
            target.unlink(missing_ok=True)
        raise
    if world > 1:
        join_parts(out, world, rank)
    return n


def batch_recommend(rec: Recommender, sequences: list[dict], user_ids: list[str], users: list[int], k: int,
                    exclude_seen: bool, out, batch: int = 256) -> int:
    """Write one JSON line per user (whole history); returns the number written."""
    written = 0
    for start in range(0, len(users), batch):
        chunk = users[start:start + batch]
        histories = [list(sequences[u]["items"]) for u in chunk]
        scores, items = rec.top_k(histories, k, exclude_seen)
        for row, u in enumerate(chunk):
            keep = torch.isfinite(scores[row])
            out.write(json.dumps({"user": user_ids[u], "items": [rec.item_ids[i] for i in items[row][keep].tolist()],
                                  "scores": [round(float(s), 6) for s in scores[row][keep]]}) + "\n")
            written += 1
    return written


def join_parts(out: Path, world: int, rank: int) -> None:
    """Rank 0 interleaves the parts back into user order (part r holds users r, r + world, ...)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if rank == 0:
        parts = [open(f"{out}.rank{r}") for r in range(world)]
        with open(out, "w") as f:
            done = False
            while not done:
                done = True
                for part in parts:
                    line = part.readline()
                    if line:
                        f.write(line)
                        done = False
        for r, part in enumerate(parts):
            part.close()
            Path(f"{out}.rank{r}").unlink()
    dist.barrier()
    dist.destroy_process_group()
