"""Cross-catalogue transfer: does a source export serve a catalogue it never saw, with no training on it?

    python -m transrec.trainer.experiments.cross_catalogue [--seeds 3] [--splits ml,hm] \
        [--sources scratch,scratch-popcorr] [--set section.key=value ...] [--out reports]

Two source -> target pairs that share no item and no user:

- ml: MovieLens cut by release date (data_shards/split_by_release.py): films up to 1995 -> films after 1995, a new
  catalogue of the same kind;
- hm: H&M half A -> half B (data_shards/split_disjoint.py), the same platform: the control where zero-shot worked.

For each source seed (the source run is trained by the experiments runner, cached in OUT/runs/ and kept with its
export) the export is scored on the target with no target training, in every way trainer/evaluation/scoring.py offers:
its user encoder ("zero-shot"), the training-free content baseline (the mean of the history's item vectors, cosine),
each with and without the target popularity prior (beta chosen on the target's validation split), and popularity.
"training-free auto" is the one of these that validates best: what transfer=auto's training-free candidates give.
Each `--sources` model is a source variant (scratch-popcorr: the popularity-corrected content softmax).

The diagnosis (per seed): how much of the source model's item score follows the source's popularity (Spearman
correlation of item-vector norms and of mean scores with the source counts), how the target's popular items fare
under the source model, ranks by the target item's modality, and the source model on its own catalogue cut to the
target's size (is the catalogue's size the cause?). Results are cached per run under RUN/cross_catalogue/; the
report (reports/cross_catalogue.md) is written by cross_catalogue_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from transrec.trainer.core.config import RunConfig
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.evaluation.model_ranker import ranker_from_export
from transrec.trainer.evaluation.scoring import Scoring, choose_prior, scoring_ranks
from transrec.trainer.experiments.cross_catalogue_report import write_report
from transrec.trainer.experiments.plans import SOURCE_OF, RunSpec
from transrec.trainer.experiments.suite import Suite, SuiteOptions

SPLITS = {"ml": "ml-new-mixed", "hm": "hm-b-mixed"}  # split -> target domain (its source: plans.SOURCE_OF)
# the settings of the H&M same-platform study whose zero-shot win this report keeps as its control
REPORT_SETTINGS_TEXT = "128-px images, no early stopping"


def report_settings(c: RunConfig) -> None:
    c.model.image.size, c.eval.patience = 128, 0
RESULT_VERSION = 2


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def with_excluded(data: ev.EvalUsers, items: np.ndarray) -> ev.EvalUsers:
    """`data` with `items` added to every user's excluded (seen) items: a catalogue cut to the rest; the target
    itself always stays ranked (evaluate.excluded_pairs keeps it)."""
    rows = [np.union1d(data.seen[i], items).astype(np.int32) for i in range(len(data))]
    return ev.EvalUsers(data.users, data.histories, data.targets, ev.Ragged.from_rows(rows), data.features)


def mean_scores(model_user, iv: torch.Tensor, data: ev.EvalUsers, sample: int = 512) -> np.ndarray:
    """[V]: each item's mean score over up to `sample` users' model vectors."""
    part = data.take(np.arange(min(sample, len(data))))
    u = model_user(torch.as_tensor(part.histories), part)
    return (u @ iv.T).mean(0).numpy()


def mean_user_vector(model_user, data: ev.EvalUsers, batch: int = 256) -> torch.Tensor:
    """[d]: the mean of the model's user vectors over `data`'s users."""
    parts = []
    for i in range(0, len(data), batch):
        chunk = data.take(np.arange(i, min(i + batch, len(data))))
        parts.append(model_user(torch.as_tensor(chunk.histories), chunk))
    return torch.cat(parts).mean(0)


def model_user_fn(ranker, iv):
    return lambda hist, chunk: ranker.user_vectors(iv, hist, chunk)


def score_target(export: Path, target_shards: Path, source_shards: Path | None, feature_store: Path, metric: str,
                 exclude_seen: bool = True) -> dict:
    """Every training-free way of scoring `target_shards` with `export`, and the diagnosis. Returns per row: the
    validation metric, the chosen prior, the test ranks; plus the diagnosis figures (the source's own only with
    `source_shards`, a single catalogue's folder)."""
    out: dict = {"rows": {}, "diagnosis": {}}
    ranker = ranker_from_export(export, target_shards, show_progress=False, feature_store=feature_store)
    iv = ranker.item_vectors()
    max_len, n_items = ranker.model.cfg.max_len, ranker.store.num_items
    valid = ev.eval_users(ranker.sequences, "valid", max_len)
    test = ev.eval_users(ranker.sequences, "test", max_len)
    counts = ev.SplitSummary.from_records(ranker.sequences, n_items).counts  # one pass: every split's counts
    counts_valid, counts_test = counts["valid"], counts["test"]
    user = model_user_fn(ranker, iv)
    out["users"], out["targets"] = test.users.tolist(), test.targets.tolist()

    def record(name: str, scoring: Scoring, valid_ranks: np.ndarray, extra: dict | None = None, user_fn=None) -> None:
        test_ranks = scoring_ranks(user_fn or user, iv, test, scoring, counts_test, exclude_seen)
        out["rows"][name] = {"scoring": scoring.to_dict(), "valid": ev.metrics_from_ranks(valid_ranks),
                             "test": ev.metrics_from_ranks(test_ranks), "test_ranks": test_ranks.tolist(),
                             **(extra or {})}

    pop = Scoring("none", 1.0)
    record("popularity", pop, scoring_ranks(user, iv, valid, pop, counts_valid, exclude_seen))
    for vec, name in (("model", "zero-shot"), ("mean", "content baseline")):
        plain = Scoring(vec)
        record(name, plain, scoring_ranks(user, iv, valid, plain, counts_valid, exclude_seen))
        choice = choose_prior(user, iv, valid, vec, counts_valid, exclude_seen, metric)
        record(f"{name} + prior", choice.scoring, choice.ranks, {"prior_scale": choice.scale, "grid": choice.table})
    # diagnosis, not a transfer=auto candidate: the user vectors minus their mean over the target's users (their
    # histories only, no labels): the direction every user shares, which on the source follows its popularity
    ubar = mean_user_vector(user, valid)
    centred = lambda hist, chunk: user(hist, chunk) - ubar  # noqa: E731
    plain = Scoring("model")
    record("zero-shot, centred", plain, scoring_ranks(centred, iv, valid, plain, counts_valid, exclude_seen),
           user_fn=centred)
    choice = choose_prior(centred, iv, valid, "model", counts_valid, exclude_seen, metric)
    record("zero-shot, centred + prior", choice.scoring, choice.ranks,
           {"prior_scale": choice.scale, "grid": choice.table}, user_fn=centred)
    names = ("popularity", "zero-shot", "zero-shot + prior", "content baseline", "content baseline + prior")
    best = max(names, key=lambda n: (out["rows"][n]["valid"][metric], -names.index(n)))
    out["rows"]["training-free auto"] = {**out["rows"][best], "chose": best}

    out["diagnosis"] = target_diagnosis(ranker, user, iv, valid, test, counts_valid)
    if source_shards is not None:
        out["diagnosis"].update(source_diagnosis(export, source_shards, feature_store, max_len, n_items, exclude_seen))
    return out


def target_diagnosis(ranker, user, iv, valid: ev.EvalUsers, test: ev.EvalUsers, counts_valid: np.ndarray) -> dict:
    """The target's side of the diagnosis: its test targets by modality, and how the export's item-vector norms and
    mean zero-shot scores follow the target's popularity."""
    n_items = ranker.store.num_items
    modality = np.asarray(ranker.store.modality)[test.targets]
    scores_t = mean_scores(user, iv, valid)
    top = np.argsort(-counts_valid, kind="stable")[:10]
    return {
        "target_modality": {ranker.store.modality_names[int(m)]: int((modality == m).sum())
                            for m in np.unique(modality)},
        "test_target_modality": modality.tolist(),
        "modality_names": list(ranker.store.modality_names),
        "target": {
            "items": n_items,
            "spearman_norm_vs_target_count": spearman(iv.norm(dim=1).numpy(), counts_valid),
            "spearman_mean_score_vs_target_count": spearman(scores_t, counts_valid),
            # the mean zero-shot score's percentile (0 = lowest, 1 = highest) of the 10 items most popular in the
            # target's training portion
            "top10_popular_score_percentile": float(np.mean([(scores_t < scores_t[i]).mean() for i in top])),
        },
    }


def source_diagnosis(export: Path, source_shards: Path, feature_store: Path, max_len: int, target_items: int,
                     exclude_seen: bool) -> dict:
    """The source's side: the same popularity correlations on the source catalogue, and the export on the source's
    own test split, whole and with its catalogue cut to the target's size (a seeded random cut)."""
    src = ranker_from_export(export, source_shards, show_progress=False, feature_store=feature_store)
    iv_s = src.item_vectors()
    n_src = src.store.num_items
    counts_src = ev.SplitSummary.from_records(src.sequences, n_src).counts
    counts_s, counts_s_test = counts_src["valid"], counts_src["test"]
    valid_s = ev.eval_users(src.sequences, "valid", max_len)
    test_s = ev.eval_users(src.sequences, "test", max_len)
    user_s = model_user_fn(src, iv_s)
    d = {"source": {"items": n_src,
                    "spearman_norm_vs_source_count": spearman(iv_s.norm(dim=1).numpy(), counts_s),
                    "spearman_mean_score_vs_source_count": spearman(mean_scores(user_s, iv_s, valid_s), counts_s)}}
    if n_src > target_items:
        drop = np.random.default_rng(0).choice(n_src, n_src - target_items, replace=False)
        cut = with_excluded(test_s, drop)
        own = scoring_ranks(user_s, iv_s, cut, Scoring("model"), counts_s_test, exclude_seen)
        own_pop = ev.popularity_ranks(counts_s_test, cut, exclude_seen)
        d["source_at_target_size"] = {"items": target_items, "model": ev.metrics_from_ranks(own),
                                      "popularity": ev.metrics_from_ranks(own_pop)}
    own_full = scoring_ranks(user_s, iv_s, test_s, Scoring("model"), counts_s_test, exclude_seen)
    d["source_own_test"] = {"items": n_src, "model": ev.metrics_from_ranks(own_full),
                            "popularity": ev.metrics_from_ranks(ev.popularity_ranks(counts_s_test, test_s,
                                                                                    exclude_seen))}
    return d


def run(suite, split: str, source_model: str, seeds: list[int], metric: str) -> list[dict]:
    """Each seed's results for one split and source variant (cached beside the source run)."""
    target = SPLITS[split]
    source = SOURCE_OF[target]
    results = []
    for seed in seeds:
        spec = RunSpec(source, source_model, seed)
        run_dir = suite.ensure(spec, export=True)
        cache = run_dir / "cross_catalogue" / f"{target}.json"
        key = {"version": RESULT_VERSION, "target_shards": suite.shards(target).name, "metric": metric}
        if cache.exists() and json.loads(cache.read_text()).get("key") == key:
            results.append(json.loads(cache.read_text()))
            continue
        print(f"[cross_catalogue] {split}: source {source_model} seed {seed} ({suite.key(spec)}) on {target}",
              flush=True)
        t0 = time.time()
        res = score_target(run_dir / "export", suite.shards(target), suite.shards(source),
                           suite.out / "cache" / "features", metric)
        res.update(key=key, split=split, source_model=source_model, seed=seed, source_run=suite.key(spec),
                   wall_s=round(time.time() - t0, 1))
        cache.parent.mkdir(exist_ok=True)
        cache.write_text(json.dumps(res))
        results.append(res)
    return results


def main(argv: list[str] | None = None) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m transrec.trainer.experiments.cross_catalogue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="source seeds (each a source run)")
    p.add_argument("--splits", default="ml,hm", help=f"comma-separated subset of {','.join(SPLITS)}")
    p.add_argument("--sources", default="scratch,scratch-popcorr",
                   help="source variants (experiments models): scratch, scratch-popcorr")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="overrides for every source run")
    p.add_argument("--out", default=None, help="reports folder (default reports/)")
    p.add_argument("--data-root", default=None, help="folder with movielens-100k-mm/ and hm-fashion/")
    p.add_argument("--quick", action="store_true", help="tiny preset and model, bundled data: a smoke test")
    a = p.parse_args(argv)
    splits = [s.strip() for s in a.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise SystemExit(f"--splits: unknown {bad}; choose from {list(SPLITS)}")
    sources = [s.strip() for s in a.sources.split(",") if s.strip()]
    suite = Suite(SuiteOptions(table="table4", quick=a.quick, out=a.out, data_root=a.data_root, set=list(a.set)),
                  changes=[report_settings])
    results = {(split, src): run(suite, split, src, list(range(a.seeds)), "ndcg@10")
               for split in splits for src in sources}
    command = "python -m transrec.trainer.experiments.cross_catalogue " + " ".join(
        sys.argv[1:] if argv is None else argv)
    path = write_report(suite, results, command, settings=[REPORT_SETTINGS_TEXT, *a.set])
    print(f"[cross_catalogue] report: {path}")
    return path


if __name__ == "__main__":
    main()
