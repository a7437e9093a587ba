"""The paper's experiments (tables 2, 4-7) as cached training runs, with Markdown / CSV / PNG reports.

    python -m transrec.trainer.experiments {table2,table4,table5,table6,table7,all} [--quick] [--seeds N] [--out DIR]
        [--data-root DIR | --movielens DIR --hm DIR] [--preset cpu-small|paper|tiny] [--text-encoder PATH]
        [--image-backbone resnet18|efficientnet-lite0] [--targets hm-mixed,hm-image,hm-text-side,ml-mixed]
        [--scaling-target hm-mixed] [--set section.key=value ...] [--set-target section.key=value ...]
        [--models m1,m2] [--report-suffix S] [--plan]

Domains. Source: MovieLens-100k, mixed modality. Targets (no shared users or items): H&M mixed, H&M image only,
H&M text only with user/item side features, and the reverse, very different, transfer: pre-trained on H&M mixed,
fine-tuned on MovieLens mixed. Named with --targets only: H&M half B (mixed, image only, text + side features),
transferred from H&M half A mixed, a source from the same platform that shares no customer or article with it
(`data_shards.split_disjoint`, cut once under OUT/raw/). The shards each domain needs are built once under
OUT/shards/ with `python -m transrec.data_shards.build` (in-process).

Runs. Every run is `trainer.run.train(cfg)` in this process: the same TransRec class, shards, splits, stages,
losses and evaluator for every model. IDRec / IDGru / IDNext = `model.item_encoder=id` with the transformer /
GRU4Rec / NextItNet user encoder; train-from-scratch = TransRec from the towers' generic weights; transfer =
the same with `--init-from` the source run's export (source seed 0, fine-tuned with the same schedule);
zero-shot = the source export evaluated on the target by content with no target training (`--stage none`);
TransRec- = `--stage 2` only; frozen = `model.frozen_towers=true`. TransRec trains with the content softmax
(trainer/core/losses.py) by default; "-paper" models (e.g. `scratch-paper`) with the paper's objectives (free stage-1
head, CPC), which the ID baselines keep. A run is cached in OUT/runs/<config hash>/ (the hash covers the resolved
configuration, the data's input hashes, the text encoder and the source run; a new config field gives every run that
reads it a new key; run_keys.py leaves out the settings a run never reads or that sit at the value reproducing the
behaviour from before they existed) and skipped when asked again; an interrupted run
resumes; a finished run keeps its records, export and overall best model (`prune`). One invocation per OUT at a
time (a lock file).

Table 2's text and image rows evaluate the mixed-trained run's best model on the all-text / all-image shards of the
same users, items and splits (`views.evaluate_view`, evaluation only).

Defaults: table4 uses 3 seeds, the other tables 1 (`--seeds N` sets all). `--quick` = the tiny preset, a tiny
random BERT as text encoder and the bundled data (data/): minutes, for smoke tests only.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from transrec.trainer.core.presets import PRESETS
from transrec.trainer.experiments import report as er
from transrec.trainer.experiments.plans import (  # noqa: F401  (re-exported: the runner's public names)
    BUILD_OPTIONS,
    DOMAINS,
    MODEL_CHANGES,
    OPT_IN_MODELS,
    PLANS,
    RELEASE_YEAR,
    SOURCE_FRACTIONS,
    SOURCE_OF,
    SOURCE_SEED,
    SPLIT_SEED,
    SPLIT_TARGETS,
    SPLITS,
    TABLE_SETTINGS_TEXT,
    TARGET_FRACTIONS,
    TARGETS,
    TRANSFERS,
    Domain,
    RowPlan,
    RunSpec,
    TablePlan,
    table_settings,
)
from transrec.trainer.experiments.suite import (  # noqa: F401  (re-exported: the runner's public names)
    TABLES,
    Suite,
    SuiteOptions,
    build_flags,
    make_tiny_bert,
    prune,
)

REPO = Path(__file__).resolve().parents[2]


# -- results: run every row, then the headline comparisons ---------------------------------------------
def execute(suite: Suite, plan: TablePlan) -> dict[tuple[str, str], er.RowResult]:
    """Run (or load from the cache) every row's runs; ranks, warm / cold split, per-seed metrics."""
    results = {}
    train_cache: dict[str, np.ndarray] = {}
    for row in plan.rows:
        ranks, users, runs, curves, target_items = [], None, [], [], None
        for spec in row.specs:
            d = suite.ensure(spec)
            runs.append(suite.key(spec))
            if row.kind == "popularity":
                path = d / "test_ranks_popularity.tsv"
            elif row.kind == "view":
                path = suite.ensure_view(spec, row.view) / "test_ranks.tsv"
            elif row.kind in ("stage1", "stage2"):
                path = d / f"test_ranks_{row.kind}.tsv"
            else:
                path = d / "test_ranks.tsv"
                curves.append(d / "valid_curve.csv")
            u, t, r = er.read_ranks(path)
            if users is not None and not (np.array_equal(users, u) and np.array_equal(target_items, t)):
                raise ValueError(f"{plan.name} {row.group}/{row.label}: runs disagree on the test users")
            users, target_items = u, t
            ranks.append(r)
        domain = row.specs[0].domain
        if domain not in train_cache:
            train_cache[domain] = er.training_items(suite.shards(domain))
        cold = er.cold_mask(target_items, train_cache[domain])
        arr = np.stack(ranks)
        per_seed = [er.seed_metrics(r, cold) for r in arr]
        results[(row.group, row.label)] = er.RowResult(row, users, arr, cold, runs, per_seed, curves)
    return results


