"""reports/leave_one_out.md (and .json): the leave-one-catalogue-out study's tables, paired intervals and verdicts,
from the per-target results of trainer/experiments/leave_one_out.py."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.experiments.leave_one_out_curve import fmt, source_size_curves, study_cost

ROWS = ("popularity", "zero-shot", "zero-shot + prior", "content baseline", "content baseline + prior",
        "training-free auto", "recent popularity", "zero-shot + recent prior", "content baseline + recent prior")
# (a, b) pairs whose test difference gets a paired interval, within one source (user state, seed)
PAIRS = (("zero-shot", "popularity"), ("zero-shot + prior", "popularity"), ("zero-shot", "content baseline"),
         ("zero-shot + prior", "content baseline + prior"), ("content baseline", "popularity"),
         ("content baseline + prior", "popularity"), ("training-free auto", "popularity"),
         ("recent popularity", "popularity"), ("zero-shot + recent prior", "recent popularity"),
         ("zero-shot + recent prior", "content baseline + recent prior"), ("zero-shot + recent prior", "popularity"))
# with --train-on-target: the rows that train on the target (trainer/experiments/leave_one_out_trained.py)
AUTO_ROW = "auto choice"  # the candidate transfer=auto keeps on the target's validation split
TRAINED_ROWS = ("scratch", "fine-tuned", "towers + new user encoder", AUTO_ROW)
TRAINED_PAIRS = (("scratch", "popularity"), ("fine-tuned", "scratch"), ("towers + new user encoder", "scratch"),
                 (AUTO_ROW, "scratch"), (AUTO_ROW, "popularity"), ("zero-shot + prior", "scratch"))
METRICS = ("hr@10", "ndcg@10")


def rows_and_pairs(results: list[dict]) -> tuple[tuple, tuple]:
    """The rows (and pairs) every result of a target has: the trained ones only where each source has them."""
    if all("scratch" in r["rows"] for r in results):
        return ROWS + TRAINED_ROWS, PAIRS + TRAINED_PAIRS
    return ROWS, PAIRS


def interval(a: list[int], b: list[int], metric: str, n: int = 1000) -> dict:
    ga, gb = (ev.per_user_gain(np.asarray(r), metric) for r in (a, b))
    return ev.paired_bootstrap(ga, gb, n=n)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def target_section(target: str, results: list[dict]) -> tuple[list[str], dict]:
    lines = [f"## Target `{target}`", ""]
    first = results[0]
    users = len(first["users"])
    lines += ["Source catalogues (a mixture; the target's users never, its films dropped from MovieLens sources):", "",
              "| catalogue | items | users | interactions | dropped items / interactions / users |",
              "|---|---|---|---|---|"]
    for c in first["source_catalogues"]:
        d = c["dropped"]
        lines.append(f"| {c['name']} | {c['items'][1] - c['items'][0]} | {c['users'][1] - c['users'][0]} | "
                     f"{c['num_interactions']} | {d['items']} / {d['interactions']} / {d['users']} |")
    lines += ["", f"Target: {users} test users.", "",
              "| source user state | seed | row | valid NDCG@10 | test HR@10 | test NDCG@10 |",
              "|---|---|---|---|---|---|"]
    summary: dict = {"target": target, "test_users": users, "sources": []}
    for r in results:
        for row in rows_and_pairs([r])[0]:
            x = r["rows"][row]
            chose = f" (chose: {x['chose']})" if "chose" in x else ""
            if "window_days" in x:
                chose = f" (window {x['window_days']} days, g {x['g']})"
            lines.append(f"| {r['user_state']} | {r['seed']} | {row}{chose} | {x['valid']['ndcg@10']:.4f} | "
                         f"{x['test']['hr@10']:.4f} | {x['test']['ndcg@10']:.4f} |")
    lines += ["", "Paired differences on test (a − b, 95% paired bootstrap over the target's test users, 1000 "
              "resamples):", "", "| source user state | seed | a − b | HR@10 | NDCG@10 |", "|---|---|---|---|---|"]
    for r in results:
        entry = {"user_state": r["user_state"], "seed": r["seed"], "source_run": r["source_run"],
                 "test": {row: r["rows"][row]["test"] for row in rows_and_pairs([r])[0]},
                 "source_valid": r["source_valid"], "source_valid_popularity": r["source_valid_popularity"],
                 "intervals": {}}
        for a, b in rows_and_pairs([r])[1]:
            ivs = {m: interval(r["rows"][a]["test_ranks"], r["rows"][b]["test_ranks"], m) for m in METRICS}
            entry["intervals"][f"{a} - {b}"] = ivs
            lines.append(f"| {r['user_state']} | {r['seed']} | {a} − {b} | {fmt(ivs['hr@10'])} | "
                         f"{fmt(ivs['ndcg@10'])} |")
        summary["sources"].append(entry)
    by_state = {(r["user_state"], r["seed"]): r for r in results}
    states = sorted({r["user_state"] for r in results})
    if len(states) == 2:
        lines += ["", "The two user states against each other (same seed, same rows):", "",
                  f"| row | seed | {states[1]} − {states[0]}, HR@10 | NDCG@10 |", "|---|---|---|---|"]
        for seed in sorted({r["seed"] for r in results}):
            if (states[0], seed) in by_state and (states[1], seed) in by_state:
                for row in ("zero-shot", "zero-shot + prior", "content baseline"):
                    a, b = by_state[(states[1], seed)]["rows"][row], by_state[(states[0], seed)]["rows"][row]
                    ivs = {m: interval(a["test_ranks"], b["test_ranks"], m) for m in METRICS}
                    lines.append(f"| {row} | {seed} | {fmt(ivs['hr@10'])} | {fmt(ivs['ndcg@10'])} |")
    lines += seed_pooled(results, summary)
    lines += ["", "Source validation (NDCG@10 per source catalogue, the selected epoch; popularity in brackets):", ""]
    for r in results:
        per = ", ".join(f"{k} {v['ndcg@10']:.4f} ({r['source_valid_popularity'][k]['ndcg@10']:.4f})"
                        for k, v in r["source_valid"].items())
        lines.append(f"- {r['user_state']}, seed {r['seed']} (`{r['source_run']}`): {per}")
    lines.append("")
    return lines, summary


def seed_pooled(results: list[dict], summary: dict) -> list[str]:
    """Per user state with several seeds: each row's mean test figures over the seeds, and the paired intervals of the
    per-user gains averaged over the seeds (the users are the same in every seed)."""
    lines = []
    for state in sorted({r["user_state"] for r in results}):
        runs = [r for r in results if r["user_state"] == state]
        rows, pairs = rows_and_pairs(runs)  # the trained rows only where every seed has them
        if len(runs) < 2:
            continue
        seeds = sorted(r["seed"] for r in runs)
        gain = {(row, m): np.mean([ev.per_user_gain(np.asarray(r["rows"][row]["test_ranks"]), m) for r in runs], 0)
                for row in rows for m in METRICS}
        lines += ["", f"`{state}` over seeds {seeds} (test, mean over seeds; differences of the per-user gains "
                  "averaged over the seeds, 95% paired bootstrap):", "", "| row | HR@10 | NDCG@10 |", "|---|---|---|"]
        lines += [f"| {row} | {gain[(row, 'hr@10')].mean():.4f} | {gain[(row, 'ndcg@10')].mean():.4f} |"
                  for row in rows]
        lines += ["", "| a − b | HR@10 | NDCG@10 |", "|---|---|---|"]
        pooled = {}
        for a, b in pairs:
            ivs = {m: ev.paired_bootstrap(gain[(a, m)], gain[(b, m)]) for m in METRICS}
            pooled[f"{a} - {b}"] = ivs
            lines.append(f"| {a} − {b} | {fmt(ivs['hr@10'])} | {fmt(ivs['ndcg@10'])} |")
        summary.setdefault("over_seeds", {})[state] = {"seeds": seeds, "intervals": pooled,
                                                      "test_ndcg@10": {row: float(gain[(row, "ndcg@10")].mean())
                                                                       for row in rows}}
    return lines


VERDICT_PAIRS = (("zero-shot + prior", "popularity"), ("zero-shot + prior", "content baseline + prior"),
                 ("zero-shot + recent prior", "popularity"),
                 ("zero-shot + recent prior", "content baseline + recent prior"))


def verdict_table(summaries: list[dict], state: str = "encoder") -> list[str]:
    """The question of the study, one line per target: does the source's user encoder (with the target's static or
    recent popularity prior) beat popularity and the training-free content baseline? Test NDCG@10, seeds pooled
    where there are several."""
    lines = ["## Verdicts", "",
             f"Source user state `{state}`; test NDCG@10, a − b with its 95% paired interval (several seeds: the "
             "per-user gains averaged over the seeds first).", "",
             "| target | seeds | " + " | ".join(f"{a} − {b}" for a, b in VERDICT_PAIRS) + " |",
             "|---|---|" + "---|" * len(VERDICT_PAIRS)]
    for sm in summaries:
        own = [e for e in sm["sources"] if e["user_state"] == state]
        if not own:
            continue
        pooled = sm.get("over_seeds", {}).get(state)
        ivs = pooled["intervals"] if pooled else own[0]["intervals"]
        seeds = pooled["seeds"] if pooled else [own[0]["seed"]]
        cells = [fmt(ivs[f"{a} - {b}"]["ndcg@10"]) for a, b in VERDICT_PAIRS]
        lines.append(f"| {sm['target']} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(results: list[dict], out: Path, argv: list[str] | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m transrec.trainer.experiments.leave_one_out " + " ".join(argv or [])
    lines = ["# Leave-one-catalogue-out: a source pre-trained on the other catalogues, zero-shot on the target", "",
             f"- command: `{command.strip()}`",
             f"- commit: {git_commit()}; date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; hardware: "
             f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU; torch {torch.__version__}",
             "- each source: stage 1 of `cpu-small` over a mixture of catalogues (data_shards/mixture.py), every "
             "sequence scored against its own catalogue's items, catalogues mixed in proportion to their training "
             "windows, the epoch chosen by the mean validation NDCG@10 over the source catalogues; the rows up to "
             "`content baseline + recent prior` are training-free on the target (trainer/experiments/"
             "leave_one_out.py); scratch, fine-tuned, towers + new user encoder and the auto choice (transfer=auto) "
             "train on the target (`cpu-small`, both stages; trainer/experiments/leave_one_out_trained.py)",
             "- the prior: beta x log(1 + target count), beta chosen on the target's validation split, never on test",
             ""]
    main = [r for r in results if r.get("source_set", "all") == "all"]
    summaries, sections = [], []
    for target in dict.fromkeys(r["target"] for r in main):
        section, summary = target_section(target, [r for r in main if r["target"] == target])
        sections += section
        summaries.append(summary)
    lines += verdict_table(summaries) + study_cost(results) + sections
    curves = source_size_curves(results, out)
    lines += curves["lines"]
    path = out / "leave_one_out.md"
    path.write_text("\n".join(lines))
    (out / "leave_one_out.json").write_text(json.dumps({"command": command, "targets": summaries,
                                                        "source_size": curves["data"]}, indent=1))
    print(f"report written to {path}")
    return path
