"""Leave-one-catalogue-out: a source pre-trained on every other catalogue, scored on a target it never saw.

    python -m transrec.trainer.experiments.leave_one_out --targets ml-new,office,hm-b \
        [--user-states encoder,mean_residual] [--seeds 0] [--epochs 2] [--work .cache/study] [--out reports]

The catalogues (built once under --work from ../shared/datasets and data/, each a shard folder):

| name | what | users / items |
|---|---|---|
| ml-old | MovieLens-100k films up to 1995 (data_shards/split_by_release.py), mixed | 516 / 959 |
| ml-new | MovieLens-100k films after 1995, mixed: the "newer films" target | 427 / 616 |
| ml100k | MovieLens-100k whole, mixed (shares users and films with ml-old and ml-new) | 943 / 1,682 |
| ml1m | MovieLens-1M's first 2,999 users, mixed (100k posters and overviews joined by title + year) | 2,999 / 3,883 |
| office | Amazon Office, text | 4,905 / 2,420 |
| hm-a, hm-b | H&M halves sharing no customer and no article (data_shards/split_disjoint.py), mixed | 679, 630 |

A target's source is a mixture (data_shards/mixture.py) of the catalogues that share no user with it (ml-old and
ml-new are ml100k cut in two: ml-new's source holds ml-old, every other source ml100k whole), with every MovieLens
film of the target dropped from every MovieLens source by the declared join
(data_shards/tables_ml1m.movielens_film_key: title + year). The source trains stage 1 of the `cpu-small` preset for
--epochs epochs (the content softmax, each sequence against its own catalogue's items, catalogues mixed in proportion
to their windows; selection: the mean NDCG@10 over catalogues). On the target,
with no target training: popularity, the source's user encoder ("zero-shot") and the training-free content baseline
(the mean of the history's item vectors), each with and without the target's popularity prior (beta chosen on the
target's validation split), as trainer/experiments/cross_catalogue.py scores them. Source runs and scores are cached
under --work; the report is written by leave_one_out_report.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from transrec.data_shards.bad_input import Problems
from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.mixture import Catalogue, mix
from transrec.data_shards.shard_io import read_id_maps
from transrec.data_shards.split_by_release import split_by_release
from transrec.data_shards.split_disjoint import split_disjoint
from transrec.data_shards.tables_ml1m import movielens_film_key, read_movies
from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.presets import preset
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.evaluation.model_ranker import ranker_from_export
from transrec.trainer.experiments.cross_catalogue import score_target
from transrec.trainer.experiments.leave_one_out_report import write_report
from transrec.trainer.experiments.leave_one_out_trained import check_same_popularity, target_run, trained_rows
from transrec.trainer.experiments.recent_popularity import recent_rows
from transrec.trainer.training.run import train

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO.parent / "shared" / "datasets"
ML100K = REPO / "data" / "movielens-100k-mm"
# the catalogues: raw folder (relative to --work for the splits), builder dataset, modality, extra build options
CATALOGUES = {
    "ml-old": ("ml-release/source", "movielens-100k-mm", "mixed", {}),
    "ml-new": ("ml-release/target", "movielens-100k-mm", "mixed", {}),
    "ml100k": (str(ML100K), "movielens-100k-mm", "mixed", {}),
    "ml1m": (str(DATASETS / "movielens-1m-part"), "movielens-1m", "mixed", {"posters_from": ML100K}),
    "office": (str(DATASETS / "amazon-office"), "amazon-office", "text", {}),
    "hm-a": ("hm-split/a", "hm-fashion", "mixed", {"dedup": "collapse"}),
    "hm-b": ("hm-split/b", "hm-fashion", "mixed", {"dedup": "collapse"}),
}
SAME_USERS = {"ml-old": {"ml100k"}, "ml-new": {"ml100k"}}  # a target's users: never in its source
MOVIELENS = ("ml-old", "ml-new", "ml100k", "ml1m")


def prepare(work: Path) -> dict[str, Path]:
    """Every catalogue's shard folder under work/shards (split and built once)."""
    if not (work / "ml-release" / "split_report.json").exists():
        split_by_release(ML100K, work / "ml-release")
    if not (work / "hm-split" / "split_report.json").exists():
        split_disjoint(DATASETS / "hm-fashion", work / "hm-split")
    out = {}
    for name, (raw, dataset, modality, extra) in CATALOGUES.items():
        folder = work / "shards" / name
        if not (folder / "manifest.json").exists():
            source = Path(raw) if Path(raw).is_absolute() else work / raw
            build(BuildOptions(dataset=dataset, source=source, out=folder, modality=modality, **extra))
        out[name] = folder
    return out


def film_keys(name: str, work: Path) -> dict[str, str]:
    """{raw film id: join key} of a MovieLens catalogue (its raw table's titles and years)."""
    raw = CATALOGUES[name][0]
    folder = Path(raw) if Path(raw).is_absolute() else work / raw
    if name == "ml1m":
        return {k: movielens_film_key(r.fields["title"]) for k, r in read_movies(folder / "movies.dat",
                                                                                 Problems()).items()}
    with open(folder / "items.csv", newline="") as f:
        return {r["movie_id"]: movielens_film_key(r["title"], r["year"]) for r in csv.DictReader(f)}


