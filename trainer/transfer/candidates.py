"""The candidates of `transfer=auto` (trainer/training/transfer_auto.py): what each one is, the configuration it runs
with, and how two candidates' per-user ranks are judged against each other (read by the selection,
trainer/transfer/selection.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transrec.trainer.core.config import Change, RunConfig, TransferConfig, changed
from transrec.trainer.evaluation.ranking import paired_bootstrap, per_user_gain


@dataclass(frozen=True)
class Candidate:
    name: str
    label: str
    trains: bool
    free: bool = False  # scored without training by training_free.py (from the export itself)
    change: Change | None = None  # what it sets in a copy of the run's configuration (None: nothing)


def evaluate_only(c: RunConfig) -> None:
    c.stages = "none"


def at_rates(stage1_lr: float, stage2_lr: float) -> Change:
    def change(c: RunConfig) -> None:
        c.stage1.lr, c.stage2.lr = stage1_lr, stage2_lr

    return change


def towers_only(c: RunConfig) -> None:
    c.init_parts = "towers"


def from_scratch(c: RunConfig) -> None:
    c.init_from, c.init_parts, c.init_reset = None, "all", ""


def candidate_plan(cfg: RunConfig) -> list[Candidate]:
    low1 = cfg.transfer.low_lr or cfg.stage1.lr / 10
    low2 = cfg.transfer.low_lr or cfg.stage2.lr / 10
    known = {
        "start": Candidate("start", "the export as it is (zero-shot)", False, change=evaluate_only),
        "prior": Candidate("prior", "the export + the target's popularity prior (beta on validation)", False, True),
        "content": Candidate("content", "the export's towers, no user encoder: mean of the history's item vectors "
                             "(cosine; + prior if it validates better)", False, True),
        "popularity": Candidate("popularity", "the target's most frequent items (no content)", False, True),
        "finetune": Candidate("finetune", "fine-tuned", True),
        "lowlr": Candidate("lowlr", f"fine-tuned at a low rate (stage 1 {low1:g}, stage 2 {low2:g})", True,
                           change=at_rates(low1, low2)),
        "towers": Candidate("towers", "the export's towers, a new user encoder", True, change=towers_only),
        "scratch": Candidate("scratch", "trained from scratch (no export)", True, change=from_scratch),
    }
    return [known[name] for name in cfg.transfer.candidate_names()]


def candidate_config(cfg: RunConfig, cand: Candidate, run_dir: Path) -> RunConfig:
    c = copy.deepcopy(cfg)
    c.transfer, c.resume, c.run_dir = TransferConfig(), None, str(run_dir / "candidates" / cand.name)
    c.eval.initial_candidate = False  # the start is a candidate of its own
    return changed(c, *([cand.change] if cand.change else []))


def judge(a: np.ndarray, b: np.ndarray, metric: str, n_boot: int) -> dict:
    """a - b over the same users, a 95% paired bootstrap interval; helped / hurt when it excludes zero."""
    res = paired_bootstrap(per_user_gain(a, metric), per_user_gain(b, metric), n=n_boot)
    res["verdict"] = "helped" if res["low"] > 0 else "hurt" if res["high"] < 0 else "level"
    return res
