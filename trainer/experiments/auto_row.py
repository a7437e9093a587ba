"""Table 4's "auto" row from the cached runs: per target and seed, the transfer=auto choice among the rows it chooses
between (the start = zero-shot, plain fine-tuning, the low rate, towers only: whichever the target has, trained with
the same settings), made on validation NDCG@10 exactly as `trainer/training/transfer_auto.py` chooses among its
candidates.

    python -m transrec.trainer.experiments.auto_row [--runs reports/runs] [--out reports/table4_auto.md]
        [--figure reports/transfer_vs_scratch.png]

The figure shows, per target group, plain fine-tuning from the export (the paper's transfer) and the auto choice
against scratch: NDCG@10 difference with its 95% paired interval.

No training: the candidates are the cached runs of the table-4 reports (reports/runs/*/runner.json), grouped by target
and settings; a group needs plain transfer and scratch on every seed. The low-rate rows were run at stage1.lr=1e-4 and
stage2.lr=1e-4 (`transfer.low_lr=0.0001` reproduces them in a transfer=auto run).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
from pathlib import Path

import numpy as np

from transrec.trainer.core.config import changed
from transrec.trainer.core.config_records import to_dict
from transrec.trainer.core.presets import preset
from transrec.trainer.evaluation.ranking import per_user_gain
from transrec.trainer.evaluation.run_stats import compare, read_ranks
from transrec.trainer.experiments.plans import DOMAINS, MODEL_CHANGES, SOURCE_OF, table_settings
from transrec.trainer.experiments.report import save_figure
from transrec.trainer.experiments.run_keys import drop_settings_that_change_nothing

CANDIDATE_ROWS = {"zeroshot": "start (zero-shot)", "transfer": "fine-tuned", "transfer-lowlr": "low rate",
                  "transfer-towers": "towers only"}
# targets that share their scratch runs with another target (the same shards and settings)
SCRATCH_OF = {"hm-b-image-from-a-image": "hm-b-image", "hm-b-text-side-from-a-text": "hm-b-text-side"}
SEEDS = (0, 1, 2)
# what a run's configuration holds that never tells a group apart: where it ran, its seed, the domain's side features
NOT_SETTINGS = (("data", "shards"), ("data", "feature_store"), ("model", "text_encoder"), ("", "run_dir"),
                ("", "init_from"), ("", "resume"), ("", "seed"), ("model", "side_features"), ("", "preset"))
# the settings in words, where a figure's label has room for them
WORDS = {("eval", "patience", 0): "no early stopping", ("model", "image_size", 128): "128 px",
         ("model", "image_size", 64): "64 px", ("model", "learn_temperature", True): "learned temperature"}


def flat_settings(config: dict) -> dict[tuple[str, str], str]:
    """A run configuration (run_config.json's, of any age) as {(section or "", name): value as JSON}, in run keys'
    form (trainer/experiments/run_keys.py), less NOT_SETTINGS."""
    cfg = drop_settings_that_change_nothing(copy.deepcopy(config))
    flat = {}
    for name, value in cfg.items():
        for key, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            flat[(name, key) if key is not None else ("", name)] = json.dumps(v, sort_keys=True)
    return {k: v for k, v in flat.items() if k not in NOT_SETTINGS}


@functools.cache
def row_fields() -> frozenset:
    """The settings the rows auto chooses among set for themselves (zero-shot's stages, the low rates, ...)."""
    base = flat_settings(to_dict(changed(preset("cpu-small"))))
    fields = set()
    for model in CANDIDATE_ROWS:
        own = flat_settings(to_dict(changed(preset("cpu-small"), *MODEL_CHANGES[model])))
        fields |= {k for k in base.keys() | own.keys() if base.get(k) != own.get(k)}
    return frozenset(fields)


@functools.cache
def table_flat_settings() -> dict[tuple[str, str], str]:
    """The tables' configuration (cpu-small with the table settings) in flat_settings' form."""
    return flat_settings(to_dict(changed(preset("cpu-small"), table_settings)))


def group_settings(run: Path) -> tuple[tuple[tuple[str, str], str], ...]:
    """The run's settings that tell its group apart: its configuration less the rows' own settings."""
    flat = flat_settings(json.loads((run / "run_config.json").read_text())["config"])
    return tuple(sorted((k, v) for k, v in flat.items() if k not in row_fields()))


def grouped_runs(runs: Path) -> dict[tuple[str, tuple], dict[str, dict[int, Path]]]:
    """(target, its settings: group_settings) -> model -> seed -> run folder."""
    groups: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for rec_file in sorted(runs.glob("*/runner.json")):
        rec = json.loads(rec_file.read_text())
        spec = rec["spec"]
        if spec.get("fraction", 1.0) != 1.0 or spec.get("frozen") or spec.get("source_fraction", 1.0) != 1.0:
            continue
        if spec["model"] not in (*CANDIDATE_ROWS, "scratch"):
            continue
        if not content_objective(rec_file.parent):
            continue
        settings = group_settings(rec_file.parent)
        seeds = groups[(spec["domain"], settings)][spec["model"]]
        if spec["seed"] in seeds:
            shown = ", ".join(map(setting_text, shown_settings(settings))) or "the table settings"
            raise SystemExit(f"error: runs {seeds[spec['seed']].name} and {rec_file.parent.name} are both "
                             f"{spec['model']} on {spec['domain']}, seed {spec['seed']}, with the same settings "
                             f"({shown}); keep one (the table reports list the runs they use)")
        seeds[spec["seed"]] = rec_file.parent
    return groups


def content_objective(run: Path) -> bool:
    """Whether the run trained the content softmax (transfer=auto's objective). Runs made while the paper's
    objectives were the default record a 'scratch' or 'transfer' model with no objective setting; their resolved
    configuration has no content head."""
    cfg = json.loads((run / "run_config.json").read_text())["config"]
    return cfg.get("stage1", {}).get("head") == "content" and cfg.get("stage2", {}).get("loss", "cpc") != "cpc"


def shown_settings(settings: tuple) -> list[tuple[str, str, object]]:
    """The settings where a group differs from the tables' configuration (cpu-small with the table settings):
    (section or "", name, value)."""
    table = table_flat_settings()
    return [(section, name, json.loads(value)) for (section, name), value in settings
            if (section, name) in table and table[(section, name)] != value]


def setting_text(setting: tuple[str, str, object]) -> str:
    section, name, value = setting
    return f"{section + '.' if section else ''}{name}: {json.dumps(value)}"


def _valid(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["valid"]["ndcg@10"]


def _ranks(run: Path) -> np.ndarray:
    return read_ranks(run / "test_ranks.tsv")[2]


def ndcg(ranks: np.ndarray) -> np.ndarray:
    """NDCG@10 per seed of [seeds, users] ranks."""
    return np.array([per_user_gain(r, "ndcg@10").mean() for r in ranks])


def auto_rows(groups: dict) -> list[dict]:
    rows = []
    for (target, settings), models in sorted(groups.items()):
        scratch = models.get("scratch") or groups.get((SCRATCH_OF.get(target), settings), {}).get("scratch", {})
        if target in SCRATCH_OF and not scratch:  # the scratch runs of the target whose shards it shares
            scratch = next((m["scratch"] for (t, _), m in groups.items() if t == SCRATCH_OF[target]
                            and "scratch" in m and set(m["scratch"]) >= set(SEEDS)), {})
        if not all(s in models.get("transfer", {}) and s in scratch for s in SEEDS):
            continue
        cands = [m for m in CANDIDATE_ROWS if m in models]
        if len(cands) < 2:  # nothing to choose between
            continue
        chosen, auto = [], []
        for seed in SEEDS:
            runs = {m: models[m].get(seed, models[m].get(0)) if m == "zeroshot" else models[m].get(seed) for m in cands}
            runs = {m: r for m, r in runs.items() if r is not None}
            pick = max(runs, key=lambda m: (_valid(runs[m]), -cands.index(m)))
            chosen.append(pick)
            auto.append(_ranks(runs[pick]))
        auto = np.stack(auto)
        row_ranks = {m: np.stack([_ranks(models[m].get(s, models[m].get(0))) if m == "zeroshot" else
                                  _ranks(models[m][s]) for s in SEEDS]) for m in cands
                     if m == "zeroshot" or all(s in models[m] for s in SEEDS)}
        scratch_r = np.stack([_ranks(scratch[s]) for s in SEEDS])
        cold = np.zeros(auto.shape[1], dtype=bool)
        best_row = max(row_ranks, key=lambda m: ndcg(row_ranks[m]).mean())
        rows.append({
            "target": target, "settings": shown_settings(settings),
            "candidates": cands, "chosen": chosen, "auto": ndcg(auto), "scratch": ndcg(scratch_r),
            "rows": {m: ndcg(r) for m, r in row_ranks.items()}, "best_row": best_row,
            "vs_scratch": compare(auto, scratch_r, cold, "ndcg@10", "all"),
            "finetuned_vs_scratch": compare(row_ranks["transfer"], scratch_r, cold, "ndcg@10", "all"),
            "vs_best": compare(auto, row_ranks[best_row], cold, "ndcg@10", "all"),
        })
    return rows


def within_seed_spread(row: dict) -> bool:
    """Whether auto's mean is at most the best single row's seed spread (max - min) below that row's mean."""
    best = row["rows"][row["best_row"]]
    return row["auto"].mean() >= best.mean() - (best.max() - best.min())


def report(rows: list[dict], command: str) -> str:
    lines = ["# Table 4, auto row: transfer=auto's choice on validation among the cached rows", "",
             f"Made by `{command}` from the cached runs (no training). Test NDCG@10, mean of 3 seeds (seed spread: "
             "min-max); differences with a 95% paired bootstrap interval over test users (gains averaged over seeds).",
             ""]
    lines += ["| target (settings) | candidates | chosen per seed | auto | scratch | auto - scratch "
              "| fine-tuned - scratch | best single row | auto - best row | within the seed spread of the best row? |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = r["rows"][r["best_row"]]
        vs, vb, vf = r["vs_scratch"], r["vs_best"], r["finetuned_vs_scratch"]
        lines.append(
            f"| {r['target']} ({', '.join(map(setting_text, r['settings'])) or 'table settings'}) | "
            f"{', '.join(CANDIDATE_ROWS[c] for c in r['candidates'])} | "
            f"{', '.join(CANDIDATE_ROWS[c] for c in r['chosen'])} | {r['auto'].mean():.4f} "
            f"({r['auto'].min():.4f}-{r['auto'].max():.4f}) | {r['scratch'].mean():.4f} | {vs['diff']:+.4f} "
            f"[{vs['low']:+.4f}, {vs['high']:+.4f}] {vs['verdict']} | {vf['diff']:+.4f} [{vf['low']:+.4f}, "
            f"{vf['high']:+.4f}] {vf['verdict']} | {CANDIDATE_ROWS[r['best_row']]} "
            f"{spread.mean():.4f} ({spread.min():.4f}-{spread.max():.4f}) | {vb['diff']:+.4f} [{vb['low']:+.4f}, "
            f"{vb['high']:+.4f}] | {'yes' if within_seed_spread(r) else 'NO'} |")
    losses = [r["target"] for r in rows if r["vs_scratch"]["verdict"] == "loss"]
    misses = [r["target"] for r in rows if not within_seed_spread(r)]
    lines += ["", f"Below scratch with an interval that excludes zero: {', '.join(losses) or 'none'}. "
              f"Below the best single row by more than its seed spread: {', '.join(misses) or 'none'}.",
              "", "![transfer minus scratch](transfer_vs_scratch.png)",
              "", "The best single row is picked on test after the fact (an oracle no run has); auto chooses on "
              "validation per seed. A target lacks a candidate where its report never ran that row (towers only was "
              "run on the MovieLens-to-H&M targets; the low rate on the 128-px split targets and from the same-"
              "modality halves); a group with plain transfer as its only candidate is left out."]
    return "\n".join(lines) + "\n"


def group_label(row: dict) -> str:
    """'H&M half B image only <- H&M half A image only (128 px, no early stopping)' for the figure."""
    target, source = DOMAINS[row["target"]].label, DOMAINS[SOURCE_OF[row["target"]]].label
    words = [WORDS.get(setting, setting_text(setting)) for setting in row["settings"]]
    return f"{target} <- {source}" + (f" ({', '.join(words)})" if words else "")


def plot(rows: list[dict], path: Path) -> None:
    """Transfer minus scratch per target group: plain fine-tuning and the auto choice, 95% paired intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = (("finetuned_vs_scratch", "fine-tuned from the export (the paper's transfer)", "tab:gray", "o"),
              ("vs_scratch", "chosen on validation (transfer=auto)", "tab:blue", "D"))
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 2.2))
    y = np.arange(len(rows))[::-1]
    for i, (key, label, colour, marker) in enumerate(series):
        d = np.array([r[key]["diff"] for r in rows])
        err = np.array([[r[key]["diff"] - r[key]["low"] for r in rows],
                        [r[key]["high"] - r[key]["diff"] for r in rows]])
        ax.errorbar(d, y + (0.15 - 0.3 * i), xerr=err, fmt=marker, color=colour, capsize=3, ms=5, label=label)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [group_label(r) for r in rows], fontsize=8)
    ax.set_xlabel("test NDCG@10, transfer minus scratch\n"
                  "(mean of 3 seeds; 95% paired bootstrap interval over test users)", fontsize=8)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    save_figure(plt, fig, path, "Transfer minus train-from-scratch per target (left of 0: transfer is worse)")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m transrec.trainer.experiments.auto_row", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("reports/runs"))
    p.add_argument("--out", type=Path, default=Path("reports/table4_auto.md"))
    p.add_argument("--figure", type=Path, default=Path("reports/transfer_vs_scratch.png"))
    a = p.parse_args(argv)
    rows = auto_rows(grouped_runs(a.runs))
    if not rows:
        raise SystemExit(f"error: no target in {a.runs} has plain transfer and scratch on seeds {SEEDS}")
    text = report(rows, "python -m transrec.trainer.experiments.auto_row")
    a.out.write_text(text)
    plot(rows, a.figure)
    print(text)
    return text


if __name__ == "__main__":
    main()