def source_names(target: str, only: list[str] | None = None) -> list[str]:
    """The catalogues of the target's source: every other catalogue sharing no user with it (ml100k and its halves
    ml-old / ml-new never together), or the subset `only` of them (a smaller source, for the curve of quality against
    source interactions)."""
    halves = ("ml-old", "ml-new")  # ml100k cut in two: a source holds either the halves or the whole, never both
    names = [n for n in CATALOGUES if n != target and n not in SAME_USERS.get(target, set())
             and (target in halves or n not in halves)]
    if only is None:
        return names
    bad = [n for n in only if n not in names]
    if bad or not only:
        raise ValueError(f"{bad or only} cannot make {target}'s source (the target itself, or it shares users with "
                         f"it): choose among {', '.join(names)}")
    return [n for n in names if n in only]


def source_catalogues(target: str, shards: dict[str, Path], work: Path,
                      only: list[str] | None = None) -> list[Catalogue]:
    """The target's source catalogues (source_names), the target's films dropped from the MovieLens ones."""
    cats = []
    target_films = set(film_keys(target, work).values()) if target in MOVIELENS else set()
    for n in source_names(target, only):
        drop = set()
        if target_films and n in MOVIELENS:
            present = set(read_id_maps(shards[n])["items"])
            drop = {raw for raw, key in film_keys(n, work).items() if key in target_films and raw in present}
        cats.append(Catalogue(shards[n], n, drop))
    return cats


def source_config(mixture: Path, run_dir: Path, user_state: str, seed: int, epochs: int) -> RunConfig:
    """A source run: stage 1 of `cpu-small` over the mixture for `epochs` epochs, every epoch validated."""
    cfg = preset("cpu-small")
    cfg.data.shards, cfg.run_dir, cfg.seed, cfg.stages = str(mixture), str(run_dir), seed, "1"
    cfg.stage1.epochs, cfg.eval.patience = epochs, 0
    cfg.model.user_state = user_state
    cfg.monitor.projector = False
    return cfg


def source_tag(only: list[str] | None) -> str:
    """The part of a source's folder names that says which catalogues it holds ("" for every other one)."""
    return "" if only is None else "-from-" + "+".join(only)


def source_run(target: str, user_state: str, seed: int, epochs: int, shards: dict[str, Path], work: Path,
               only: list[str] | None = None) -> Path:
    """The target's source, trained once (its run folder under work/runs, reused when it finished)."""
    tag = source_tag(only)
    run_dir = work / "runs" / f"source-for-{target}{tag}-{user_state}-e{epochs}-s{seed}"
    if (run_dir / "export" / "config.json").exists() and (run_dir / "metrics.json").exists():
        return run_dir
    mixture = work / "mixtures" / f"without-{target}{tag}"
    if not (mixture / "manifest.json").exists():
        mix(source_catalogues(target, shards, work, only), mixture)
    train(source_config(mixture, run_dir, user_state, seed, epochs), overwrite=True)
    return run_dir


def with_recent_rows(res: dict, export: Path, target_shards: Path, work: Path) -> dict:
    """The recent-popularity rows (trainer/experiments/recent_popularity.py) added to a target's scores."""
    ranker = ranker_from_export(export, target_shards, show_progress=False, feature_store=work / "features")
    iv = ranker.item_vectors()
    seqs = list(ranker.sequences)
    max_len = ranker.model.cfg.max_len
    valid, test = ev.eval_users(seqs, "valid", max_len), ev.eval_users(seqs, "test", max_len)
    counts = ev.SplitSummary.from_records(seqs, len(iv)).counts
    user = lambda hist, chunk: ranker.user_vectors(iv, hist, chunk)  # noqa: E731
    with ranker.eval_mode():
        res["rows"].update(recent_rows(user, iv, seqs, valid, test, counts["valid"], counts["test"]))
    return res


def score(target: str, user_state: str, seed: int, epochs: int, shards: dict[str, Path], work: Path,
          only: list[str] | None = None) -> dict:
    """The target's training-free rows from its source (cached beside the source run)."""
    run_dir = source_run(target, user_state, seed, epochs, shards, work, only)
    cache = run_dir / f"on-{target}.json"
    if cache.exists():
        res = json.loads(cache.read_text())
        if "recent popularity" not in res["rows"]:  # scored before the recent-popularity rows existed
            cache.write_text(json.dumps(with_recent_rows(res, run_dir / "export", shards[target], work)))
        return with_source_set(res, only, run_dir)
    t0 = time.time()
    res = score_target(run_dir / "export", shards[target], None, work / "features", "ndcg@10")
    res = with_recent_rows(res, run_dir / "export", shards[target], work)
    source = json.loads((run_dir / "catalogues.json").read_text())
    res.update(target=target, user_state=user_state, seed=seed, epochs=epochs, source_run=run_dir.name,
               source_catalogues=[{k: c[k] for k in ("name", "items", "users", "num_interactions", "dropped")}
                                  for c in source["catalogues"]],
               source_valid=source["valid"], source_valid_popularity=source["valid_popularity"],
               wall_s=round(time.time() - t0, 1))
    cache.write_text(json.dumps(res))
    return with_source_set(res, only, run_dir)


