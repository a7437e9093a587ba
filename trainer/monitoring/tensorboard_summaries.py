"""The run-level TensorBoard summaries: the Custom Scalars tab's charts and the HParams tab's row of a run.

- `write_layout(writer)`: charts that draw related tags on one set of axes (each stage's validation NDCG@10 with
  popularity's line, the phases of the step time, the parts' gradient norms, the collapse diagnostics), which the
  Scalars tab, one chart per tag, cannot.
- `run_summary(writer, settings, figures, step)`: the run's resolved settings and its final figures in the run's own
  event file, so that `tensorboard --logdir runs` lists every run as a row of the HParams tab, sortable by its figures.
  (torch's SummaryWriter.add_hparams writes into a new sub-run instead; this keeps the row beside the run's curves.)
"""

from __future__ import annotations

import json
from pathlib import Path

from transrec.trainer.monitoring.step_timing import PHASES

LAYOUT = {
    "validation": {
        "NDCG@10: each stage and popularity": ["Multiline", [r"eval/[^/]+/ndcg@10$"]],
        "HR@10: each stage and popularity": ["Multiline", [r"eval/[^/]+/hr@10$"]],
    },
    "where the time goes (s per optimizer step)": {
        "step time and its phases": ["Multiline", ["time/step_s", *(f"time/{p}_s" for p in PHASES)]],
    },
    "model health": {
        "gradient norm per part": ["Multiline", [r"grad_norm/.*"]],
        "learning rate per parameter group": ["Multiline", [r"lr/.*"]],
        "user vectors: mean pairwise cosine (collapse: near 1)": ["Multiline", [r"health/.*/mean_pairwise_cosine"]],
        "user vectors: share with the most common top-10": ["Multiline", [r"health/.*/same_top10_share"]],
    },
}


def write_layout(writer) -> None:
    writer.add_custom_scalars(LAYOUT)


def hparam_value(value):
    """A setting as the HParams plugin takes it: bool, int, float and str as they are, None as "none", anything else
    (tuples, maps) as its JSON text."""
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """{"stage1": {"lr": 1e-3}} -> {"stage1.lr": 1e-3}: one HParams column per setting."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flat_settings(value, f"{name}."))
        else:
            out[name] = hparam_value(value)
    return out


def run_figures(metrics: dict, select: str) -> dict[str, float]:
    """The selected model's figures for the HParams tab (metrics.json: validation, test, popularity's test)."""
    names = dict.fromkeys([select, "ndcg@10", "hr@10"])
    figures = {f"hparams/{split}_{k}": float(metrics[split][k]) for split in ("valid", "test") for k in names
               if k in metrics.get(split, {})}
    if "ndcg@10" in metrics.get("popularity_test", {}):
        figures["hparams/popularity_test_ndcg@10"] = float(metrics["popularity_test"]["ndcg@10"])
    figures["hparams/best_stage"] = float(metrics["best"]["stage"])
    return figures


def run_summary(writer, settings: dict, figures: dict[str, float], step: int = 0) -> None:
    """`settings`: the run's resolved configuration (config.to_dict), flattened to one column each; `figures`: tag ->
    value (e.g. "hparams/valid_ndcg@10"), written as scalars at `step` as well, where the HParams tab reads them."""
    from torch.utils.tensorboard.summary import hparams  # optional: imports tensorboard, lazily (rank 0 only)

    experiment, start, end = hparams(flat_settings(settings), figures)
    for summary in (experiment, start, end):
        writer.file_writer.add_summary(summary, step)
    for tag, value in figures.items():
        writer.add_scalar(tag, value, step)
    writer.flush()


def write_row(board: Path, settings: dict, figures: dict[str, float]) -> None:
    """A run that trained nothing (a training-free transfer candidate) as a row of the HParams tab: an event file of
    its own in `board` holding run_summary's row at step 0."""
    from torch.utils.tensorboard import SummaryWriter  # optional: imports tensorboard, lazily

    with SummaryWriter(str(board)) as writer:
        run_summary(writer, settings, figures)
