"""The report of `bench/throughput.py`: its training rows' measurements (`TrainResult`), rows of training and
evaluation figures, CSV appends, the Markdown table with derived figures (MFU against the run's measured peak,
x reference) and the targets' summary. Imports nothing of bench/throughput.py (which imports this)."""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from pathlib import Path

TRAIN_COLS = ["sequences_per_s", "unique_items_per_s", "slot_items_per_s", "text_tokens_per_s", "images_per_s",
              "ms_per_step", "peak_mem_gib", "model_tflop_per_step", "achieved_tflops", "mfu", "speedup_vs_reference"]
CSV_FIELDS = ["device", "git_hash", "torch", "preset", "kind", "stage", "config", *TRAIN_COLS, "catalogue", "users",
              "users_per_s", "extra_mem_mib", "note"]
SECTIONS = ["input", "text tower", "image tower", "user encoder", "loss", "forward other", "backward", "optimizer"]


@dataclasses.dataclass
class TrainResult:
    stage: int
    config: str
    dtype: str
    steps: int = 0
    seconds: float = 0.0
    sequences: float = 0.0
    unique: int = 0
    slots: int = 0
    text_tokens: int = 0
    images: int = 0
    flops: float = 0.0
    peak_gib: float = math.nan
    loss: float = math.nan
    sections: dict = dataclasses.field(default_factory=dict)
    step_s: list = dataclasses.field(default_factory=list)  # wall time of each timed step (GPU synchronised)
    op_counts: dict = dataclasses.field(default_factory=dict)  # bench/op_counts.step_counts of one more step

    def figures(self) -> dict:  # rates from the MEDIAN step: one step slowed by a shared machine does not count
        n = max(self.steps, 1)
        s = statistics.median(self.step_s) * n if self.step_s else math.nan
        tflops = self.flops / s / 1e12
        return {"sequences_per_s": self.sequences / s, "unique_items_per_s": self.unique / s,
                "slot_items_per_s": self.slots / s, "text_tokens_per_s": self.text_tokens / s,
                "images_per_s": self.images / s, "ms_per_step": 1e3 * s / n, "peak_mem_gib": self.peak_gib,
                "ms_per_step_mean": 1e3 * self.seconds / n,
                "model_tflop_per_step": self.flops / n / 1e12, "achieved_tflops": tflops, "loss": self.loss}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_fmt(x) for x in r) + " |" for r in rows]