def run_wall_s(run_dir: Path) -> float:
    """A finished run's wall time: from its run_config.json (written first) to its metrics.json (written last)."""
    return round((run_dir / "metrics.json").stat().st_mtime - (run_dir / "run_config.json").stat().st_mtime, 1)


def with_source_set(res: dict, only: list[str] | None, run_dir: Path) -> dict:
    res["source_wall_s"] = run_wall_s(run_dir)
    res["source_set"] = "all" if only is None else "+".join(only)
    res["source_interactions"] = sum(c["num_interactions"] for c in res["source_catalogues"])
    return res


def with_trained_rows(res: dict, shards: dict[str, Path], work: Path, train_if_missing: bool) -> dict:
    """The rows that train on the target (trainer/experiments/leave_one_out_trained.py) added to a source's
    training-free rows, when its target run exists or `train_if_missing`."""
    target, seed = res["target"], res["seed"]
    run_dir = work / "runs" / f"target-{target}-from-{res['source_run'].removeprefix('source-for-' + target + '-')}"
    if not (run_dir / "metrics.json").exists() and not train_if_missing:
        return res
    target_run(shards[target], work / "runs" / res["source_run"] / "export", run_dir, seed)
    rows = trained_rows(run_dir, res["users"], res["targets"])
    check_same_popularity(rows, res["rows"]["popularity"]["test_ranks"], run_dir)
    res["rows"].update(rows)
    res["target_run"] = run_dir.name
    candidates = json.loads((run_dir / "metrics.json").read_text())["candidates"]
    res["target_wall_s"] = round(60 * sum(c.get("minutes") or 0 for c in candidates.values()), 1)
    return res


def source_error(target: str, only: list[str]) -> str:
    """Why `only` cannot make the target's source ("" when it can)."""
    try:
        source_names(target, only)
    except ValueError as e:
        return str(e)
    return ""


def nested_sources(nested: str) -> list[list[str] | None]:
    """--nested A,B: the sources [A], [A, B] and every other catalogue (None); none given: every other only."""
    names = [n.strip() for n in nested.split(",") if n.strip()]
    return [names[:k] for k in range(1, len(names) + 1)] + [None]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m transrec.trainer.experiments.leave_one_out",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="ml-new,office,hm-b")
    p.add_argument("--user-states", default="encoder,mean_residual")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "study")
    p.add_argument("--out", type=Path, default=REPO / "reports")
    p.add_argument("--nested", default="",
                   help="smaller sources for the curve of quality against source interactions: A,B trains sources "
                        "of [A], [A, B] as well as of every other catalogue (e.g. ml-old,ml1m)")
    p.add_argument("--train-on-target", action="store_true",
                   help="also train on the target: scratch, the export fine-tuned, towers with a new user encoder "
                        "and transfer=auto's choice (one transfer=auto run per source; sources of every other "
                        "catalogue only)")
    p.add_argument("--cached-only", action="store_true",
                   help="report the (target, user state, seed) combinations already scored; train nothing")
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in CATALOGUES]
    if unknown:
        p.error(f"--targets {unknown}: choose from {', '.join(CATALOGUES)}")
    sets = nested_sources(a.nested)
    curve_targets = [t for t in targets if not any(source_error(t, only) for only in sets[:-1])]
    if a.nested and not curve_targets:
        p.error(f"--nested {a.nested}: no target among {targets} can take these sources "
                f"({source_error(targets[0], sets[-2])})")
    if a.nested and len(curve_targets) < len(targets):
        print(f"--nested {a.nested}: smaller sources for {', '.join(curve_targets)} only (these catalogues cannot make "
              "the others' sources)", file=sys.stderr)
    shards = prepare(a.work)
    combos = [(t, s.strip(), int(seed), only) for t in targets for s in a.user_states.split(",")
              for seed in a.seeds.split(",") for only in (sets if t in curve_targets else [None])]
    if a.cached_only:
        combos = [c for c in combos if (a.work / "runs" / f"source-for-{c[0]}{source_tag(c[3])}-{c[1]}-e{a.epochs}-"
                                        f"s{c[2]}" / f"on-{c[0]}.json").exists()]
    results = [score(t, s, seed, a.epochs, shards, a.work, only) for t, s, seed, only in combos]
    results = [with_trained_rows(r, shards, a.work, a.train_on_target and not a.cached_only)
               if r["source_set"] == "all" else r for r in results]
    return write_report(results, a.out, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
