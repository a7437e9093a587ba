"""A finished run's item and user vectors in TensorBoard's embedding projector.

`write_projector` adds two embeddings to the run's TensorBoard writer (torch's `SummaryWriter.add_embedding`, which
writes `<tag>/tensors.tsv`, `metadata.tsv` and `sprite.png` under the writer's log folder and lists them in its
`projector_config.pbtxt`):

- `items`: one row per item vector, metadata `index, id, label, modality, train_count` (the item's index in the
  shards, its raw id, a short label from its content, the modality its vector comes from, its number of training
  interactions). The label comes from a registered modality's `describe` hook: the item's own modality's, else the
  first other modality of the item with a payload and a `describe` hook (so an item embedded from its picture is
  still labelled by its title), else it is empty. The sprite holds one THUMBNAIL_PX tile per item: the `thumbnail`
  hook of its modality where there is one, a plain mid-grey tile otherwise.
- `users`: one row per user vector, metadata `user, history_length`; no sprite.

Caps: at most ITEM_CAP items and USER_CAP users are written; beyond a cap a seeded uniform sample without replacement
is written, in index order, and the returned summary says so (`{"written", "total", "sampled", "cap"}` per tag).
The tensors are plain text (about 20 bytes per value: 1,682 items of 256 values take 8.7 MB) and the projector
loads and lays out every row in the browser: a few thousand rows open in seconds, a full catalogue of 100k items
would not. The sprite is one
PNG of ceil(sqrt(rows)) tiles a side, and the projector takes at most SPRITE_MAX_PX a side: the item cap and the tile
size must fit it (checked).

To look at it: `tensorboard --logdir RUN_DIR/tensorboard`, then the Projector tab (choose `items` or `users`, colour
by `modality`, label by `label`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from transrec.trainer.core.modalities import MODALITIES

ITEM_CAP = 5000  # item rows written at most (a seeded sample beyond it)
USER_CAP = 1000  # user rows written at most (a seeded sample beyond it)
THUMBNAIL_PX = 32  # side of an item's tile in the sprite
SPRITE_MAX_PX = 8192  # the largest sprite side TensorBoard's projector loads
GREY = 128  # the tile of an item without a picture
ITEM_HEADER = ("index", "id", "label", "modality", "train_count")
USER_HEADER = ("user", "history_length")
_TSV_BREAKS = re.compile(r"[\t\r\n]+")


@dataclass(frozen=True)
class ItemTable:
    """What the items' rows are made of, one entry per item (all of the same length)."""

    vectors: torch.Tensor
    modality_codes: np.ndarray
    train_counts: np.ndarray
    raw_ids: list


def check_sprite_fits(cap: int, thumbnail_px: int) -> None:
    """Raise ValueError when `cap` tiles of `thumbnail_px` make a sprite larger than the projector loads."""
    side = math.ceil(math.sqrt(cap)) * thumbnail_px
    if side > SPRITE_MAX_PX:
        raise ValueError(f"{cap} items of {thumbnail_px} px make a sprite {side} px a side; TensorBoard's projector "
                         f"loads at most {SPRITE_MAX_PX} px: lower the item cap or the thumbnail size")


check_sprite_fits(ITEM_CAP, THUMBNAIL_PX)


def write_projector(writer, store, modality_codes, model_config, item_vectors, train_counts, raw_item_ids,
                    user_vectors, user_ids, history_lengths, *, item_cap: int = ITEM_CAP, user_cap: int = USER_CAP,
                    seed: int = 0, thumbnail_px: int = THUMBNAIL_PX) -> dict:
    """Add the `items` and `users` embeddings to `writer` (a SummaryWriter); see the module docstring.

    `store`: the shards' ItemStore; `modality_codes`, `train_counts`, `raw_item_ids`: per item, aligned with
    `item_vectors` [num_items, d]; `user_ids`, `history_lengths`: per user, aligned with `user_vectors` [U, d];
    `model_config`: passed to the modalities' `describe` hooks. Returns {"items": summary, "users": summary}, each
    {"written", "total", "sampled", "cap"}."""
    check_sprite_fits(item_cap, thumbnail_px)
    items = item_table(store, modality_codes, item_vectors, train_counts, raw_item_ids)
    users = as_matrix(user_vectors, "user_vectors")
    check_rows("user_vectors", len(users), {"user_ids": len(user_ids), "history_lengths": len(history_lengths)})
    item_rows = sample_rows(len(items.vectors), item_cap, seed)
    user_rows = sample_rows(len(users), user_cap, seed)
    if len(item_rows):
        labels = [item_metadata(store, items, model_config, int(i)) for i in item_rows]
        sprite = sprite_tiles(store, items.modality_codes[item_rows], item_rows, thumbnail_px)
        add_table(writer, "items", items.vectors[item_rows], ITEM_HEADER, labels, sprite)
    if len(user_rows):
        rows = [[user_ids[i], int(history_lengths[i])] for i in user_rows]
        add_table(writer, "users", users[user_rows], USER_HEADER, rows)
    return {"items": summary(item_rows, len(items.vectors), item_cap),
            "users": summary(user_rows, len(users), user_cap)}