def headline_results(plan: TablePlan, results: dict, n_boot: int) -> dict:
    out = {}
    for group, a, b in plan.headlines:
        ra, rb = results[(group, a)], results[(group, b)]
        if not np.array_equal(ra.users, rb.users):
            raise ValueError(f"{group}: {a} and {b} were evaluated on different users")
        out[(group, a, b)] = {(m, s): er.compare(ra.ranks, rb.ranks, ra.cold, m, s, n=n_boot)
                              for m in ("hr@10", "ndcg@10", "ndcg@20") for s in er.SUBSETS}
    return out


def table_plan(suite: Suite, name: str) -> TablePlan:
    """The table's plan, cut to the rows of `--models` when given, else to the rows of every model but the opt-in
    ones (OPT_IN_MODELS), with the comparisons between the rows kept."""
    plan = PLANS[name](suite)
    if suite.models is None:
        rows = [r for r in plan.rows if not any(s.model in OPT_IN_MODELS for s in r.specs)]
    else:
        known = sorted(set(MODEL_CHANGES))
        unknown = [m for m in suite.models if m not in known]
        if unknown:
            raise SystemExit(f"--models: unknown {unknown}; choose from {known}")
        rows = [r for r in plan.rows if all(s.model in suite.models for s in r.specs)]
    if len(rows) == len(plan.rows):
        return plan
    if not rows:
        raise SystemExit(f"--models {','.join(suite.models)}: no row of {name} is left")
    kept = {(r.group, r.label) for r in rows}
    heads = [h for h in plan.headlines if (h[0], h[1]) in kept and (h[0], h[2]) in kept]
    claims = []
    for c in plan.claims:
        pairs = [p for p in c["pairs"] if (p[0], p[1]) in kept and (p[0], p[2]) in kept]
        if pairs:
            claims.append({**c, "pairs": pairs})
    return replace(plan, rows=rows, headlines=heads, claims=claims)


def run_table(suite: Suite, name: str, command: str) -> Path:
    plan = table_plan(suite, name)
    plan.name += suite.report_suffix  # e.g. table4_3seeds.md beside a one-seed table4.md
    t0 = time.time()
    results = execute(suite, plan)
    heads = headline_results(plan, results, suite.n_boot)
    return er.write_report(suite, plan, results, heads, command, time.time() - t0)


