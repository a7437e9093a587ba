"""What a training run is made of, built once before its first step: the process (rank, world, device), the shards
and their items, the model (its towers' weights, an --init-from export, compilation), the evaluated users, the run
directory and its log. `build_parts(cfg, ds_config_path)` checks the inputs as it goes, so a bad run fails here,
before anything trains; the loop (trainer/training/loop.py) reads the parts and owns none of this set-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transrec.data_shards.mixture import catalogue_bounds, catalogue_names
from transrec.data_shards.shard_io import ItemStore, item_feature_tables, load_manifest
from transrec.kernels import ops as kernels
from transrec.trainer.core.checkpoint import load_export, reset_prefixes
from transrec.trainer.core.choices import ItemEncoder
from transrec.trainer.core.compiled import set_compiled
from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.losses import item_share
from transrec.trainer.core.modalities import apply_backend_settings, check_shards
from transrec.trainer.core.model import TransRec, count_parameters
from transrec.trainer.core.run_setup import (
    LOG,
    load_ds_config,
    make_run_dir,
    release_shm_buffers,
    setup_distributed,
    setup_logging,
    write_run_record,
)
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.monitoring.metric_log import RunLog
from transrec.trainer.monitoring.projector import THUMBNAIL_PX, check_sprite_fits


@dataclass
class TrainingParts:
    rank: int
    world: int
    device: torch.device
    ds_base: dict  # the DeepSpeed config file's engine keys (the trainer fills in batch size and optimizer)
    shards: Path
    manifest: dict
    store: ItemStore
    bounds: np.ndarray | None  # a mixture of catalogues (data_shards/mixture.py): item offsets [C + 1]; None: one
    catalogues: list[str] | None  # the mixture's catalogue names
    # what evaluation needs of every user (counts per item, evaluated users and targets), from one streaming pass
    # split over the ranks: no user's sequence is kept
    summary: ev.SplitSummary
    num_items: int
    modality: np.ndarray  # each item's modality code (data.modality_override applied)
    run_dir: Path
    user_feature_names: list[str]
    model: TransRec
    log: RunLog
    item_share: np.ndarray  # each item's share of training interactions (the in-batch sampler's log-q)
    valid_users: ev.EvalStream  # each rank streams its own evaluated users from the shards when it evaluates
    test_users: ev.EvalStream


def build_parts(cfg: RunConfig, ds_config_path: str) -> TrainingParts:
    rank, world, device = setup_distributed()
    setup_logging(rank)
    if world > 1 and device.type == "cpu":
        release_shm_buffers(rank)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    kernels.set_default_impl(cfg.model.kernels)
    check_start(cfg)
    ds_base = load_ds_config(ds_config_path)
    shards = Path(cfg.data.shards)
    manifest = load_manifest(shards)
    if cfg.model.item_encoder == ItemEncoder.CONTENT:
        check_shards(manifest, cfg.model)
    store = ItemStore(shards)
    bounds, catalogues = catalogue_bounds(manifest), catalogue_names(manifest)
    if bounds is not None and cfg.model.side_features:
        raise ValueError("model.side_features: a mixture of catalogues carries no side features (each catalogue "
                         "has its own vocabularies); train without them")
    progress = LOG.info if rank == 0 else None  # long passes over the users' records say how far they are
    summary = ev.SplitSummary.of_all_ranks(shards, rank, world, device, log=progress)
    modality = item_modalities(store, cfg.data.modality_override)
    run_dir = make_run_dir(cfg, rank)
    LOG.info(f"run directory: {run_dir}")
    user_vocab = {n: len(v) for n, v in manifest["feature_vocabularies"]["user"].items()}
    model = build_model(cfg, store, modality, user_vocab, shards, ds_base, device)
    total, _ = count_parameters(model)
    LOG.info(f"model: {total / 1e6:.1f} M parameters; {store.num_items} items; {manifest['num_users']} users; "
             f"world size {world} on {device}")
    log = RunLog(run_dir, rank, world, device, cfg.log_every)
    if rank == 0:
        write_run_record(run_dir, cfg, ds_base, {"world_size": world})
    sample = ev.UserSample(cfg.eval.max_users, cfg.seed) if cfg.eval.max_users else None
    valid_users = ev.EvalStream(shards, "valid", cfg.model.max_len, summary.users["valid"], summary.targets["valid"],
                                list(user_vocab), rank, world, sample, log=progress)
    test_users = ev.EvalStream(shards, "test", cfg.model.max_len, summary.users["test"], summary.targets["test"],
                               list(user_vocab), rank, world, sample, held=valid_users.held)
    if sample is not None:
        LOG.info(f"evaluation: a seeded sample of {len(test_users):,} of the {len(summary.users['test']):,} evaluated "
                 f"users (eval.max_users={cfg.eval.max_users}, seed {cfg.seed})")
    return TrainingParts(rank, world, device, ds_base, shards, manifest, store, bounds, catalogues, summary,
                         store.num_items, modality, run_dir, list(user_vocab), model, log,
                         item_share(summary.counts["train"], bounds), valid_users, test_users)


def check_start(cfg: RunConfig) -> None:
    """The settings that need an export, and the projector's size: checked before anything is read or written."""
    if cfg.init_reset and not cfg.init_from:
        raise ValueError(f"init_reset={cfg.init_reset!r} resets parts of an export: give the export with "
                         "--init-from (or init_from=), or drop init_reset")
    if cfg.eval.initial_candidate and not cfg.init_from:
        raise ValueError("eval.initial_candidate makes the starting model a candidate for selection: give the "
                         "export to start from with --init-from (or init_from=), or drop it")
    if cfg.monitor.projector:
        try:
            check_sprite_fits(cfg.monitor.projector_items, THUMBNAIL_PX)
        except ValueError as e:
            raise ValueError(f"monitor.projector_items={cfg.monitor.projector_items}: {e}") from None


