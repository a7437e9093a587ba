"""transfer=auto's training-free candidates: the export scored on the target without any training
(trainer/evaluation/scoring.py).

- prior       the export's user encoder + the target popularity prior (beta chosen on the target's validation);
- content     the training-free content baseline: the mean of the history's item vectors (cosine), with the prior
              when it validates better (beta 0 is on the grid);
- popularity  the target's most frequent items: no content at all.

With the start (the export as it is), they make sure a run never ships a model that validates below popularity or
below what the export's towers give with no user encoder. Each writes a candidate folder as a trained candidate does
(metrics.json, valid_ranks_stage0.npy, test_ranks.tsv, test_ranks_popularity.tsv, export/ with scoring.json), so the
selection (transfer/selection.py) treats every candidate alike. They cost one evaluation of the export each (a few
seconds on MovieLens; beta: one ranking of the validation users per grid point).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from transrec.trainer.core.choices import Scorer
from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.feature_cache import resolve_store
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.evaluation.model_ranker import ranker_from_export
from transrec.trainer.evaluation.run_stats import write_ranks
from transrec.trainer.evaluation.scoring import Scoring, choose_prior, scoring_ranks, write_scoring

FREE_CANDIDATES = {"prior": "model", "content": "mean", "popularity": "none"}  # name -> the user vector it scores with


def score_candidate(name: str, model_user, item_vectors, valid: ev.EvalUsers, test: ev.EvalUsers,
                    counts_valid: np.ndarray, counts_test: np.ndarray, exclude_seen: bool, metric: str,
                    what: str = "the export") -> tuple[Scoring, np.ndarray, np.ndarray, list[dict]]:
    """The candidate `name` (FREE_CANDIDATES, or "start": the model's user vector, no prior) on one catalogue:
    (its scoring, validation ranks, test ranks, the prior's grid on validation). `model_user(hist, chunk)`: the
    export's user vectors; `counts_*`: interactions known before each split's targets (evaluate.interaction_counts)."""
    user = "model" if name == "start" else FREE_CANDIDATES[name]
    grid = []
    if user == "none":
        scoring = Scoring("none", 1.0)
        valid_ranks = ev.popularity_ranks(counts_valid, valid, exclude_seen)
    elif name == "start":
        scoring = Scoring("model")
        valid_ranks = scoring_ranks(model_user, item_vectors, valid, scoring, counts_valid, exclude_seen, what=what)
    else:
        choice = choose_prior(model_user, item_vectors, valid, user, counts_valid, exclude_seen, metric)
        scoring, valid_ranks, grid = choice.scoring, choice.ranks, choice.table
    test_ranks = scoring_ranks(model_user, item_vectors, test, scoring, counts_test, exclude_seen, what=what)
    return scoring, valid_ranks, test_ranks, grid


def run_training_free(cfg: RunConfig, name: str, rank: int) -> dict | None:
    """Score cfg.init_from on cfg.data.shards as the candidate `name` (FREE_CANDIDATES) into cfg.run_dir (the
    candidate's folder). Every rank ranks its share of the users; rank 0 writes. None when it finished earlier."""
    out = Path(cfg.run_dir)
    if (out / "metrics.json").exists():
        return None
    user, metric, exclude = FREE_CANDIDATES[name], cfg.eval.select, cfg.eval.exclude_seen
    export = Path(cfg.init_from)
    store = resolve_store(cfg.data.feature_store, Path(cfg.data.shards))
    ranker = ranker_from_export(export, Path(cfg.data.shards), "cpu", show_progress=False,
                                build_cache=user != "none", feature_store=store)
    n_items = ranker.store.num_items
    valid = ev.eval_users(ranker.sequences, "valid", ranker.model.cfg.max_len)
    test = ev.eval_users(ranker.sequences, "test", ranker.model.cfg.max_len)
    counts = ev.SplitSummary.from_records(ranker.sequences, n_items).counts  # one pass: every split's counts
    counts_valid, counts_test = counts["valid"], counts["test"]
    iv = ranker.item_vectors() if user != "none" else None

    def model_user(hist, chunk):
        return ranker.user_vectors(iv, hist, chunk)

    scoring, valid_ranks, test_ranks, grid = score_candidate(name, model_user, iv, valid, test, counts_valid,
                                                             counts_test, exclude, metric, f"the export {export}")
    if rank != 0:
        return None
    pop_valid = ev.popularity_ranks(counts_valid, valid, exclude)
    pop_test = ev.popularity_ranks(counts_test, test, exclude)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "valid_ranks_stage0.npy", valid_ranks)
    write_ranks(out / "test_ranks.tsv", test.users, test.targets, test_ranks)
    write_ranks(out / "test_ranks_popularity.tsv", test.users, test.targets, pop_test)
    tmp = out / "export.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export, tmp)
    write_scoring(tmp, scoring)
    shutil.rmtree(out / "export", ignore_errors=True)
    tmp.rename(out / "export")
    ks = cfg.eval.ks
    metrics = {"valid": ev.metrics_from_ranks(valid_ranks, ks), "test": ev.metrics_from_ranks(test_ranks, ks),
               "popularity_valid": ev.metrics_from_ranks(pop_valid, ks),
               "popularity_test": ev.metrics_from_ranks(pop_test, ks),
               "best": {"stage": 0, "epoch": 0, "file": None,
                        "scoring": Scorer.CONTENT if user != "none" else Scorer.POPULARITY},
               "scoring": {**scoring.to_dict(), "label": scoring.label}, "prior_grid": grid,
               "init_from": str(export)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "results.md").write_text(f"Training-free candidate {name}: {scoring.label}; validation {metric} "
                                    f"{metrics['valid'][metric]:.4f}, test NDCG@10 {metrics['test']['ndcg@10']:.4f} "
                                    f"(popularity {metrics['popularity_test']['ndcg@10']:.4f}).\n")
    return metrics
