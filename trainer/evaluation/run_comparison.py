"""Two finished runs compared on the same test users (the work of `python -m transrec.trainer.commands.compare`): each
run's ranks (its selected model, one stage's best model or popularity), and A - B over all, warm and cold targets with
95% paired bootstrap intervals, as Markdown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transrec.trainer.core.choices import record_scoring
from transrec.trainer.evaluation.run_stats import (
    SUBSETS,
    cold_mask,
    compare,
    read_ranks,
    seed_metrics,
    subset_mask,
    training_items,
)


@dataclass
class RankedRun:
    label: str
    run_dir: Path
    users: np.ndarray
    targets: np.ndarray
    ranks: np.ndarray
    model: str  # which model's ranks: "selected: stage 1 (content)", "stage 2 (cpc)", "popularity"
    shards: Path


def load_run(spec: str) -> RankedRun:
    run_dir, _, which = spec.partition(":")
    d = Path(run_dir)
    if not (d / "metrics.json").exists():
        raise SystemExit(f"error: {d} has no metrics.json: pass the directory of a finished run (trainer/main.py "
                         "--run-dir, or the path printed at the end of a run)")
    metrics = json.loads((d / "metrics.json").read_text())
    config = json.loads((d / "run_config.json").read_text())["config"]
    if not which:
        best = metrics["best"]
        name, model = "test_ranks.tsv", f"selected: stage {best['stage']} ({record_scoring(best)})"
    elif which == "popularity":
        name, model = "test_ranks_popularity.tsv", "popularity"
    elif which.startswith("stage") and which[5:] in metrics.get("stages", {}):
        stage = which[5:]
        record = {"stage": stage, **metrics["stages"][stage]}
        name, model = f"test_ranks_stage{stage}.tsv", f"stage {stage} ({record_scoring(record)})"
    else:
        stages = ", ".join(f"stage{s}" for s in metrics.get("stages", {}))
        raise SystemExit(f"error: {spec}: unknown model {which!r}; this run has {stages}, or popularity")
    if not (d / name).exists():
        raise SystemExit(f"error: {d / name} is missing (a pruned run keeps only its selected model's ranks)")
    users, targets, ranks = read_ranks(d / name)
    return RankedRun(spec, d, users, targets, ranks, model, Path(config["data"]["shards"]))


def relocated_shards(run: RankedRun, shards: str | None) -> Path:
    """The run's recorded shards, or `shards` where the run was made in another checkout; the folder's name (which
    carries the build's hash) must match the recorded one."""
    if shards is None:
        if not run.shards.exists():
            raise SystemExit(f"error: the shards of {run.label} ({run.shards}) are gone, so cold targets cannot be "
                             "found: pass --shards DIR, the same shards in this checkout")
        return run.shards
    given = Path(shards)
    if given.name != run.shards.name or not (given / "manifest.json").exists():
        raise SystemExit(f"error: --shards {given} is not the build {run.label} was evaluated on ({run.shards.name}): "
                         "pass the folder of that name")
    return given


def comparison(a: RankedRun, b: RankedRun, metric: str, n_boot: int, shards: str | None = None) -> str:
    if not (np.array_equal(a.users, b.users) and np.array_equal(a.targets, b.targets)):
        raise SystemExit(f"error: {a.label} and {b.label} rank different test users or targets: compare runs on the "
                         "same shards (same users, items and splits)")
    a.shards = relocated_shards(a, shards)
    cold = cold_mask(a.targets, training_items(a.shards))
    shown = ["hr@10"] + ([metric] if metric != "hr@10" else [])
    num_items = json.loads((a.shards / "manifest.json").read_text())["num_items"]
    lines = [f"Test users: {len(a.users)} ({int((~cold).sum())} warm, {int(cold.sum())} cold targets: items in no "
             f"user's training portion); shards {a.shards}; {num_items} items, so a random ranking puts the median "
             f"target near rank {num_items // 2}", "",
             "| run | model | " + " | ".join(f"{m} {s}" for s in SUBSETS for m in [*shown, "median rank"]) + " |",
             "|---|---|" + "---|" * (len(SUBSETS) * (len(shown) + 1))]
    for run in (a, b):
        m = seed_metrics(run.ranks, cold, shown)
        cells = []
        for subset in SUBSETS:
            users = m[subset]["users"]
            cells += [f"{m[subset][k]:.4f}" if users else "-" for k in shown]
            cells.append(f"{np.median(run.ranks[subset_mask(cold, subset)]):.0f}" if users else "-")
        lines.append(f"| {run.label} | {run.model} | " + " | ".join(cells) + " |")
    lines += ["", f"A - B on {metric} (A = {a.label}, B = {b.label}), 95% paired bootstrap over users "
              f"({n_boot} resamples):", "", "| subset | users | A - B | 95% interval | verdict |",
              "|---|---|---|---|---|"]
    for subset in SUBSETS:
        r = compare(a.ranks[None], b.ranks[None], cold, metric, subset, n=n_boot)
        interval = "" if r["verdict"] == "not judged" else f"[{r['low']:+.4f}, {r['high']:+.4f}]"
        diff = "" if r["verdict"] == "not judged" else f"{r['diff']:+.4f}"
        verdict = {"win": "A better", "loss": "B better"}.get(r["verdict"], r["verdict"])
        if r["verdict"] == "not judged":
            verdict = f"not judged: {r['users']} users (< {r['min_users']})"
        lines.append(f"| {subset} | {r['users']} | {diff} | {interval} | {verdict} |")
    return "\n".join(lines)
