"""Command: compare two finished runs on the same test users: metrics, and A - B with a paired bootstrap interval.

    python -m transrec.trainer.commands.compare RUN_A RUN_B [--metric ndcg@10|mrr] [--bootstrap 1000] [--out FILE.md]
        [--shards DIR]

A run is a run directory (its selected model: `test_ranks.tsv`), or RUN_DIR:stageN for one stage's best model
(`test_ranks_stageN.tsv`), or RUN_DIR:popularity. Both must rank the same users and targets (the same shards and
splits). The difference is reported over all test users, warm targets and cold targets (items in no user's
training portion), each with a 95% paired bootstrap interval over users; a subset of fewer than 30 users is not
judged. `--metric mrr` judges the reciprocal rank, which counts every position. Each run's median target rank is
shown beside half the catalogue, the median of a scorer that ranks at random. Prints Markdown; `--out` writes it
too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transrec.trainer.evaluation.run_comparison import comparison, load_run
from transrec.trainer.evaluation.run_stats import METRICS


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m transrec.trainer.commands.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", help="RUN_DIR, RUN_DIR:stageN or RUN_DIR:popularity")
    p.add_argument("run_b", help="RUN_DIR, RUN_DIR:stageN or RUN_DIR:popularity")
    p.add_argument("--metric", default="ndcg@10", choices=[*METRICS, "mrr"])
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    p.add_argument("--shards", default=None, help="the shards the runs were evaluated on, where the path a run "
                   "recorded is gone (a run made in another checkout); the folder name must match")
    a = p.parse_args(argv)
    text = comparison(load_run(a.run_a), load_run(a.run_b), a.metric, a.bootstrap, a.shards)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
