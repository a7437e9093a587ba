"""The run's results table: popularity and every evaluated model (by stage and by how it scores), with paired
bootstrap intervals against popularity, the selected model, and a loud line when it does not beat popularity."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transrec.trainer.core.choices import record_scoring
from transrec.trainer.evaluation.ranking import metrics_from_ranks, paired_bootstrap, per_user_gain
from transrec.trainer.monitoring.run_curves import CURVES_FILE, write_curves


def write_run_results(run_dir: Path, state: dict, best_stage: str, test_ranks: np.ndarray, pop_valid: np.ndarray,
                      pop_test: np.ndarray, cold: np.ndarray, eval_cfg, log: Callable[[str], None] = print,
                      evaluated_users: dict | None = None) -> dict:
    """metrics.json, results.md and curves.png (trainer/monitoring/run_curves.py) of a finished run; prints the table
    and logs a warning when the selected model does not beat popularity. `state` is the trainer's record of each stage's
    best model on validation; `evaluated_users`: how many test users were ranked of how many (eval.max_users)."""
    ks = eval_cfg.ks
    best = state["stage_best"][best_stage]
    metrics = {
        "valid": best["valid"],
        "test": metrics_from_ranks(test_ranks, ks),
        "popularity_valid": metrics_from_ranks(pop_valid, ks),
        "popularity_test": metrics_from_ranks(pop_test, ks),
        "best": {"stage": int(best_stage), "epoch": best["epoch"], "file": f"best_stage{best_stage}.safetensors",
                 "scoring": record_scoring(best)},
        "stages": {s: {"valid": r["valid"], "test": state["test"][s], "scoring": record_scoring(r), "epoch": r["epoch"]}
                   for s, r in state["stage_best"].items()},
        "exclude_seen": eval_cfg.exclude_seen,
        # cold test targets: items in no user's training portion; only content scoring can rank them
        "cold_test": metrics_from_ranks(test_ranks[cold], ks) if cold.any() else {"users": 0},
    }
    if evaluated_users is not None:
        metrics["evaluated_users"] = evaluated_users
    table, intervals = results_table(run_dir, metrics, pop_test, eval_cfg.bootstrap)
    metrics["vs_popularity"] = intervals
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_curves(run_dir)  # from the records just written: loss per stage, validation per epoch, popularity
    if evaluated_users and evaluated_users.get("sampled"):
        table += (f"\n\nEvery figure is over a seeded sample of {evaluated_users['evaluated']:,} of the "
                  f"{evaluated_users['of']:,} evaluated users (eval.max_users, seed {evaluated_users['seed']}).")
    (run_dir / "results.md").write_text(f"{table}\n\n![training loss and validation NDCG@10]({CURVES_FILE})\n")
    print(table, flush=True)
    verdict = popularity_verdict(intervals[f"stage{best_stage}"]["ndcg@10"])
    if verdict:
        log(verdict.replace("**", ""))
    return metrics


def results_table(run_dir: Path, metrics: dict, pop_test: np.ndarray, n_boot: int) -> tuple[str, dict]:
    rows = [("popularity", metrics["popularity_test"], None, None)]
    intervals = {}
    for stage in sorted(metrics["stages"]):
        ranks = np.load(Path(run_dir) / f"test_ranks_stage{stage}.npy")
        iv = {
            m: paired_bootstrap(per_user_gain(ranks, m), per_user_gain(pop_test, m), n=n_boot)
            for m in ("hr@10", "ndcg@10")
        }
        intervals[f"stage{stage}"] = iv
        label = "untrained (stage 0)" if stage == "0" else f"after stage {stage}"
        rows.append((f"{label}, {metrics['stages'][stage].get('scoring', '?')}", metrics["stages"][stage]["test"], iv,
                     stage))
    best = metrics["best"]
    lines = [
        f"Test, leave-one-out, full ranking of the catalogue ({metrics['test']['users']} users, "
        f"exclude seen items: {metrics['exclude_seen']}); 95% paired bootstrap interval of the difference "
        "to popularity over users",
        "",
        "| model | HR@10 | NDCG@10 | HR@10 - pop [95% CI] | NDCG@10 - pop [95% CI] | valid NDCG@10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m, iv, stage in rows:
        valid = metrics["popularity_valid"] if stage is None else metrics["stages"][stage]["valid"]
        name = f"**{name} (selected)**" if stage is not None and int(stage) == int(best["stage"]) else name
        cells = ["", ""]
        if iv is not None:
            cells = [f"{iv[k]['diff']:+.4f} [{iv[k]['low']:+.4f}, {iv[k]['high']:+.4f}]" for k in ("hr@10", "ndcg@10")]
        lines.append(
            f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {cells[0]} | {cells[1]} | {valid['ndcg@10']:.4f} |"
        )
    lines.append("")
    lines.append(
        f"selected: stage {best['stage']} epoch {best['epoch']} ({best['file']}, scoring: {best.get('scoring')}), "
        "the best content-scoring model on validation (the model that is exported and transfers); metrics.json "
        "'test' holds its figures"
    )
    cold = metrics.get("cold_test", {"users": 0})
    if cold["users"]:
        lines.append(f"cold test targets (items in no user's training portion): {cold['users']} of "
                     f"{metrics['test']['users']}; the selected model on them: HR@10 {cold['hr@10']:.4f}, "
                     f"NDCG@10 {cold['ndcg@10']:.4f}")
    else:
        lines.append("cold test targets (items in no user's training portion): none")
    verdict = popularity_verdict(intervals[f"stage{best['stage']}"]["ndcg@10"])
    if verdict:
        lines += ["", verdict]
    return "\n".join(lines), intervals


def popularity_verdict(iv: dict) -> str:
    """'' when the selected model beats popularity (interval above 0), else a warning that says which way."""
    if iv["low"] > 0:
        return ""
    if iv["high"] < 0:
        return (f"**WARNING: the selected model is WORSE than popularity** (test NDCG@10 {iv['diff']:+.4f} "
                f"[{iv['low']:+.4f}, {iv['high']:+.4f}]): train longer, check the data, or recommend popular items.")
    return (f"**WARNING: the selected model does not beat popularity** (test NDCG@10 {iv['diff']:+.4f} "
            f"[{iv['low']:+.4f}, {iv['high']:+.4f}], the interval includes 0).")