def print_plan(suite: Suite, name: str) -> None:
    plan = table_plan(suite, name)
    specs = {}
    for row in plan.rows:
        for s in row.specs:
            if s.model in TRANSFERS:
                specs[suite.source_spec(s)] = True
            specs[s] = True
    todo = [s for s in specs if not suite.is_done(s)]
    print(f"{name}: {len(specs)} runs, {len(specs) - len(todo)} cached, {len(todo)} to train")
    for s in specs:
        print(f"  {'cached ' if suite.is_done(s) else 'TO RUN '} {suite.key(s)}  {s}")


def parse_args(argv: list[str] | None = None) -> SuiteOptions:
    p = argparse.ArgumentParser(prog="python -m transrec.trainer.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=[*TABLES, "all"])
    p.add_argument("--quick", action="store_true", help="tiny preset, tiny random BERT, bundled data: minutes")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default: 3 for table4, 1 otherwise)")
    p.add_argument("--out", default=None,
                   help="reports, CSV, PNG, runs/ and shards/ (default reports/, quick: reports/quick/)")
    p.add_argument("--data-root", default=None,
                   help="folder with movielens-100k-mm/ and hm-fashion/ (default ../shared/datasets; quick: data/)")
    p.add_argument("--movielens", default=None, help="MovieLens-100k-mm raw folder (overrides --data-root)")
    p.add_argument("--hm", default=None, help="H&M raw folder (overrides --data-root)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="trainer preset (default cpu-small; --quick: tiny)")
    p.add_argument("--text-encoder", default=None,
                   help="minilm | bert-base-random-init | local BERT folder | tiny-random (default: the preset's)")
    p.add_argument("--image-backbone", default=None, choices=["resnet18", "efficientnet-lite0"])
    p.add_argument("--targets", default=None, help=f"comma-separated subset of {','.join(TARGETS)} (tables 4 and 7; "
                   f"default: all of them), or of {','.join(SPLIT_TARGETS)}: H&M half B, transferred from half A, "
                   "which shares no customer or article with it (data_shards/split_disjoint.py)")
    p.add_argument("--scaling-target", default="hm-mixed", choices=[*TARGETS, *SPLIT_TARGETS],
                   help="target of tables 5 and 6")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="overrides for every run")
    p.add_argument("--set-target", nargs="*", default=[], metavar="section.key=value",
                   help="overrides for the target domains' runs only (a transfer's source run is left as it is)")
    p.add_argument("--models", default=None,
                   help="only the table's rows of these (e.g. scratch,transfer,transfer-towers)")
    p.add_argument("--report-suffix", default="",
                   help="appended to the report's file names (tableN<suffix>.md, _runs.csv, PNGs); runs are shared")
    p.add_argument("--study", default="",
                   help="write the report, CSV and PNGs under OUT/STUDY/ (a variant of a table, e.g. one study's "
                        "reports together; reports/README.md indexes them); runs and shards stay in OUT")
    p.add_argument("--plan", action="store_true",
                   help="list the runs each table needs and which are cached; train nothing")
    try:
        return SuiteOptions(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> list[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    a = parse_args(argv)
    suite = Suite(a)
    suite.out.mkdir(parents=True, exist_ok=True)
    names = list(TABLES) if a.table == "all" else [a.table]
    command = "python -m transrec.trainer.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(suite.out / ".experiments.lock", "w") as lock:  # one invocation per OUT at a time
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another trainer.experiments is using {suite.out}; wait or pass --out") from None
        if a.plan:
            for name in names:
                print_plan(suite, name)
            return []
        written = [run_table(suite, name, command) for name in names]
    for path in written:
        print(f"[experiments] report: {path}")
    return written

if __name__ == "__main__":
    main()
