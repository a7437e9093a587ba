"""The leave-one-catalogue-out study's rows that train on the target: scratch, and the source's export fine-tuned.

One run per (target, source, seed): `transfer=auto` from the source's export with scratch included
(trainer/training/transfer_auto.py), so a single run trains every candidate on the target's training split, under the
same preset (`cpu-small`, both stages) and seed:

- scratch: a model trained on the target alone (the source is not used);
- fine-tuned: the export, both stages on the target;
- towers + new user encoder: the export's item towers, the user encoder started afresh;
- auto choice: the candidate transfer=auto keeps on the target's validation split (training-free ones included).

Each row's per-user test ranks come from the candidate's test_ranks.tsv, put in the order of the study's test users,
so that they pair with the training-free rows (trainer/experiments/leave_one_out_report.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.presets import preset
from transrec.trainer.evaluation.run_stats import read_ranks
from transrec.trainer.experiments.leave_one_out_report import AUTO_ROW
from transrec.trainer.training.run import train

# report row -> the transfer=auto candidate it reads
TRAINED_ROWS = {"scratch": "scratch", "fine-tuned": "finetune", "towers + new user encoder": "towers"}
CANDIDATES = "start,popularity,content,prior,finetune,towers"  # with scratch: include_scratch


def target_config(target_shards: Path, export: Path, run_dir: Path, seed: int) -> RunConfig:
    """transfer=auto from `export` on the target, scratch included: `cpu-small`, both stages."""
    cfg = preset("cpu-small")
    cfg.data.shards, cfg.run_dir, cfg.seed, cfg.init_from = str(target_shards), str(run_dir), seed, str(export)
    cfg.transfer.mode, cfg.transfer.candidates, cfg.transfer.include_scratch = "auto", CANDIDATES, True
    cfg.monitor.projector = False
    return cfg


def target_run(target_shards: Path, export: Path, run_dir: Path, seed: int) -> Path:
    """The target's trained run, once (reused when its selection was written)."""
    if not (run_dir / "metrics.json").exists():
        train(target_config(target_shards, export, run_dir, seed), overwrite=True)
    return run_dir


def ranks_in_order(path: Path, users: list[int], targets: list[int]) -> list[int]:
    """A candidate's per-user test ranks in the order of the study's test users; a user missing, or a target that
    differs, means the two evaluations are not of the same test split, which is an error, not a row."""
    u, t, r = read_ranks(path)
    by_user = {int(a): (int(b), int(c)) for a, b, c in zip(u, t, r)}
    missing = [x for x in users if x not in by_user]
    if missing or len(by_user) != len(users):
        raise ValueError(f"{path}: {len(by_user)} test users against the study's {len(users)} "
                         f"({len(missing)} of the study's missing, e.g. {missing[:3]}): not the same test split")
    wrong = [x for x, tgt in zip(users, targets) if by_user[x][0] != tgt]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} users' test targets differ from the study's (e.g. user {wrong[0]}): "
                         "not the same test split")
    return [by_user[x][1] for x in users]


def trained_rows(run_dir: Path, users: list[int], targets: list[int]) -> dict[str, dict]:
    """{row: {"valid", "test", "test_ranks"[, "chose"]}} of a finished target run; the popularity candidate's ranks
    are returned as "popularity (check)" so that the caller can see both evaluations rank alike."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = {}
    for row, cand in {**TRAINED_ROWS, "popularity (check)": "popularity"}.items():
        d = run_dir / "candidates" / cand
        m = json.loads((d / "metrics.json").read_text())
        rows[row] = {"valid": m["valid"], "test": m["test"],
                     "test_ranks": ranks_in_order(d / "test_ranks.tsv", users, targets)}
    chosen = metrics["transfer"]["selected"]
    d = run_dir / "candidates" / chosen
    m = json.loads((d / "metrics.json").read_text())
    rows[AUTO_ROW] = {"valid": m["valid"], "test": m["test"], "chose": chosen,
                             "test_ranks": ranks_in_order(d / "test_ranks.tsv", users, targets)}
    return rows


def check_same_popularity(rows: dict, study_popularity: list[int], run_dir: Path) -> None:
    """The target run's popularity candidate must rank as the study's popularity row: same users, same targets,
    same exclusion of seen items. Otherwise its rows cannot be paired with the study's."""
    a, b = np.asarray(rows.pop("popularity (check)")["test_ranks"]), np.asarray(study_popularity)
    if not np.array_equal(a, b):
        raise ValueError(f"{run_dir}: its popularity ranks differ from the study's on {int((a != b).sum())} of "
                         f"{len(a)} test users: the two evaluations do not rank alike (seen-item exclusion?)")