class Report:
    """Rows of the run. Derived figures (MFU against the final peak, x reference) are filled in by `flush`,
    which appends the rows not yet written to the CSV; it runs after each stage and on exit (also SIGTERM)."""

    def __init__(self, meta: dict, csv_path: Path):
        self.meta, self.csv_path, self.written = meta, csv_path, set()
        self.train: list[dict] = []
        self.eval: list[dict] = []

    def _base(self, kind: str) -> dict:
        return {**{k: self.meta[k] for k in ("device", "git_hash", "torch", "preset")}, "kind": kind, "note": ""}

    def train_row(self, res: TrainResult, reference: str | None = None) -> None:
        """`reference`: the config of the same-stage row this one is compared with (x reference)."""
        f = res.figures()
        sections = {k: 1e3 * v / max(res.steps, 1) for k, v in res.sections.items()}
        sections["forward other"] = sections.get("forward", 0) - sum(sections.get(k, 0) for k in SECTIONS[1:5])
        self.train.append({**self._base("train"), "stage": res.stage, "config": res.config, "dtype": res.dtype,
                           "steps": res.steps, **f, "reference": reference, "sections_ms_per_step": sections,
                           **res.op_counts})
        print(f"  stage {res.stage} {res.config:<44} {f['sequences_per_s']:9.2f} seq/s {f['ms_per_step']:10.1f} ms/step"
              f"  {f['achieved_tflops']:.4g} TFLOP/s  loss {res.loss:.4f}", flush=True)

    def skipped(self, stage: int, config: str, why: str) -> None:
        self.train.append({**self._base("train"), "stage": stage, "config": config, "note": f"not measured: {why}"})

    def eval_row(self, V: int, impl: str, users: int, ups: float, extra_mib: float, note: str = "",
                 rank_diff: int | None = None) -> None:
        self.eval.append({**self._base("eval"), "config": impl, "catalogue": V, "users": users, "users_per_s": ups,
                          "extra_mem_mib": extra_mib, "max_rank_difference": rank_diff, "note": note})
        print(f"  eval V={V:>8} {impl:<10} {users:5d} users {ups:10.1f} users/s  +{extra_mib:8.1f} MiB {note}",
              flush=True)

    def flush(self, csv_rows: bool = True) -> None:
        for r in self.train:
            if "steps" in r:
                r["mfu"] = r["achieved_tflops"] / self.meta["peak_tflops"].get(r["dtype"], math.nan)
            ref = next((x for x in self.train if x["stage"] == r["stage"] and x["config"] == r.get("reference")
                        and "steps" in x), None)
            if ref is not None:
                r["speedup_vs_reference"] = r["sequences_per_s"] / ref["sequences_per_s"]
        for r in self.eval:
            if r["config"] == "reference":  # against the project's run with the most users at this size
                proj = [x for x in self.eval if x["config"] == "project" and x["catalogue"] == r["catalogue"]]
                r["speedup_vs_reference"] = max(proj, key=lambda x: x["users"])["users_per_s"] / r["users_per_s"]
        rows = (self.train + self.eval) if csv_rows else []
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with self.csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in [x for x in rows if id(x) not in self.written]:
                w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})
                self.written.add(id(r))

    def summary(self) -> dict:
        proj = next((r for r in self.train if r["stage"] == 2 and r["config"] == "project"), {})
        ref = next((r for r in self.train if r["stage"] == 2 and r["config"] == "reference"), {})
        ev_p = [r for r in self.eval if r["config"] == "project"]
        ev_r = [r for r in self.eval if r["config"] == "reference"]
        V = max((r["catalogue"] for r in ev_r), default=None)  # headline: the largest catalogue measured
        p_top = max((r for r in ev_p if r["catalogue"] == V), key=lambda r: r["users"], default={})
        r_top = next((r for r in ev_r if r["catalogue"] == V), {})
        out = {"device": self.meta["device"], "git_hash": self.meta["git_hash"],
               "sequences_per_s": proj.get("sequences_per_s"), "reference_sequences_per_s": ref.get("sequences_per_s"),
               "train_speedup_vs_reference": proj.get("speedup_vs_reference"), "mfu": proj.get("mfu"),
               "achieved_tflops": proj.get("achieved_tflops"), "model_tflop_per_step": proj.get("model_tflop_per_step"),
               "eval_catalogue": V, "eval_users_per_s": p_top.get("users_per_s"),
               "reference_eval_users_per_s": r_top.get("users_per_s"),
               "eval_speedup_vs_reference": r_top.get("speedup_vs_reference"), "targets": []}
        cuda = not self.meta["device"].startswith("cpu")

        def target(name, goal, value, applies, why="") -> None:
            ok = applies and isinstance(value, float) and not math.isnan(value)
            status = ("met" if value >= goal else "NOT met") if ok else "not measured here: " + why
            out["targets"].append({"target": name, "goal": goal, "measured": value if ok else None, "status": status})

        target("paper stage-2 MFU on H100 bf16", 0.5, out["mfu"],
               cuda and self.meta["preset"] == "paper", "needs --preset paper on an H100 (bench/gpu_throughput.sh)")
        target("train seq/s vs reference (cpu-small on CPU)", 3.0,
               out["train_speedup_vs_reference"], not cuda and self.meta["preset"] == "cpu-small",
               "the goal is for cpu-small on CPU")
        for r in ev_r:
            target(f"eval users/s vs reference, {r['catalogue']} items", 50.0,
                   r.get("speedup_vs_reference"), True)
        for V in sorted({r["catalogue"] for r in ev_p}):  # fewest vs most users at this catalogue size
            mems = sorted((x["users"], x["extra_mem_mib"]) for x in ev_p if x["catalogue"] == V)
            (u0, m0), (u1, m1) = mems[0], mems[-1]
            out["targets"].append({"target": f"eval memory flat in users, {V} items", "goal": "flat",
                                   "measured": f"{u0} users +{m0:.0f} MiB, {u1} users +{m1:.0f} MiB",
                                   "status": "met" if m1 <= 1.25 * m0 + 32 else "NOT met"})
        return out

    def markdown(self) -> str:
        m = self.meta
        out = [f"## Throughput: preset `{m['preset']}` on {m['device']}", "",
               f"git {m['git_hash']}, torch {m['torch']}, ds_config {m['ds_config']}, feature cache "
               f"{'on' if m['feature_cache'] else 'OFF (end to end)'}, load average at start/end "
               f"{m['load_start']} / {m.get('load_end', '')}; matmul peak measured in this run: "
               + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in m["peak_tflops"].items()), ""]
        out += _table(["stage", "config", "seq/s", "unique items/s", "slot items/s", "tokens/s", "images/s",
                       "ms/step", "peak GiB", "model TFLOP/step", "TFLOP/s", "MFU", "x reference", "note"],
                      [[r["stage"], r["config"], *[r.get(k) for k in TRAIN_COLS], r["note"]] for r in self.train])
        out += ["", "Breakdown, ms per step (" + ("CUDA events, input host time" if m["device"][:3] != "cpu"
                else "perf_counter") + "; forward other = routing, gathers, masks):", ""]
        out += _table(["stage", "config", *SECTIONS, "step"],
                      [[r["stage"], r["config"], *[r["sections_ms_per_step"].get(k, 0.0) for k in SECTIONS],
                        r["ms_per_step"]] for r in self.train if "steps" in r])
        counted = [r for r in self.train if r.get("ops_per_step") is not None]
        if counted:
            out += ["", "Operator calls of one training step (bench/op_counts.py; the same on any machine): every aten "
                    "call, the calls issued from Python, and host read-backs (each stalls a GPU's launch queue):", ""]
            out += _table(["stage", "config", "ops/step", "top-level ops/step", "host syncs/step", "which"],
                          [[r["stage"], r["config"], r["ops_per_step"], r["top_level_ops_per_step"],
                            r["host_syncs_per_step"], ", ".join(f"{k.removeprefix('aten::')} {v}"
                                                                 for k, v in r["host_syncs"].items())]
                           for r in counted])
        out += [""] + _table(["catalogue", "path", "users", "users/s", "extra memory MiB", "x reference", "note"],
                             [[r.get(k) for k in ("catalogue", "config", "users", "users_per_s", "extra_mem_mib",
                                                  "speedup_vs_reference", "note")] for r in self.eval])
        out += [""] + _table(["target", "goal", "measured", "status"],
                             [list(r.values()) for r in self.summary()["targets"]])
        return "\n".join(out + [""] + [f"- {n}" for n in NOTES])



NOTES = [
    "Reference: the original code's structure on the SAME module, weights, batches and feature cache of frozen lower "
    "blocks (equal model computation): one tower call per (sequence, position) and per negative (no dedup), fp32, "
    "PyTorch-reference losses, plain AdamW + clipping, no DeepSpeed. --no-cache runs both end to end. "
    "tests/test_throughput_equal_work.py checks one batch gives the same fp32 loss (1e-4) and gradients on both "
    "paths (cached and end to end) and with dedup=False, and equal rankings; eval rows re-check the rankings.",
    "MFU: analytic matmul/conv FLOPs of the executed work (unique items unless dedup=False; backward only where "
    "gradients flow; no recomputation) / time / this run's matmul peak in the step's dtype. x reference: seq/s.",
    "Eval: random item vectors, user vector = mean of the history's item vectors (both paths), exclude_seen; rank "
    "differences come from GEMM vs GEMV rounding of near-tied scores (1 in ~30 users at 1M items, by 1). Extra "
    "memory = peak minus memory before the call (CPU: process RSS sampled every 5 ms; allocator reuse hides some).",
]