def item_modalities(store: ItemStore, override: str | None) -> np.ndarray:
    """Each item's modality code: the shards' own, or every item read as `override` (an all-one-modality view)."""
    modality = store.modality.copy()
    if override:
        modality[:] = store.modality_code(override)
        missing = int((~store.has(np.arange(store.num_items), override)).sum())
        if missing:
            raise ValueError(f"modality_override={override}: {missing} items have no {override} content in these "
                             "shards")
    return modality


def build_model(cfg: RunConfig, store: ItemStore, modality: np.ndarray, user_vocab: dict[str, int], shards: Path,
                ds_base: dict, device: torch.device) -> TransRec:
    """The model on `device`: its towers' weights (each tower's own, or an --init-from export's), the backends'
    settings, and torch.compile of the per-step modules when asked."""
    item_feats = item_feature_tables(shards, store.num_items) if cfg.model.side_features else None
    model = TransRec(cfg.model, store.num_items, modality, {}, user_vocab, item_feats, store.modality_names).to(device)
    loaded = []
    if cfg.init_from:
        loaded = load_export(model, cfg.model, Path(cfg.init_from), log=LOG.info, parts=cfg.init_parts,
                             reset=reset_prefixes(cfg.init_reset))["loaded"]
    for name, tower in model.towers.items():
        from_export = [k for k in loaded if k.startswith(f"towers.{name}.")]
        source = (f"{len(from_export)} tensors from --init-from {cfg.init_from} (its backbone came from: "
                  f"{tower.weights_source})") if from_export else tower.weights_source
        LOG.info(f"{name} tower weights: {source}")
    apply_backend_settings(cfg.model)
    if cfg.model.compile != "none":
        zero = ds_base.get("zero_optimization", {}).get("stage", 0)
        parts = set_compiled(model, cfg.model.compile, cfg.model.compile_mode, cfg.model.compile_backend, zero)
        LOG.info(f"compiled ({cfg.model.compile_backend}, mode {cfg.model.compile_mode}, dynamic shapes): "
                 f"{', '.join(parts)}")
    return model
