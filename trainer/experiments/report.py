"""Markdown, CSV and PNG output of `trainer.experiments`: one report per table, with the paper's claims checked.

Numbers are means over seeds (± sample std when there are several); every headline difference carries a 95%
paired bootstrap interval over test users (per-user gains averaged over seeds first), and is called a win or a
loss only when that interval excludes zero.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from transrec.data_shards.shard_io import read_sequences
from transrec.trainer.evaluation.run_stats import (  # noqa: F401  (the reports' statistics; re-exported for the runner)
    METRICS,
    MIN_JUDGED_USERS,
    NOT_JUDGED,
    SUBSETS,
    cold_mask,
    compare,
    read_ranks,
    seed_metrics,
    subset_mask,
    training_items,
)
from transrec.trainer.experiments.plans import DOMAINS, SOURCE_OF, TABLE_SETTINGS_TEXT
from transrec.trainer.experiments.run_keys import flat_model_settings

if TYPE_CHECKING:
    from transrec.trainer.experiments.plans import RowPlan, TablePlan
    from transrec.trainer.experiments.suite import Suite


@dataclass
class RowResult:
    plan: RowPlan
    users: np.ndarray
    ranks: np.ndarray  # [S, U]
    cold: np.ndarray  # [U]
    runs: list[str]  # run keys (view rows: the runs whose best model was evaluated)
    per_seed: list[dict]  # seed_metrics per seed
    curves: list[Path]  # valid_curve.csv per seed (training rows)


# -- writing -------------------------------------------------------------------------------------------------

SHOWN = {"all": ("hr@10", "ndcg@10", "hr@20", "ndcg@20"), "warm": ("hr@10", "ndcg@10", "ndcg@20"),
         "cold": ("hr@10", "ndcg@10", "ndcg@20")}
HEAD_CELLS = (("hr@10", "all"), ("ndcg@10", "all"), ("ndcg@20", "all"), ("ndcg@10", "warm"), ("ndcg@10", "cold"))


def hardware() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal"))
        mem_s = f", {mem / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem_s = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores{mem_s}, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def _fmt(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{np.nanmean(v):.4f} ± {np.nanstd(v, ddof=1):.4f}"


def _mean(res: RowResult, metric: str, subset: str = "all") -> float:
    return float(np.mean([s[subset][metric] for s in res.per_seed]))


def _cell(r: dict) -> str:
    if r["verdict"] == NOT_JUDGED:
        return f"{NOT_JUDGED}: {r['users']} test users (< {r['min_users']})"
    return f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] {r['verdict']}"


def _run_record(suite: Suite, key: str) -> dict:
    path = suite.out / "runs" / key / "runner.json"
    return json.loads(path.read_text()) if path.exists() else {}


def relative_path(arg: str) -> str:
    """A path argument relative to the repository (reports never record one machine's absolute paths)."""
    repo = Path(__file__).resolve().parents[2]
    if not arg.startswith("/"):
        return arg
    return os.path.relpath(arg, repo)


def trainable_text(stage: dict) -> str:
    """"text 1 / image 1" from a recorded stage config (the per-modality map, or the former two fields)."""
    t = stage.get("trainable")
    if t is None:
        t = {"text": stage.get("text_trainable", 0), "image": stage.get("image_trainable", 0)}
    return " / ".join(f"{name} {blocks}" for name, blocks in t.items()) or "none"


def settings_lines(suite: Suite, plan: TablePlan) -> list[str]:
    """The trained configuration, read back from one content run's run_config.json (and the towers' origin)."""
    spec = next((s for r in plan.rows for s in r.specs if s.content), None)
    if spec is None:
        return []
    cfg = flat_model_settings(json.loads((suite.run_dir(spec) / "run_config.json").read_text())["config"])
    m, s1, s2 = cfg["model"], cfg["stage1"], cfg["stage2"]
    text = m["text_encoder"]
    text_origin = {"minilm": "all-MiniLM-L6-v2, pretrained (its generic weights)",
                   "bert-base-random-init": "BERT-base shape, RANDOM init"}.get(
        text, "tiny random 2-layer BERT (quick mode only)" if "tiny-random" in text else f"local BERT {text}")
    resnet = f"weights {m['image_weights']}" if m["image_weights"] else "RANDOM init (no pretrained weights offline)"
    image_origin = ("ImageNet-pretrained EfficientNet-Lite0" if m["image_backbone"] == "efficientnet-lite0"
                    else f"ResNet-18, {resnet}")
    lines = [
        (f"- preset `{suite.preset}`{' (--quick)' if suite.quick else ''}; extra overrides: "
        f"`{' '.join(suite.extra) or 'none'}`"
        + (f"; on the target domains' runs only: `{' '.join(suite.target_extra)}`" if suite.target_extra else "")
        + (f"; rows of models {', '.join(suite.models)} only" if suite.models else "")
        + f"; kept at the tables' setting where the preset's default has since changed: {TABLE_SETTINGS_TEXT}"
        + "; the paper-scale settings are `--preset paper`."),
        (f"- model: d={m['d']}, user encoder {m['user_encoder']} ({m['user_layers']} layers, {m['user_heads']} heads), "
        f"window {m['max_len']}, images {m['image_size']} px, {m['max_tokens']} text tokens, dropout {m['dropout']}."),
        (f"- stage 1: {s1['epochs']} epochs, lr {s1['lr']}, micro batch {s1['micro_batch']}, stride {s1['stride']}"
        f"{', max ' + str(s1['max_steps']) + ' steps' if s1['max_steps'] else ''}; stage 2: {s2['epochs']} epochs, lr "
        f"{s2['lr']} (towers {s2['tower_lr']}), micro batch {s2['micro_batch']}, {s2['negatives']} negatives, history "
        f"{s2['n_history']} + continuation {s2['n_continuation']}, trainable top blocks {trainable_text(s2)}"
        f"{', max ' + str(s2['max_steps']) + ' steps' if s2['max_steps'] else ''}."),
        (f"- evaluation: leave-one-out test, full ranking of the catalogue, the user's seen items excluded: "
        f"{cfg['eval']['exclude_seen']}; selected: the best content-scoring model on validation NDCG@10 (the best of "
        "any kind for ID models); early-stopping patience "
        f"{cfg['eval']['patience']}."),
        (f"- towers of train-from-scratch start from their generic weights: text {text_origin}; image {image_origin}. "
        "ID baselines learn an ID table from random init."),
    ]
    return lines


def data_lines(suite: Suite, plan: TablePlan, results: dict) -> list[str]:
    domains = []
    for r in plan.rows:
        for s in r.specs:
            for d in (s.domain, SOURCE_OF[s.domain] if s.model == "transfer" else None, r.view):
                if d and d not in domains:
                    domains.append(d)
    lines = ["| domain | shards | users (evaluated) | items | interactions | input files (sha256) |",
             "|---|---|---|---|---|---|"]
    for d in domains:
        m = suite.manifest(d)
        hashes = "; ".join(f"{k} {v[:16]}" for k, v in sorted(m["input_files"].items()))
        lines.append(f"| {DOMAINS[d].label} | `{suite.shards(d).relative_to(suite.out)}` | {m['num_users']} "
                     f"({m['num_users_evaluated']}) | {m['num_items']} | {m['num_interactions']} | {hashes} |")
    lines.append("")
    for d in domains:
        policies = suite.manifest(d).get("policies", {})
        collapsed = (f"; {policies['duplicates_removed']} same-day repeats of an article collapsed (see BUILD_OPTIONS "
                     "in trainer/experiments/plans.py)" if policies.get("duplicates_removed") else "")
        argv = " ".join(relative_path(x) for x in suite.build_command(d))
        lines.append(f"- {d}: `python -m transrec.data_shards.build {argv}`{collapsed}")
    cold = {}
    for res in results.values():
        dom = res.plan.specs[0].domain
        cold.setdefault(dom, (int(res.cold.sum()), len(res.cold)))
    lines.append("")
    lines += [f"- {DOMAINS[d].label}: {c} of {n} test targets ({100 * c / max(n, 1):.1f}%) are cold (never in any "
              f"user's training portion); {cold_repeats(suite.shards(d))} of these cold targets repeat the user's own "
              "validation item (a repeat purchase), which a model can still see in the history"
              for d, (c, n) in cold.items()]
    return lines


def cold_repeats(shards: Path) -> int:
    """Evaluated users whose cold test target equals their validation item."""
    seqs = read_sequences(shards)
    train = training_items(shards)
    return sum(1 for s in seqs if s["evaluated"] and s["items"][s["num_train"] + 1] == s["items"][s["num_train"]]
               and not np.isin(s["items"][s["num_train"] + 1], train))


def results_lines(plan: TablePlan, results: dict) -> list[str]:
    out = []
    groups = list(dict.fromkeys(r.group for r in plan.rows))
    for g in groups:
        rows = [res for (gg, _), res in results.items() if gg == g]
        n = {s: rows[0].per_seed[0][s]["users"] for s in SUBSETS}
        head = ["model"] + [f"{k.upper()} {s}" for s in SUBSETS for k in SHOWN[s]] + ["seeds"]
        out += [f"### {g}", "", f"Test users: all {n['all']}, warm {n['warm']}, cold {n['cold']}.", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for res in rows:
            cells = [_fmt([s[sub][k] for s in res.per_seed]) for sub in SUBSETS for k in SHOWN[sub]]
            label = res.plan.label + (f" ({res.plan.note})" if res.plan.note else "")
            out.append(f"| {label} | " + " | ".join(cells) + f" | {len(res.per_seed)} |")
        out.append("")
    return out


def headline_lines(plan: TablePlan, results: dict, heads: dict) -> list[str]:
    head = ["group", "difference"] + [f"{m.upper()} {s}" for m, s in HEAD_CELLS] + ["NDCG@10 all, relative"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (g, a, b), res in heads.items():
        base = _mean(results[(g, b)], "ndcg@10")
        judged = res[("ndcg@10", "all")]["verdict"] != NOT_JUDGED
        rel = f"{100 * res[('ndcg@10', 'all')]['diff'] / base:+.1f}%" if base > 0 and judged else "n/a"
        out.append(f"| {g} | {a} − {b} | " + " | ".join(_cell(res[c]) for c in HEAD_CELLS) + f" | {rel} |")
    return out


def claim_lines(plan: TablePlan, results: dict, heads: dict) -> list[str]:
    out = ["| paper's claim | this run shows | verdict |", "|---|---|---|"]
    for c in plan.claims:
        sub = c.get("subset", "all")
        found = [(p, heads[p][("ndcg@10", sub)]) for p in c["pairs"] if p in heads]
        unjudged = [(p, r) for p, r in found if r["verdict"] == NOT_JUDGED]
        found = [(p, r) for p, r in found if r["verdict"] != NOT_JUDGED]
        wins = [p for p, r in found if r["verdict"] == "win"]
        losses = [p for p, r in found if r["verdict"] == "loss"]
        detail = "; ".join(f"{g}: {a} − {b} = {_cell(r)}" for (g, a, b), r in found)
        if not found:
            verdict = f"NOT JUDGED (no group has {MIN_JUDGED_USERS} or more {sub} test users)"
        elif c["kind"] == "win":
            verdict = ("HOLDS" if len(wins) == len(found) else "DOES NOT HOLD" if losses else
                       f"NOT SHOWN ({len(wins)} of {len(found)} intervals support it)")
        elif c["kind"] == "not_worse":
            verdict = "DOES NOT HOLD (significantly worse)" if losses else "HOLDS (no significant loss)"
        elif c["kind"] == "monotone":
            means = [_mean(results[k], "ndcg@10", sub) for k in c["order"]]
            by_fraction = ", ".join(f"{k[1]} {v:.4f}" for k, v in zip(c["order"], means))
            detail = f"mean NDCG@10 by fraction: {by_fraction}; {detail}"
            monotone = all(x < y for x, y in itertools.pairwise(means))
            verdict = ("HOLDS" if monotone and wins else "DOES NOT HOLD" if losses or not monotone
                       else "NOT SHOWN (interval includes 0)")
        else:  # relative_decreasing: relative gains in the order of the pairs (smallest data first)
            rel = []
            for p, r in found:
                base = _mean(results[(p[0], p[2])], "ndcg@10", sub)
                rel.append(r["diff"] / base if base > 0 else float("nan"))
            detail = "relative NDCG@10 gain: " + ", ".join(f"{p[0]} {100 * v:+.1f}%" for (p, _), v in zip(found, rel))
            decreasing = all(x > y for x, y in itertools.pairwise(rel))
            verdict = ("HOLDS" if decreasing and found[0][1]["verdict"] == "win" else
                       "DOES NOT HOLD" if not decreasing else "NOT SHOWN (smallest-data gain not significant)")
        subset_note = f" [{sub} test users, NDCG@10]" if sub != "all" else " [NDCG@10, all test users]"
        if unjudged:
            subset_note += "; {} (too few {} test users): {}".format(
                NOT_JUDGED, sub, "; ".join(f"{g} ({r['users']} users)" for (g, _, _), r in unjudged))
        out.append(f"| {c['claim']} | {detail}{subset_note} | **{verdict}** |")
    return out


def runs_lines(suite: Suite, results: dict) -> tuple[list[str], float, int]:
    """One line per run used (rows' runs, then the transfer sources), with its wall time from runner.json."""
    uses: dict[str, list[str]] = {}
    for res in results.values():
        for key in res.runs:
            view = " (view)" if res.plan.kind == "view" else ""
            uses.setdefault(key, []).append(f"{res.plan.group} / {res.plan.label}{view}")
    for key in list(uses):
        src = _run_record(suite, key).get("source_run")
        if src:
            uses.setdefault(src, []).append("source of transfer")
    out = ["| run (OUT/runs/) | used for | domain | model | seed | user fraction | frozen | best stage | wall s | "
           "this invocation | code (git) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    total, trained = 0.0, 0
    for key, rows in uses.items():
        rec = _run_record(suite, key)
        spec = rec.get("spec", {})
        best = json.loads((suite.out / "runs" / key / "metrics.json").read_text())["best"]["stage"]
        code = json.loads((suite.out / "runs" / key / "run_config.json").read_text()).get("git_hash", "?")
        total += rec.get("wall_s", 0.0)
        used = suite.used.get(key, {}).get("this_invocation", "cached")
        trained += used == "trained"
        wall = f"{rec.get('wall_s', 'n/a')}{' (resumed: last part only)' if rec.get('resumed') else ''}"
        out.append(f"| `{key}` | {'; '.join(dict.fromkeys(rows))} | {spec.get('domain')} | {spec.get('model')} | "
                   f"{spec.get('seed')} | {spec.get('fraction')} | {spec.get('frozen')} | {best} | {wall} | {used} | "
                   f"{code} |")
    return out, total, trained


def write_csv(path: Path, suite: Suite, plan: TablePlan, results: dict) -> None:
    fields = ["table", "group", "row", "run", "domain", "model", "seed", "user_fraction", "source_fraction", "frozen",
              "kind", "wall_s"] + [f"{k}_{s}" for s in SUBSETS for k in METRICS] + [f"users_{s}" for s in SUBSETS]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for res in results.values():
            for key, spec, m in zip(res.runs, res.plan.specs, res.per_seed):
                row = {"table": plan.name, "group": res.plan.group, "row": res.plan.label, "run": key,
                       "domain": res.plan.view or spec.domain, "model": spec.model, "seed": spec.seed,
                       "user_fraction": spec.fraction,
                       "source_fraction": spec.source_fraction if spec.model == "transfer" else "",
                       "frozen": spec.frozen, "kind": res.plan.kind,
                       "wall_s": _run_record(suite, key).get("wall_s", "")}
                row.update({f"{k}_{s}": f"{m[s][k]:.6f}" for s in SUBSETS for k in METRICS})
                row.update({f"users_{s}": m[s]["users"] for s in SUBSETS})
                w.writerow(row)


def _panels(plan: TablePlan, height: float):
    """(pyplot, figure, [(axes, group)]): one panel per row group of the table, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in plan.rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), height), squeeze=False)
    return plt, fig, list(zip(axes[0], groups))


def save_figure(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(path: Path, plan: TablePlan, results: dict) -> None:
    plt, fig, panels = _panels(plan, 4)
    for ax, g in panels:
        rows = [res for (gg, _), res in results.items() if gg == g]
        x = np.arange(len(rows))
        for i, sub in enumerate(SUBSETS):
            vals = [[s[sub]["ndcg@10"] for s in r.per_seed] for r in rows]
            mean = [np.nanmean(v) for v in vals]
            err = [np.nanstd(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(x + (i - 1) * 0.27, np.nan_to_num(mean), 0.27, yerr=err, label=sub, capsize=2)
        ax.set_xticks(x, [r.plan.label for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_title(g, fontsize=8)
        ax.set_ylabel("test NDCG@10")
    panels[0][0].legend(fontsize=7)
    save_figure(plt, fig, path, plan.title)


def plot_curves(path: Path, plan: TablePlan, results: dict) -> None:
    """Validation NDCG@10 after each epoch (stage 1 epochs, then stage 2), seed 0 of each training row."""
    plt, fig, panels = _panels(plan, 3.8)
    for ax, g in panels:
        for (gg, label), res in results.items():
            if gg != g or not res.curves or not res.curves[0].exists():
                continue
            with open(res.curves[0]) as f:
                rows = list(csv.DictReader(f))
            y = [float(r["ndcg@10"]) for r in rows]
            stages = [r["stage"] for r in rows]
            ax.plot(range(1, len(y) + 1), y, marker="o", ms=3, label=label)
            if "1" in stages and "2" in stages:
                ax.axvline(stages.index("2") + 0.5, color="grey", lw=0.5, ls=":")
        ax.set_title(g, fontsize=8)
        ax.set_xlabel("validation (stage 1 epochs, then stage 2)")
        ax.set_ylabel("valid NDCG@10")
        ax.legend(fontsize=7)
    save_figure(plt, fig, path, plan.curves_title or f"{plan.name}: validation curves")


def write_report(suite: Suite, plan: TablePlan, results: dict, heads: dict, command: str, wall: float) -> Path:
    out = suite.report_dir
    out.mkdir(parents=True, exist_ok=True)
    csv_path, bars = out / f"{plan.name}_runs.csv", out / f"{plan.name}_bars.png"
    curves = out / f"{plan.name}_curves.png"
    write_csv(csv_path, suite, plan, results)
    plot_bars(bars, plan, results)
    plot_curves(curves, plan, results)
    runs, train_total, trained = runs_lines(suite, results)
    seeds = ("one seed: means without spread, intervals over users only" if len(plan.seeds) == 1
             else "mean ± sample std over seeds")
    scale = (" in --quick mode (tiny model, a few steps: a smoke test of the pipeline, not evidence)" if suite.quick
             else "")
    lines = [
        f"# {plan.title}", "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; hardware: {hardware()}",
        f"- seeds: {plan.seeds} ({seeds}); bootstrap: {suite.n_boot} paired resamples of test users, 95% interval",
        (f"- runs: {len(runs) - 2} listed below ({trained} trained in this invocation, the rest from the cache); "
         f"this table took {wall:.0f} s now; the listed runs' own wall times sum to {train_total:.0f} s"),
        "",
        "## Settings", "", *settings_lines(suite, plan), "",
        "## Data", "", *data_lines(suite, plan, results), "",
        "## Results (test)", "",
        ("Mean over seeds (± sample std with several seeds). Warm: the test target occurs in some user's training "
         "portion; cold: it never does."), "", *results_lines(plan, results),
        "## Headline differences", "",
        ("a − b per user (gains averaged over seeds), mean and 95% paired bootstrap interval over test users; "
         "'win' / 'loss' only when the interval excludes zero."), "", *headline_lines(plan, results, heads), "",
        "## Figures", "", f"![bars]({bars.name})", "", f"![curves]({curves.name})", "",
        f"CSV of every run: `{csv_path.name}`.", "",
    ]
    if plan.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in plan.notes], ""]
    lines += ["## Runs used", "", *runs, "",
              "## The paper's claims and this run", "",
              ("Claims as stated for the paper (TransRec, Wang et al. 2022) in the project's issue; verdicts use the "
               "intervals above (NDCG@10). A claim that does not hold here may still hold at the paper's scale: this "
               f"run used the `{suite.preset}` preset on CPU{scale}."), "",
              *claim_lines(plan, results, heads), ""]
    path = out / f"{plan.name}.md"
    path.write_text("\n".join(lines))
    return path
