"""What a training run records for watching it beyond its losses (TensorBoard; docs/monitoring.md): the share of
items whose frozen blocks come from the feature cache, the user vectors' collapse diagnostics at each validation,
the run's row of the HParams tab, and the projector's item and user vectors. Nothing here changes what trains: it
reads the model in eval mode, without gradients, and draws no random numbers from the training generators.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from transrec.data_shards.shard_io import read_id_maps
from transrec.trainer.evaluation.collapse_diagnostics import user_vector_health
from transrec.trainer.evaluation.eval_users import EvalStream, EvalUsers
from transrec.trainer.monitoring.projector import write_projector


def cache_hit_counter(cache, modality_names: tuple[str, ...], modality: np.ndarray
                      ) -> Callable[[np.ndarray], int] | None:
    """items -> how many of them have their frozen lower blocks read from `cache` (their modality's are cached);
    None without a cache."""
    if cache is None:
        return None
    covered = np.array([cache.covers(name) for name in modality_names], dtype=bool)
    return lambda items: int(covered[modality[items]].sum())


def first_users(data: EvalStream, users: int) -> EvalUsers | None:
    """This rank's first `users` evaluated users of the split (the same users at every validation, so the curves
    compare like with like); None when there are none (a chunk of the stream is never empty)."""
    return next(data.chunks(users), None) if users else None


def user_vectors(ranker, item_vectors: torch.Tensor, users: EvalUsers) -> torch.Tensor:
    """[U, d] the ranker's model's user vectors of `users`' histories (call in eval mode)."""
    hist = torch.as_tensor(users.histories, device=item_vectors.device)
    return ranker.user_vectors(item_vectors, hist, users)


def validation_health(ranker, item_vectors: torch.Tensor, data: EvalStream, users: int) -> dict | None:
    """The collapse diagnostics (collapse_diagnostics.user_vector_health) of the user vectors of this rank's first
    `users` validation users; None when off (0) or when fewer than 2 users are evaluated here."""
    sample = first_users(data, users)
    if sample is None or len(sample) < 2:
        return None
    return user_vector_health(user_vectors(ranker, item_vectors, sample), item_vectors)


def write_run_projector(writer, trainer, ranker, item_vectors: torch.Tensor) -> dict:
    """The selected model's item vectors (with id, label, modality, training count; posters as the sprite) and the
    user vectors of the first validation users (with their history length) for TensorBoard's projector, capped by
    monitor.projector_items / projector_users (trainer/monitoring/projector.py)."""
    monitor = trainer.cfg.monitor
    users = first_users(trainer.valid_users, monitor.projector_users)  # None when this rank evaluates no user
    vectors = (user_vectors(ranker, item_vectors, users) if users is not None
               else torch.zeros(0, item_vectors.shape[1]))
    ids = read_id_maps(trainer.shards)
    return write_projector(
        writer, trainer.store, trainer.modality, trainer.cfg.model, item_vectors,
        trainer.summary.counts["train"], ids["items"], vectors,
        [] if users is None else [ids["users"][u] for u in users.users],
        np.zeros(0, np.int64) if users is None else (users.histories >= 0).sum(1),
        item_cap=monitor.projector_items, user_cap=monitor.projector_users, seed=trainer.cfg.seed)
