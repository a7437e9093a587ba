"""The run's results table: popularity, after stage 1, after stage 2, with paired bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.evaluate import paired_bootstrap, per_user_gain


def results_table(run_dir: Path, metrics: dict, pop_test: np.ndarray, n_boot: int) -> tuple[str, dict]:
    rows = [("popularity", metrics["popularity_test"], None)]
    intervals = {}
    for stage in sorted(metrics["stages"]):
        ranks = np.load(Path(run_dir) / f"test_ranks_stage{stage}.npy")
        iv = {
            m: paired_bootstrap(per_user_gain(ranks, m), per_user_gain(pop_test, m), n=n_boot)
            for m in ("hr@10", "ndcg@10")
        }
        intervals[f"stage{stage}"] = iv
        rows.append((f"after stage {stage}", metrics["stages"][stage]["test"], iv))
    best = metrics["best"]
    lines = [
        f"Test, leave-one-out, full ranking of the catalogue ({metrics['test']['users']} users, "
        f"exclude seen items: {metrics['exclude_seen']}); 95% paired bootstrap interval of the difference "
        "to popularity over users",
        "",
        "| model | HR@10 | NDCG@10 | HR@10 - pop [95% CI] | NDCG@10 - pop [95% CI] | valid NDCG@10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m, iv in rows:
        valid = metrics["popularity_valid"] if iv is None else metrics["stages"][name.split()[-1]]["valid"]
        cells = ["", ""]
        if iv is not None:
            cells = [f"{iv[k]['diff']:+.4f} [{iv[k]['low']:+.4f}, {iv[k]['high']:+.4f}]" for k in ("hr@10", "ndcg@10")]
        lines.append(
            f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {cells[0]} | {cells[1]} | {valid['ndcg@10']:.4f} |"
        )
    lines.append("")
    lines.append(
        f"best on validation: stage {best['stage']} epoch {best['epoch']} ({best['file']}); "
        f"metrics.json 'test' holds its figures"
    )
    return "\n".join(lines), intervals