# -- inputs ----------------------------------------------------------------------------------------------------------
def as_matrix(values, name: str) -> torch.Tensor:
    """`values` (a tensor or an array) as a float32 CPU tensor [rows, d]; ValueError when it is not 2-D."""
    matrix = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else np.asarray(values))
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be [rows, d], got shape {tuple(matrix.shape)}")
    return matrix.float()


def check_rows(name: str, rows: int, others: dict[str, int]) -> None:
    """ValueError naming every count in `others` that differs from `rows` (the rows of `name`)."""
    wrong = {other: n for other, n in others.items() if n != rows}
    if wrong:
        listed = ", ".join(f"{other} has {n}" for other, n in wrong.items())
        raise ValueError(f"{name} has {rows} rows but {listed}: one entry per row is needed")


def item_table(store, modality_codes, item_vectors, train_counts, raw_item_ids) -> ItemTable:
    """The item inputs checked against each other and the shards."""
    vectors = as_matrix(item_vectors, "item_vectors")
    codes = np.asarray(modality_codes, dtype=np.int64).reshape(-1)
    counts = np.asarray(train_counts).reshape(-1)
    check_rows("item_vectors", len(vectors), {"the shards' items": store.num_items, "modality_codes": len(codes),
                                              "train_counts": len(counts), "raw_item_ids": len(raw_item_ids)})
    known = len(store.modality_names)
    if len(codes) and (codes.min() < 0 or codes.max() >= known):
        raise ValueError(f"modality codes must lie in [0, {known}) (the shards' modalities "
                         f"{', '.join(store.modality_names)}), got {codes.min()}..{codes.max()}")
    return ItemTable(vectors, codes, counts, list(raw_item_ids))


def sample_rows(total: int, cap: int, seed: int) -> np.ndarray:
    """Every row index when `total` <= `cap`, else `cap` of them drawn uniformly without replacement (seeded),
    sorted."""
    if cap < 1:
        raise ValueError(f"a cap must be at least 1, got {cap}")
    if total <= cap:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=cap, replace=False))


def summary(rows: np.ndarray, total: int, cap: int) -> dict:
    return {"written": len(rows), "total": total, "sampled": len(rows) < total, "cap": cap}


# -- metadata and sprite ---------------------------------------------------------------------------------------------
def tsv_cell(value) -> str:
    """`value` as one metadata.tsv cell: tabs and line breaks become spaces."""
    return _TSV_BREAKS.sub(" ", str(value))


def item_label(store, item: int, code: int, model_config) -> str:
    """The `describe` label of the item's own modality, else of its first other modality with a payload and a hook,
    else ""."""
    own = store.modality_names[code]
    for name in (own, *(n for n in store.modality_names if n != own)):
        entry = MODALITIES.get(name)
        if entry is not None and entry.describe is not None and store.has(item, name):
            return entry.describe(bytes(store.payload(item, name)), model_config)
    return ""


def item_metadata(store, items: ItemTable, model_config, item: int) -> list:
    code = int(items.modality_codes[item])
    return [item, items.raw_ids[item], item_label(store, item, code, model_config), store.modality_names[code],
            items.train_counts[item].item()]


def item_tile(store, item: int, code: int, thumbnail_px: int) -> np.ndarray:
    """uint8 [px, px, 3]: the item's modality's thumbnail, or a grey tile when that modality draws none."""
    name = store.modality_names[code]
    entry = MODALITIES.get(name)
    if entry is None or entry.thumbnail is None or not store.has(item, name):
        return np.full((thumbnail_px, thumbnail_px, 3), GREY, dtype=np.uint8)
    tile = np.asarray(entry.thumbnail(bytes(store.payload(item, name)), thumbnail_px))
    if tile.shape != (thumbnail_px, thumbnail_px, 3) or tile.dtype != np.uint8:
        raise ValueError(f"the {name!r} thumbnail hook returned {tile.dtype} {tile.shape} for item {item}; "
                         f"uint8 ({thumbnail_px}, {thumbnail_px}, 3) is expected")
    return tile


def sprite_tiles(store, codes: np.ndarray, items: np.ndarray, thumbnail_px: int) -> torch.Tensor:
    """float32 [N, 3, px, px] in [0, 1]. torch's sprite writer multiplies by 255 in float64 and truncates to uint8,
    which gives back every level v from float32(v / 255) exactly."""
    tiles = np.stack([item_tile(store, int(i), int(c), thumbnail_px) for i, c in zip(items, codes)])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0


def add_table(writer, tag: str, vectors: torch.Tensor, header: tuple[str, ...], rows: list,
              label_img: torch.Tensor | None = None) -> None:
    """One embedding; torch writes a one-column metadata file without a header and a wider one with it."""
    if len(header) == 1:
        writer.add_embedding(vectors, metadata=[tsv_cell(r[0]) for r in rows], tag=tag, label_img=label_img)
        return
    cells = [[tsv_cell(v) for v in r] for r in rows]
    writer.add_embedding(vectors, metadata=cells, metadata_header=list(header), tag=tag, label_img=label_img)
