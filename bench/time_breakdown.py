"""Where a run's training time went, from its TensorBoard event file: the phases of the step time per stage.

    python bench/time_breakdown.py RUN_DIR [--md FILE]

For each stage, over its logging windows: seconds per optimizer step of each phase (trainer/monitoring/step_timing.py:
loader wait, to device, forward, backward, optimizer, checkpoint), the measured step time (wall time of the windows
over their steps), and the accounted share (the phases' sum over the step time). Each window is weighted by its
steps, so the table's figures are totals over the stage divided by its steps. A share near 1 means the phases
explain the step; the rest is the loop's own bookkeeping.
"""

from __future__ import annotations

import argparse
from pathlib import Path

try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__)

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from transrec.trainer.monitoring.step_timing import PHASES


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the run's event files (a resume's purged events dropped)."""
    board = run_dir / "tensorboard"
    if not any(board.glob("events.out.tfevents.*")):
        raise SystemExit(f"error: no TensorBoard event file in {board}: give a run directory of the trainer")
    acc = EventAccumulator(str(board), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def stage_breakdown(scalars: dict[str, dict[int, float]], stage: int) -> dict[str, float] | None:
    """Seconds per optimizer step of each phase and of the step over the stage's logging windows, and the share
    the phases account for; None when the stage logged no step time."""
    loss_steps = sorted(scalars.get(f"train/stage{stage}_loss", {}))
    windows = [s for s in loss_steps if s in scalars.get("time/step_s", {})]
    if not windows:
        return None
    # a window's length in optimizer steps: the distance to the previous logging step (the first: its own step
    # count since the stage began is unknown here, so it weighs as the next window does)
    lengths = [b - a for a, b in zip(windows, windows[1:], strict=False)]
    lengths = [lengths[0] if lengths else 1, *lengths]
    total = sum(lengths)

    def mean(tag: str) -> float:
        return sum(scalars[tag][s] * n for s, n in zip(windows, lengths, strict=True)) / total

    out = {p: mean(f"time/{p}_s") for p in PHASES}
    out["step"] = mean("time/step_s")
    out["accounted_share"] = sum(out[p] for p in PHASES) / out["step"]
    out["windows"] = len(windows)
    out["worst_window_share"] = min(scalars["time/accounted_share"][s] for s in windows)
    return out


def table(run_dir: Path) -> str:
    scalars = read_scalars(run_dir)
    rows = [f"Time per optimizer step (s), from `{run_dir.name}/tensorboard` (bench/time_breakdown.py)", "",
            "| stage | " + " | ".join(p.replace("_", " ") for p in PHASES) + " | phases sum | step time | "
            "accounted | worst window | windows |", "|---" * (len(PHASES) + 6) + "|"]
    for stage in (1, 2):
        b = stage_breakdown(scalars, stage)
        if b is None:
            continue
        parts = sum(b[p] for p in PHASES)
        rows.append(f"| {stage} | " + " | ".join(f"{b[p]:.3f}" for p in PHASES) + f" | {parts:.3f} | "
                    f"{b['step']:.3f} | {b['accounted_share']:.1%} | {b['worst_window_share']:.1%} | "
                    f"{b['windows']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--md", default=None, help="also write the table here")
    a = p.parse_args(argv)
    text = table(a.run_dir)
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
