"""The selection of transfer=auto (trainer/training/transfer_auto.py) and its reports: which candidate validates best,
its files copied into the run directory (export, ranks, best model), metrics.json's "candidates" and "transfer",
results.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.run_setup import LOG
from transrec.trainer.evaluation.ranking import metrics_from_ranks
from transrec.trainer.evaluation.run_stats import read_ranks
from transrec.trainer.monitoring.tensorboard_summaries import run_figures, write_row
from transrec.trainer.transfer.candidates import Candidate, judge

# the chosen candidate's files that make RUN_DIR read as a finished run (trainer.commands.compare, trainer.evaluate)
RUN_FILES = ("test_ranks*.tsv", "test_ranks_stage*.npy", "valid_ranks_stage*.npy", "best_stage*.safetensors",
             "loss_stage*.csv", "valid_curve.csv")


def candidate_records(run_dir: Path, cfg: RunConfig, plan: list[Candidate]) -> dict[str, dict]:
    out = {}
    for cand in plan:
        d = run_dir / "candidates" / cand.name
        rec = json.loads((d / "candidate.json").read_text()) if (d / "candidate.json").exists() else {}
        if not (d / "metrics.json").exists():
            out[cand.name] = {"label": cand.label, "status": "failed",
                              "error": rec.get("error", "did not finish (no metrics.json)")}
            continue
        m = json.loads((d / "metrics.json").read_text())
        out[cand.name] = {"label": cand.label, "status": "done", "valid": m["valid"], "test": m["test"],
                          "best_stage": m["best"]["stage"], "minutes": rec.get("minutes"),
                          "folder": str(Path("candidates") / cand.name)}
    return out


def select(records: dict[str, dict], metric: str) -> str:
    """The candidate with the best validation `metric` (the first in plan order on a tie)."""
    done = [n for n, r in records.items() if r["status"] == "done"]
    if not done:
        errors = "; ".join(f"{n}: {r['error']}" for n, r in records.items())
        raise SystemExit(f"error: transfer=auto: every candidate failed ({errors}); fix the cause and continue with "
                         "--resume RUN_DIR")
    return max(done, key=lambda n: (records[n]["valid"][metric], -done.index(n)))


def _valid_ranks(run_dir: Path, name: str, stage: int) -> np.ndarray:
    return np.load(run_dir / "candidates" / name / f"valid_ranks_stage{stage}.npy")


def _test_ranks(run_dir: Path, name: str, file: str = "test_ranks.tsv") -> tuple[np.ndarray, np.ndarray]:
    users, _, ranks = read_ranks(run_dir / "candidates" / name / file)
    return users, ranks


def verdict(run_dir: Path, records: dict[str, dict], metric: str, n_boot: int) -> dict:
    """Did the export help, on validation? The best candidate that uses the export against scratch, paired over
    the validation users; not judged without a scratch candidate or a transfer candidate that finished."""
    transfer = [n for n, r in records.items() if n != "scratch" and r["status"] == "done"]
    if records.get("scratch", {}).get("status") != "done" or not transfer:
        why = ("no scratch candidate: transfer.include_scratch=true trains one and answers whether the export helped"
               if "scratch" not in records else "the scratch candidate or every transfer candidate failed")
        return {"verdict": "not judged", "line": f"transfer not judged against scratch: {why}"}
    best = max(transfer, key=lambda n: records[n]["valid"][metric])
    a = _valid_ranks(run_dir, best, records[best]["best_stage"])
    b = _valid_ranks(run_dir, "scratch", records["scratch"]["best_stage"])
    res = judge(a, b, metric, n_boot)
    said = {"helped": "helped", "hurt": "hurt", "level": "was level with scratch"}[res["verdict"]]
    line = (f"transfer {said} on validation: the best candidate from the export, {best}, against scratch, "
            f"{metric} {res['diff']:+.4f} [{res['low']:+.4f}, {res['high']:+.4f}] (95% paired bootstrap over "
            f"{len(a)} validation users)")
    return {"verdict": res["verdict"], "line": line, "candidate": best, "metric": metric, **res}


def write_selection(run_dir: Path, cfg: RunConfig, plan: list[Candidate]) -> dict:
    metric, n_boot = cfg.eval.select, cfg.eval.bootstrap
    records = candidate_records(run_dir, cfg, plan)
    chosen = select(records, metric)
    src = run_dir / "candidates" / chosen
    for pattern in RUN_FILES:
        for f in src.glob(pattern):
            shutil.copy2(f, run_dir / f.name)
    shutil.rmtree(run_dir / "export", ignore_errors=True)
    shutil.copytree(src / "export", run_dir / "export")
    users, ranks = _test_ranks(run_dir, chosen)
    _, pop = _test_ranks(run_dir, chosen, "test_ranks_popularity.tsv")  # the same run's users, in its order
    intervals = {"popularity": {m: judge(ranks, pop, m, n_boot) for m in ("hr@10", "ndcg@10")}}
    if records.get("scratch", {}).get("status") == "done" and chosen != "scratch":
        s_users, s_ranks = _test_ranks(run_dir, "scratch")
        if not np.array_equal(s_users, users):
            raise ValueError("transfer=auto: the scratch candidate ranked other test users than the chosen one")
        intervals["scratch"] = {m: judge(ranks, s_ranks, m, n_boot) for m in ("hr@10", "ndcg@10")}
    judged = verdict(run_dir, records, metric, n_boot)
    write_training_free_rows(run_dir, cfg, records, metric)
    metrics = json.loads((src / "metrics.json").read_text())
    metrics["candidates"] = records
    metrics["transfer"] = {"mode": "auto", "selected": chosen, "select": metric, "verdict": judged,
                           "test_vs": intervals, "init_from": cfg.init_from}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    table = results_table(records, chosen, metric, intervals, judged, metrics_from_ranks(pop), len(users))
    own = (src / "results.md").read_text() if (src / "results.md").exists() else ""
    (run_dir / "results.md").write_text(table + f"\n\n## The chosen candidate's run ({chosen})\n\n" + own)
    print(table, flush=True)
    LOG.info(f"[transfer] selected {chosen} ({records[chosen]['label']}) on validation; {judged['line']}; export "
             f"written to {run_dir / 'export'}")
    return metrics


def write_training_free_rows(run_dir: Path, cfg: RunConfig, records: dict[str, dict], metric: str) -> None:
    """Each finished candidate that trained nothing (no TensorBoard folder of its own: the training-free ones) gets
    an HParams row in candidates/<name>/tensorboard, so `tensorboard --logdir RUN_DIR` compares every candidate in
    the HParams tab, the trained ones by the rows their runs wrote."""
    for name, record in records.items():
        board = run_dir / "candidates" / name / "tensorboard"
        if record["status"] != "done" or board.exists():
            continue
        metrics = json.loads((board.parent / "metrics.json").read_text())
        write_row(board, {"run": name, "candidate": record["label"], "init_from": cfg.init_from, "trains": False},
                  run_figures(metrics, metric))


def _cell(iv: dict | None) -> str:
    return "" if iv is None else f"{iv['diff']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"


def results_table(records: dict[str, dict], chosen: str, metric: str, intervals: dict, judged: dict,
                  popularity: dict, users: int) -> str:
    lines = [
        f"# transfer=auto: {len(records)} candidates, chosen on validation {metric}",
        "",
        f"**Verdict: {judged['line']}.**",
        "",
        f"Test figures of every candidate ({users} users; leave-one-out, whole-catalogue ranking). Only validation "
        "chose; the test columns are reported, never used.",
        "",
        f"| candidate | how | valid {metric} | test HR@10 | test NDCG@10 | minutes |",
        "|---|---|---|---|---|---|",
    ]
    if "popularity" not in records:  # a reference row, unless popularity is a candidate of its own
        lines.append(f"| popularity | the items most frequent in training first | | {popularity['hr@10']:.4f} | "
                     f"{popularity['ndcg@10']:.4f} | |")
    for name, r in records.items():
        mark = f"**{name} (selected)**" if name == chosen else name
        if r["status"] != "done":
            lines.append(f"| {mark} | {r['label']} | FAILED: {r['error'][:160]} | | | |")
            continue
        minutes = "" if r.get("minutes") is None else f"{r['minutes']:.1f}"
        lines.append(f"| {mark} | {r['label']} | {r['valid'][metric]:.4f} | {r['test']['hr@10']:.4f} | "
                     f"{r['test']['ndcg@10']:.4f} | {minutes} |")
    lines += ["", f"Selected {chosen} against (test, 95% paired bootstrap over users):", ""]
    for other, iv in intervals.items():
        lines.append(f"- {other}: HR@10 {_cell(iv['hr@10'])}, NDCG@10 {_cell(iv['ndcg@10'])}")
    return "\n".join(lines)
