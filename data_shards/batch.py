"""A training batch as the step reads it: each window's items as slots into the batch's unique items
(`SequenceBatch`), the unique items' content grouped by modality and collated by each modality's content kind
(`ItemContent`, `load_item_content`), and the host-side step plan (`attach_step_plan`: the routing of the unique
items to their towers, the kept positions of a dense loss, the number of real sequences), so the step reads nothing
back from the device. The streaming loader that makes batches is data_shards/loader.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from transrec.data_shards.modalities import ContentOptions, content_kind
from transrec.data_shards.shard_io import ItemStore


@dataclass
class ItemContent:
    """Content of a batch's unique items, grouped by modality name (rows index into `SequenceBatch.unique_items`)."""

    modality: torch.Tensor  # [U] modality code (index into the shards' modality names)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [Um] rows routed to that modality
    inputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> the tower's input tensors
    payloads: dict[str, list[bytes]] = field(default_factory=dict)  # name -> stored bytes left to decode later

    def to(self, device: torch.device | str, non_blocking: bool = True) -> ItemContent:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def map(self, fn) -> ItemContent:
        """A copy with `fn` applied to every tensor (payload bytes are shared)."""
        return ItemContent(fn(self.modality), {n: fn(r) for n, r in self.rows.items()},
                           {n: {k: fn(v) for k, v in x.items()} for n, x in self.inputs.items()}, dict(self.payloads))


@dataclass
class SequenceBatch:
    items: torch.Tensor  # [B, W] catalogue item index per position, left padded with -1
    slots: torch.Tensor  # [B, W] index into unique_items per position, -1 = padding
    users: torch.Tensor  # [B] user index
    ends: torch.Tensor  # [B] end (exclusive) of the window in the user's history
    weights: torch.Tensor  # [B] 1.0 real sample, 0.0 padding sample
    unique_items: torch.Tensor  # [U] catalogue indices (the batch's items, then the negatives)
    negatives: torch.Tensor  # [N] catalogue indices of the shared negatives
    negative_slots: torch.Tensor  # [N] index into unique_items
    batch_index: int = 0
    content: ItemContent | None = None
    user_features: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, k] (0 = unknown)
    # The host-side step plan (module docstring); None when a batch was made without one.
    routing: list[torch.Tensor] | None = None  # per modality index: rows of unique_items routed to its tower
    keep: torch.Tensor | None = None  # [K] flat indices into [B, W - 1]: position t has a real next item, weight > 0
    num_real: float = 0.0  # real (weight > 0) sequences in the batch
    # A mixture's batch holds one catalogue's sequences: its number and item range [lo, hi) (None: one catalogue)
    catalogue: int = 0
    span: tuple[int, int] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> SequenceBatch:
        def mv(t):
            return t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t

        skip = ("content", "user_features", "routing")
        out = SequenceBatch(**{k: mv(v) for k, v in self.__dict__.items() if k not in skip})
        out.user_features = {k: mv(v) for k, v in self.user_features.items()}
        out.routing = None if self.routing is None else [mv(r) for r in self.routing]
        if self.content is not None:
            out.content = self.content.to(device, non_blocking)
        return out


def pin(batch: SequenceBatch) -> SequenceBatch:
    """The batch's tensors in page-locked memory, so that `.to(cuda, non_blocking=True)` copies asynchronously."""
    def pinned(t):
        return t.pin_memory() if isinstance(t, torch.Tensor) and t.numel() else t

    for k, v in batch.__dict__.items():
        if isinstance(v, torch.Tensor):
            setattr(batch, k, pinned(v))
    batch.routing = None if batch.routing is None else [pinned(r) for r in batch.routing]
    batch.user_features = {k: pinned(v) for k, v in batch.user_features.items()}
    if batch.content is not None:
        batch.content = batch.content.map(pinned)
    return batch


def attach_step_plan(batch: SequenceBatch, item_modality: np.ndarray, num_modalities: int) -> SequenceBatch:
    """The host-side step plan of a batch still on the CPU (module docstring): routing rows per modality code, the
    dense losses' kept positions, the number of real sequences. Call it again after changing the batch's tensors."""
    slots, weights = batch.slots.numpy(), batch.weights.numpy()
    unique_modality = item_modality[batch.unique_items.numpy()]
    batch.routing = [torch.from_numpy(np.flatnonzero(unique_modality == m)) for m in range(num_modalities)]
    real = slots >= 0
    valid = real[:, :-1] & real[:, 1:] & (weights[:, None] > 0)
    batch.keep = torch.from_numpy(np.flatnonzero(valid.reshape(-1)))
    batch.num_real = float(weights.sum())
    return batch


def load_item_content(
    store: ItemStore, unique: np.ndarray, options: ContentOptions, modality: np.ndarray | None = None
) -> ItemContent:
    """The content of items `unique`, grouped by modality and collated by each modality's content kind with its own
    options (tokens for text items; pixels with a decoder, JPEG bytes without, for image items; ...).

    `modality` overrides the shards' per-item modality codes (e.g. to evaluate an all-text view)."""
    mods = (store.modality if modality is None else modality)[unique]
    content = ItemContent(modality=torch.from_numpy(mods.astype(np.int64)))
    for code, name in enumerate(store.modality_names):
        rows = np.flatnonzero(mods == code)
        if len(rows) == 0:
            continue
        payloads = [store.payload(int(unique[r]), name) for r in rows]
        content.rows[name] = torch.from_numpy(rows)
        inputs = content_kind(name).collate(payloads, unique[rows], options.of(name))
        if inputs is None:
            content.payloads[name] = [bytes(p) for p in payloads]
        else:
            content.inputs[name] = inputs
    return content
