"""reports/cross_catalogue.md (+ PNG, CSV) from cross_catalogue.py's per-seed results.

Figures are means over source seeds (± sample std); differences are per-user gains averaged over seeds, then a 95%
paired bootstrap over test users (run_stats.compare), called a win or a loss only when the interval excludes zero.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from transrec.trainer.evaluation.run_stats import compare
from transrec.trainer.experiments.plans import DOMAINS, SOURCE_OF
from transrec.trainer.experiments.report import hardware, relative_path

ROWS = ("popularity", "zero-shot", "zero-shot + prior", "content baseline", "content baseline + prior",
        "training-free auto", "zero-shot, centred", "zero-shot, centred + prior")
BY_MODALITY = tuple(r for r in ROWS if r != "training-free auto")
HOW = {"popularity": "the target's most frequent items first (its training portion)",
       "zero-shot": "the source export's user encoder, user . item vector",
       "zero-shot + prior": "the same + beta x log(1 + target count), beta on the target's validation",
       "content baseline": "no user encoder: the mean of the history's unit item vectors, cosine",
       "content baseline + prior": "the same + beta x log(1 + target count), beta on validation",
       "training-free auto": "the one of the rows above that validates best (transfer=auto's training-free "
                             "candidates)",
       "zero-shot, centred": "diagnosis: the user vectors minus their mean over the target's users (the direction "
                             "all users share)",
       "zero-shot, centred + prior": "the same + the prior, beta on validation"}
SOURCE_LABEL = {"scratch": "source trained as `make train` trains (content softmax)",
                "scratch-popcorr": "source trained with the popularity-corrected softmax "
                                   "(stage1/2.popularity_correction=1)",
                "scratch-temperature": "source trained with the learned softmax temperature (model.learn_temperature, "
                                       "the cpu-small preset's default)"}
HEADLINES = (("zero-shot", "popularity"), ("zero-shot + prior", "popularity"), ("content baseline", "popularity"),
             ("content baseline + prior", "popularity"), ("training-free auto", "popularity"),
             ("zero-shot + prior", "zero-shot"), ("content baseline", "zero-shot"),
             ("zero-shot, centred", "zero-shot"), ("zero-shot, centred + prior", "popularity"))


def ranks_of(results: list[dict], row: str) -> np.ndarray:
    return np.stack([np.asarray(r["rows"][row]["test_ranks"]) for r in results])


def mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.4f}" + (f" ± {v.std(ddof=1):.4f}" if len(v) > 1 else "")


def interval(res: dict) -> str:
    return f"{res['diff']:+.4f} [{res['low']:+.4f}, {res['high']:+.4f}] {res['verdict']}"


def judged(a: np.ndarray, b: np.ndarray, metric: str, n_boot: int) -> dict:
    return compare(a, b, np.zeros(a.shape[1], dtype=bool), metric, "all", n=n_boot)


def split_lines(split: str, variants: dict[str, list[dict]], n_boot: int) -> tuple[list[str], dict]:
    target = next(iter(variants.values()))[0]["key"]["target_shards"]
    first = next(iter(variants.values()))
    users = len(first[0]["users"])
    t_dom = {"ml": "ml-new-mixed", "hm": "hm-b-mixed"}[split]
    lines = [f"## {DOMAINS[t_dom].label}, from {DOMAINS[SOURCE_OF[t_dom]].label}", "",
             f"Target shards `{target}`: {users} test users, {first[0]['diagnosis']['target']['items']} items; "
             f"source catalogue {first[0]['diagnosis']['source']['items']} items.", ""]
    summary = {}
    for variant, results in variants.items():
        seeds = [r["seed"] for r in results]
        lines += [f"### Source: {SOURCE_LABEL.get(variant, variant)}", "",
                  f"Source runs (seeds {seeds}): " + ", ".join(f"`{r['source_run']}`" for r in results), "",
                  "| row | how | valid NDCG@10 | test HR@10 | test NDCG@10 | median test rank | prior beta (g) |",
                  "|---|---|---|---|---|---|---|"]
        for row in ROWS:
            recs = [r["rows"][row] for r in results]
            ranks = ranks_of(results, row)
            beta = ", ".join(f"{x['scoring']['prior_beta']:.3g}" for x in recs) if "prior" in row else ""
            if "prior" in row:
                gs = [next(g["g"] for g in x["grid"] if g["beta"] == x["scoring"]["prior_beta"]) for x in recs]
                beta += f" ({', '.join(f'{g:g}' for g in gs)})"
            how = HOW[row] + (f"; chose: {', '.join(x['chose'] for x in recs)}" if row == "training-free auto" else "")
            lines.append(f"| {row} | {how} | {mean_std([x['valid']['ndcg@10'] for x in recs])} | "
                         f"{mean_std([x['test']['hr@10'] for x in recs])} | "
                         f"{mean_std([x['test']['ndcg@10'] for x in recs])} | "
                         f"{np.median(ranks, axis=1).mean():.0f} | {beta} |")
        lines += ["", "Differences on test (a − b, per-user gains averaged over the seeds, 95% paired bootstrap over "
                  f"{users} users):", "", "| a − b | HR@10 | NDCG@10 |", "|---|---|---|"]
        heads = {}
        for a, b in HEADLINES:
            ra, rb = ranks_of(results, a), ranks_of(results, b)
            heads[(a, b)] = {m: judged(ra, rb, m, n_boot) for m in ("hr@10", "ndcg@10")}
            lines.append(f"| {a} − {b} | {interval(heads[(a, b)]['hr@10'])} | {interval(heads[(a, b)]['ndcg@10'])} |")
        lines.append("")
        lines += findings_lines(variant, results, heads)
        summary[variant] = {"heads": heads, "results": results}
    if len(variants) > 1:
        base, *others = list(variants)
        lines += [f"### Source variants against `{base}` (same target users, seeds paired by index)", "",
                  "| row | variant − base NDCG@10 |", "|---|---|"]
        for other in others:
            for row in ROWS[1:]:
                res = judged(ranks_of(variants[other], row), ranks_of(variants[base], row), "ndcg@10", n_boot)
                lines.append(f"| {row}: {other} − {base} | {interval(res)} |")
        lines.append("")
    lines += modality_lines(variants) + diagnosis_lines(variants)
    return lines, summary


def findings_lines(variant: str, results: list[dict], heads: dict) -> list[str]:
    """What the figures of one source variant say, as computed sentences (NDCG@10 on test; ρ: Spearman)."""
    def iv(a, b):
        return heads[(a, b)]["ndcg@10"]

    ds = [r["diagnosis"] for r in results]
    rho_s = float(np.nanmean([d["source"]["spearman_mean_score_vs_source_count"] for d in ds]))
    rho_t = float(np.nanmean([d["target"]["spearman_mean_score_vs_target_count"] for d in ds]))
    zs = iv("zero-shot", "popularity")
    lines = [f"Findings ({variant}):", "",
             f"- zero-shot against popularity: {interval(zs)}.",
             f"- the source model's mean item score follows its own catalogue's popularity at ρ = {rho_s:+.2f}; on "
             f"the target, the target's popularity at ρ = {rho_t:+.2f}."]
    if all("source_at_target_size" in d for d in ds):
        own = float(np.mean([d["source_at_target_size"]["model"]["ndcg@10"] for d in ds]))
        pop = float(np.mean([d["source_at_target_size"]["popularity"]["ndcg@10"] for d in ds]))
        said = "rules catalogue size out" if own > pop else "does not rule catalogue size out"
        lines.append(f"- on its own catalogue cut to the target's {ds[0]['source_at_target_size']['items']} items "
                     f"the source model scores {own:.4f} against popularity's {pop:.4f}: this {said}.")
    cb = iv("content baseline", "zero-shot")
    said = {"win": "the user encoder loses what the towers carry", "loss": "the user encoder adds to the towers",
            "no clear difference": "the user encoder neither adds nor loses"}.get(cb["verdict"], cb["verdict"])
    lines.append(f"- the content baseline (no user encoder) against zero-shot: {interval(cb)}: {said}.")
    lines.append(f"- the target popularity prior on zero-shot: {interval(iv('zero-shot + prior', 'zero-shot'))}; "
                 f"transfer=auto's training-free choice against popularity: "
                 f"{interval(iv('training-free auto', 'popularity'))}.")
    return lines + [""]


def modality_lines(variants: dict[str, list[dict]]) -> list[str]:
    lines = ["### Test NDCG@10 by the target item's modality", "",
             "| source | modality (test users) | " + " | ".join(BY_MODALITY) + " |",
             "|---|---|" + "---|" * len(BY_MODALITY)]
    for variant, results in variants.items():
        d = results[0]["diagnosis"]
        mods = np.asarray(d["test_target_modality"])
        for m in np.unique(mods):
            sel = mods == m
            cells = []
            for row in BY_MODALITY:
                ranks = ranks_of(results, row)[:, sel]
                cells.append(f"{np.mean([np.where(r <= 10, 1 / np.log2(r + 1.0), 0).mean() for r in ranks]):.4f}")
            name = d["modality_names"][int(m)]
            lines.append(f"| {variant} | {name} ({int(sel.sum())}) | " + " | ".join(cells) + " |")
    return lines + [""]


def diagnosis_lines(variants: dict[str, list[dict]]) -> list[str]:
    lines = ["### Diagnosis (means over source seeds)", "",
             "| source | ρ(item-vector norm, source count) | ρ(mean score, source count) | ρ(item-vector norm, target "
             "count) | ρ(mean zero-shot score, target count) | target's 10 most popular items: mean score percentile "
             "| source's own test NDCG@10: model / popularity | at the target's catalogue size |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, results in variants.items():
        ds = [r["diagnosis"] for r in results]

        def avg(f):
            return float(np.nanmean([f(d) for d in ds]))

        size = "(target not smaller)"
        if all("source_at_target_size" in d for d in ds):
            size = (f"{avg(lambda d: d['source_at_target_size']['model']['ndcg@10']):.4f} / "
                    f"{avg(lambda d: d['source_at_target_size']['popularity']['ndcg@10']):.4f} "
                    f"({ds[0]['source_at_target_size']['items']} items)")
        lines.append(
            f"| {variant} | {avg(lambda d: d['source']['spearman_norm_vs_source_count']):+.3f} | "
            f"{avg(lambda d: d['source']['spearman_mean_score_vs_source_count']):+.3f} | "
            f"{avg(lambda d: d['target']['spearman_norm_vs_target_count']):+.3f} | "
            f"{avg(lambda d: d['target']['spearman_mean_score_vs_target_count']):+.3f} | "
            f"{avg(lambda d: d['target']['top10_popular_score_percentile']):.2f} | "
            f"{avg(lambda d: d['source_own_test']['model']['ndcg@10']):.4f} / "
            f"{avg(lambda d: d['source_own_test']['popularity']['ndcg@10']):.4f} | {size} |")
    return lines + [""]


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (split, variant) in zip(axes[0], groups):
        res = results[(split, variant)]
        means = [np.mean([r["rows"][row]["test"]["ndcg@10"] for r in res]) for row in ROWS]
        errs = [np.std([r["rows"][row]["test"]["ndcg@10"] for r in res], ddof=1) if len(res) > 1 else 0
                for row in ROWS]
        ax.bar(range(len(ROWS)), means, yerr=errs,
               color=["#999"] + ["#4477aa"] * 2 + ["#66aa55"] * 2 + ["#cc6677"] + ["#aa7744"] * 2)
        ax.set_xticks(range(len(ROWS)), [r.replace(" + ", "\n+ ") for r in ROWS], rotation=45, ha="right",
                      fontsize=7)
        ax.set_title(f"{split}: {variant}", fontsize=9)
        ax.set_ylabel("test NDCG@10 (mean over source seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(suite, results: dict[tuple[str, str], list[dict]], command: str, settings: list[str]) -> Path:
    out = suite.out
    lines = ["# Cross-catalogue transfer: a source export on a catalogue it never saw, with no target training", "",
             f"- command: `{relative_path(command)}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; hardware: {hardware()}",
             f"- preset `{suite.preset}` with {', '.join(settings)} for every source run (the settings of "
             "[same_platform/table4_hm_split_128px.md](same_platform/table4_hm_split_128px.md), whose zero-shot win "
             "is the control); bootstrap: 1000 paired resamples of test users, 95% interval",
             "- leave-one-out, whole-catalogue ranking, the user's seen items excluded; beta of every prior chosen on "
             "the target's validation split (grid g x the content scores' spread / the prior's), never on test", ""]
    for split in dict.fromkeys(s for s, _ in results):
        raw = suite.raw_folder({"ml": "ml-new-mixed", "hm": "hm-b-mixed"}[split]).parent / "split_report.json"
        if raw.exists():
            rep = json.loads(raw.read_text())
            sides = rep.get("sides") or rep.get("halves")
            lines.append(f"- split `{split}`: {rep['rule']}; " + "; ".join(
                f"{k}: {', '.join(f'{n} {v}' for n, v in s.items() if n != 'release_years')}"
                for k, s in sides.items()))
    lines.append("")
    summaries = {}
    for split in dict.fromkeys(s for s, _ in results):
        variants = {v: r for (s, v), r in results.items() if s == split}
        body, summaries[split] = split_lines(split, variants, suite.n_boot)
        lines += body
    png = out / "cross_catalogue.png"
    plot(png, results)
    lines += ["![test NDCG@10 of every training-free row](cross_catalogue.png)", ""]
    csv_path = out / "cross_catalogue_runs.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["split", "source", "seed", "source_run", "row", "prior_beta", "valid_ndcg@10", "test_hr@10",
                    "test_ndcg@10"])
        for (split, variant), res in results.items():
            for r in res:
                for row in ROWS:
                    x = r["rows"][row]
                    w.writerow([split, variant, r["seed"], r["source_run"], row, x["scoring"]["prior_beta"],
                                round(x["valid"]["ndcg@10"], 6), round(x["test"]["hr@10"], 6),
                                round(x["test"]["ndcg@10"], 6)])
    lines.append(f"CSV of every seed and row: `{csv_path.name}`.")
    path = out / "cross_catalogue.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "cross_catalogue.json").write_text(json.dumps(
        {split: {v: {f"{a} - {b}": h for (a, b), h in s["heads"].items()} for v, s in summ.items()}
         for split, summ in summaries.items()}, indent=1))
    return path
