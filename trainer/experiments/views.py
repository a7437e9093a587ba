"""Table 2's text and image rows: a finished run's best model evaluated on other shards of the same users, items and
splits (every item routed to text, or to image), evaluation only.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from transrec.data_shards.shard_io import read_id_maps, read_sequences
from transrec.trainer.core.checkpoint import load_model_state
from transrec.trainer.core.choices import record_scoring
from transrec.trainer.core.config_records import from_dict
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.training.loop import Trainer

DS_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json"  # the experiments' engine config


def check_same_split(a: Path, b: Path) -> None:
    """Two shard folders hold the same users, items (same indices) and splits; only item modality may differ."""
    ia, ib = (read_id_maps(p) for p in (a, b))  # each folder verified against its manifest's hashes first
    sa, sb = read_sequences(a), read_sequences(b)
    same = ia == ib and len(sa) == len(sb) and all(
        x["items"] == y["items"] and x["num_train"] == y["num_train"] and x["evaluated"] == y["evaluated"]
        for x, y in zip(sa, sb))
    if not same:
        raise ValueError(f"shards {a} and {b} differ in users, items or splits: a view must change modality only")


def evaluate_view(run_dir: Path, shards: Path, out: Path) -> dict:
    """Evaluate a finished run's best model (best_stage{N}.safetensors) on the test split of other shards of the
    same users, items and splits (e.g. every item routed to text). Writes out/metrics.json and test_ranks.tsv."""
    record = json.loads((run_dir / "run_config.json").read_text())
    cfg = from_dict(record["config"])
    check_same_split(Path(cfg.data.shards), shards)
    chosen = json.loads((run_dir / "metrics.json").read_text())["best"]
    best = int(chosen["stage"])
    cfg.data.shards, cfg.run_dir, cfg.init_from, cfg.resume = str(shards), str(out), None, None
    trainer = Trainer(cfg, str(DS_CONFIG))
    load_model_state(trainer.model, run_dir / f"best_stage{best}.safetensors")
    trainer.set_stage(max(best, 1))  # the feature cache of this routing, from the loaded weights
    ranks = trainer.evaluate("test", record_scoring(chosen))
    trainer.write_ranks("test_ranks", trainer.test_users, ranks)
    metrics = {"test": ev.metrics_from_ranks(ranks, cfg.eval.ks), "best": {"stage": best},
               "run": str(run_dir), "shards": str(shards)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    trainer.log.close()
    del trainer
    gc.collect()
    return metrics
