"""curves.png: a finished run at a glance, drawn from its own records, for a user without TensorBoard.

Left: the training loss of each stage against its optimizer steps (loss_stage{N}.csv). Right: validation NDCG@10
after each epoch of each stage (valid_curve.csv), popularity's validation NDCG@10 as a dashed line, and the selected
model (metrics.json "best") ringed. A run's results.md links the picture.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

CURVES_FILE = "curves.png"
METRIC = "ndcg@10"


@dataclass
class RunCurves:
    loss: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # stage -> (steps, losses)
    valid: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # stage -> (epochs, NDCG@10)
    popularity: float | None = None  # popularity's validation NDCG@10
    selected: tuple[int, int] | None = None  # (stage, epoch) of the selected model


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_curves(run_dir: Path) -> RunCurves:
    """What curves.png shows, read from the run's records (whichever of them the run wrote)."""
    run_dir, curves = Path(run_dir), RunCurves()
    for path in sorted(run_dir.glob("loss_stage*.csv")):
        rows = _rows(path)
        if rows:
            stage = int(path.stem.removeprefix("loss_stage"))
            curves.loss[stage] = ([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    for r in _rows(run_dir / "valid_curve.csv"):
        epochs, values = curves.valid.setdefault(int(r["stage"]), ([], []))
        epochs.append(int(r["epoch"]))
        values.append(float(r[METRIC]))
    if (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        curves.popularity = metrics.get("popularity_valid", {}).get(METRIC)
        best = metrics.get("best")
        curves.selected = (int(best["stage"]), int(best["epoch"])) if best else None
    return curves


def write_curves(run_dir: Path) -> Path:
    """Draw RUN_DIR/curves.png from the run's records; returns its path."""
    import matplotlib  # optional: only when a picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(run_dir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage, (steps, losses) in sorted(curves.loss.items()):
        left.plot(steps, losses, marker=".", label=f"stage {stage}")
    left.set(title="training loss", xlabel="optimizer step of the stage", ylabel="loss")
    for stage, (epochs, values) in sorted(curves.valid.items()):
        right.plot(epochs, values, marker="o", label=f"stage {stage}")
        if curves.selected and curves.selected[0] == stage and curves.selected[1] in epochs:
            at = epochs.index(curves.selected[1])
            right.scatter([epochs[at]], [values[at]], s=160, facecolors="none", edgecolors="black", zorder=3,
                          label=f"selected (stage {stage}, epoch {epochs[at]})")
    if curves.popularity is not None:
        right.axhline(curves.popularity, color="gray", linestyle="--", label="popularity")
    right.set(title=f"validation {METRIC.upper()}", xlabel="epoch", ylabel=METRIC.upper())
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(Path(run_dir).name, fontsize=9)
    fig.tight_layout()
    out = Path(run_dir) / CURVES_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
