"""Training over a mixture of catalogues (data_shards/mixture.py): the mixing rule and validation per catalogue.

A mixture's batches each hold one catalogue's windows, scored against that catalogue's items only
(trainer/core/losses.py), and each validation user is ranked among its own catalogue's items
(trainer/evaluation/ranking.py). Two rules are declared here:

- Mixing (`data.mixing_alpha`, recorded in run_config.json): catalogue c's share of the training signal is
  n_c^alpha / sum_k n_k^alpha, n_c its training windows. The loader interleaves catalogues in proportion to their
  windows (alpha = 1: every window weighs the same); another alpha multiplies each batch's loss by
  w_c = (n_c^alpha / sum n^alpha) / (n_c / sum n), which equals, in expectation, sampling catalogue c's batches with
  that share (alpha = 0: every catalogue the same).
- Selection (`eval.across_catalogues`): the validation figure that picks epochs and stages is the mean over catalogues
  of each catalogue's metric ("macro": every catalogue counts the same) or the metric over all validation users
  ("pooled": every user counts the same, so the largest catalogue dominates).
"""

from __future__ import annotations

import numpy as np

from transrec.trainer.evaluation import ranking as ev


def mixing_weights(windows: list[int], alpha: float) -> tuple[float, ...] | None:
    """Each catalogue's loss multiplier for `alpha` (module docstring); None when every batch weighs 1 (alpha = 1)."""
    if alpha == 1.0:
        return None
    n = np.asarray(windows, dtype=np.float64)
    if (n <= 0).any():
        raise ValueError(f"a catalogue of this mixture has no training windows ({windows}): drop it from the mixture")
    wanted = n**alpha / (n**alpha).sum()
    natural = n / n.sum()
    return tuple(float(w) for w in wanted / natural)


def metrics_by_catalogue(ranks: np.ndarray, targets: np.ndarray, bounds: np.ndarray, names: list[str],
                         ks) -> dict[str, dict]:
    """{catalogue name: metrics_from_ranks of its users} (users by their target's catalogue)."""
    cat = ev.catalogue_of(np.asarray(targets), bounds)
    return {name: ev.metrics_from_ranks(ranks[cat == c], ks) for c, name in enumerate(names)}


def across_catalogues(by_catalogue: dict[str, dict], pooled: dict, how: str) -> dict:
    """The validation figures selection reads: `pooled` as it is, or ("macro") each metric's mean over catalogues
    that have validation users ("users" stays the total)."""
    if how == "pooled":
        return pooled
    present = [m for m in by_catalogue.values() if m["users"]]
    out = {k: float(np.mean([m[k] for m in present])) for k in pooled if k != "users"}
    out["users"] = pooled["users"]
    return out


def catalogue_results(cfg, record: dict, catalogues: list[dict], figures: dict[str, dict]) -> dict:
    """What catalogues.json holds: the selection rule and the selected model's validation record (`record`), the
    mixing rule, the manifest's catalogues and the per-catalogue `figures` (test, popularity's)."""
    return {"selection": {"metric": cfg.eval.select, "across_catalogues": cfg.eval.across_catalogues,
                          "stage": int(record["stage"]), "epoch": record["epoch"]},
            "mixing_alpha": cfg.data.mixing_alpha, "catalogues": catalogues,
            "valid": record.get("valid_by_catalogue"), **figures}
