"""Command: recommendations from an export for every user of a catalogue (one JSON line per user, each user's whole
history, seen items excluded). The Python API is trainer/serving/recommender.py (Recommender).

    python -m transrec.trainer.commands.recommend --export DIR --shards DIR [--users all|FILE] [--k 20] [--out FILE]
        [--include-seen] [--device cpu|cuda] [--scoring export|model|mean|popularity] [--prior-beta X]

Items are scored as the export's scoring.json says (trainer/evaluation/scoring.py: the model's user vector, or the mean
of the history's item vectors, plus a popularity prior); absent, by the model's user vector alone. `--scoring` and
`--prior-beta` choose otherwise (trainer/commands/export_args.py).

Under the deepspeed launcher or torchrun (WORLD_SIZE > 1) each rank takes every WORLD_SIZE-th user and writes
FILE.rankN; rank 0 then joins the parts into FILE in user order. Memory stays flat in the number of users: users are
scored a batch at a time and written as they go.

A model giving NaN or infinite vectors cannot rank: the Recommender checks the catalogue's item vectors when it loads
(and each item added later) and every request's user vectors and scores, and raises ranking.NonFiniteScores naming
how many items or users are affected; the batch command stops with one line `error: ...` (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transrec.data_shards.integrity import IntegrityError
from transrec.data_shards.remote import local_shards
from transrec.data_shards.shard_io import read_id_maps
from transrec.trainer.commands.export_args import add_scoring_args, check_scoring_args, export_cli, scoring_from_args
from transrec.trainer.evaluation.ranking import NonFiniteScores
from transrec.trainer.serving.batch import UnknownUsers, recommend_users, select_users
from transrec.trainer.serving.recommender import Recommender


def main(argv: list[str] | None = None) -> int:
    p = export_cli("python -m transrec.trainer.commands.recommend", __doc__)
    p.add_argument("--users", default="all", help="'all', or a file of raw user ids, one per line")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON lines file (default: standard output)")
    p.add_argument("--include-seen", action="store_true", help="also recommend items the user already has")
    add_scoring_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed
    a = p.parse_args(argv)
    check_scoring_args(p, a)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not a.out:
        p.error("--out is required with several ranks (each writes a part, rank 0 joins them)")
    shards = Path(local_shards(a.shards))
    if not (shards / "manifest.json").exists():
        raise SystemExit(f"error: no shards at {shards}: build them with `python -m transrec.data_shards.build`")
    try:
        rec = Recommender.from_export(a.export, shards, a.device, show_progress=rank == 0)
        rec.scoring = scoring_from_args(a, rec.scoring)  # over the export's scoring.json
    except (FileNotFoundError, ValueError, IntegrityError) as e:
        raise SystemExit(f"error: {e}") from None
    if rec.unusable:
        raise SystemExit(f"error: {a.export}: {rec.unusable}")
    if not 1 <= a.k <= len(rec.item_ids):
        raise SystemExit(f"error: --k must be between 1 and the catalogue size {len(rec.item_ids)}")
    user_ids = read_id_maps(shards)["users"]
    try:
        users = select_users(user_ids, None if a.users == "all" else Path(a.users))
        n = recommend_users(rec, user_ids, users, a.k, not a.include_seen, Path(a.out) if a.out else None, rank,
                            world)
    except UnknownUsers as e:
        raise SystemExit(f"error: {e}") from None
    except NonFiniteScores as e:
        raise SystemExit(f"error: {a.export}: {e}") from None
    if rank == 0:
        print(f"recommended {a.k} items to {len(users)} users" + (f" in {a.out}" if a.out else "")
              + f" (scoring: {rec.scoring.label})", file=sys.stderr)
    return n


if __name__ == "__main__":
    main()
